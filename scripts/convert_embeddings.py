"""Converts LEO-format embedding pickles to `.npz` (keys + embeddings, no code).

  python scripts/convert_embeddings.py --input=embeddings/miniImageNet/center/train_embeddings.pkl
  python scripts/convert_embeddings.py --data_path=embeddings          # every *_embeddings.pkl

A `.npz` holds two plain arrays (`keys` as unicode strings, `embeddings` as
float32 [n, D]) and is read with `allow_pickle=False`, so it cannot carry
code; the runner prefers `<split>_embeddings.npz` over the `.pkl` beside it.
Each pickle is read with the allow-list unpickler (a hostile file is refused,
nothing from it runs), validated, written atomically (temporary file +
rename: a killed conversion leaves no partial `.npz`), then read back and
compared with the pickle row by row before the next file starts. Outputs stay
beside their inputs (under --data_path in tree mode); symbolic links are not
followed.
"""

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data.convert import convert_file, convert_tree  # pylint: disable=wrong-import-position

flags.DEFINE_string("input", None, "One <split>_embeddings.pkl to convert.")
flags.DEFINE_string("output", None, "Where to write it (default: the input with .npz).")
flags.DEFINE_string("data_path", None, "Convert every *_embeddings.pkl under this tree.")
flags.DEFINE_boolean("remove_pickles", False,
                     "Delete each pickle once its .npz has been verified.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  if bool(FLAGS.input) == bool(FLAGS.data_path):
    raise errors.ConfigError("give exactly one of --input=<file.pkl> or --data_path=<tree>")
  if FLAGS.data_path and FLAGS.output:
    raise errors.ConfigError("--output applies to --input only")
  try:
    if FLAGS.data_path:
      outputs = convert_tree(FLAGS.data_path, FLAGS.remove_pickles)
      print(f"{len(outputs)} file(s) converted under {FLAGS.data_path}")
    else:
      convert_file(FLAGS.input, FLAGS.output, FLAGS.remove_pickles)
  except OSError as exc:  # disk full, permissions: the previous files are intact
    raise errors.DataError(
        f"{exc.filename or 'output'}: {exc.strerror or exc}; nothing half-written was "
        "left behind, fix this and rerun") from None


if __name__ == "__main__":
  console.run(main)
