"""Adapts a trained meta-learner to a support set and exports it for TF Serving.

  # support = LEO-format embeddings (.pkl / .npz; the keys give the class names)
  python scripts/export_classifier.py --checkpoint_path=runs/demo \
      --support=my_support_embeddings.pkl --export_base=serving

  # support = class-per-folder images, embedded by the pretrained backbone, which
  # is bundled so the served model takes encoded images
  python scripts/export_classifier.py --checkpoint_path=runs/omniglot_leo \
      --support=support_images/ --backbone_dir=runs/pretrain_conv4/backbone \
      --export_base=serving --model_name=omniglot

writes <export_base>/<model_name>/<version>/ (saved_model.pb, variables/,
assets.extra/leo_suite_export.json); the next free integer version unless
--version is given, never overwriting one. Serve it with
  docker run -p 8500:8500 -p 8501:8501 -v $PWD/serving/<model_name>:/models/<model_name> \
      -e MODEL_NAME=<model_name> tensorflow/serving
Signatures and shapes: leo_suite/serving/export.py.
"""

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.serving import export  # pylint: disable=wrong-import-position
from leo_suite.serving import latency  # pylint: disable=wrong-import-position
from leo_suite.training import run as run_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("checkpoint_path", None,
                    "Run directory of `runner.py` training: the learner is rebuilt from its "
                    "config.json; best/ckpt is used if present, else the latest checkpoint.")
flags.DEFINE_string("support", None,
                    "Support set: an embeddings .pkl/.npz in LEO format, or images "
                    "(needs --backbone_dir): a class-per-folder directory (or .zip), a "
                    "folder with labels.csv, or a file,label .csv.")
flags.DEFINE_string("backbone_dir", None,
                    "The backbone/ folder written by scripts/pretrain.py. Required for an "
                    "image support set; when given, the backbone is bundled and "
                    "serving_default takes encoded images.")
flags.DEFINE_string("export_base", None, "Base directory; the model goes to "
                    "<export_base>/<model_name>/<version>/.")
flags.DEFINE_string("model_name", "", "Served model name (default: the learner's name).")
flags.DEFINE_integer("version", 0, "Version number to write (0 = one above the highest).")
flags.DEFINE_integer("num_shots", 0, "Use the first K examples of each class (0 = all; "
                     "then every class must have the same number).")
flags.DEFINE_boolean("private", False, "Make the exported directories 0700 and files 0600 "
                     "(default 0755 / 0644, so a model server running as another user can "
                     "read them).")
flags.DEFINE_boolean("benchmark", False, "Measure predictions/s of the written version.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # tf.saved_model.save is chatty
  for name in ("checkpoint_path", "support", "export_base"):
    if not FLAGS[name].value:
      raise errors.ConfigError(f"--{name} is required")
  if FLAGS.model_name:
    export.check_model_name(FLAGS.model_name)
  if FLAGS.version < 0:
    raise errors.ConfigError(f"--version={FLAGS.version}: must be >= 1 (0 = next)")
  with run_lib.Run.opened(FLAGS.checkpoint_path) as opened:
    run = export.restore_learner(opened)
  # Every support form of scripts/predict.py (leo_suite.serving.sets.load_set).
  support, backbone, description = export.load_support(
      FLAGS.support, FLAGS.backbone_dir, FLAGS.num_shots, crop=export.run_crop(run.run),
      num_ways=run.learner.num_ways)   # checked before any image is embedded
  result = export.export_classifier(
      FLAGS.checkpoint_path, support, FLAGS.export_base, FLAGS.model_name or None,
      FLAGS.version, backbone, description, restored=run, private=FLAGS.private)
  print(f"exported {run.run.model} ({run.checkpoint}) adapted to "
        f"{support.num_ways} classes x {support.num_shots} shots "
        f"{list(support.class_names)} -> {result.path}")
  print(f"signatures: {', '.join(result.info['signatures'])}")
  if FLAGS.benchmark:
    figures = latency.benchmark_latency(result.path)
    for key, value in sorted(figures.items()):
      if key.startswith("batch_"):
        print(f"{key}: {value:.1f}")


if __name__ == "__main__":   # no message advises a rerun: a rerun fixes none of these
  console.run(main, where=lambda: FLAGS.export_base, location_flag="--export_base",
              recovery="No version was written (a version appears only when complete).",
              interrupted="interrupted; no version was written")
