"""Extracts LEO-format embeddings with a pretrained backbone.

  python scripts/extract_embeddings.py --backbone_dir=runs/pretrain_conv4/backbone \
      --source=../shared/data/omniglot/images_background_small1.zip \
      --source=../shared/data/omniglot/images_background_small2.zip \
      --split=omniglot_small --out=embeddings --dataset_name=omniglot_small --crop=center

writes <out>/<dataset_name>/<crop>/{train,val,test}_embeddings.pkl (or .npz with
--format=npz) and manifest.json as one generation that replaces the folder whole (only
--splits then); `runner.py --data_path=<out> --dataset_name=<dataset_name>` reads them;
--rotated_splits=train adds the train classes turned by 90/180/270 degrees as classes;
--view_splits=train also writes train_views.npz, each view's features (--metatrain_views).

Without --split, every image under the source(s) is embedded (classes from folders where
there are folders, else `unlabelled`) into <out>/<dataset_name>/<crop>/all_embeddings.pkl,
whose keys keep each image's relative path (leo_suite.data.embedding_keys.key_file_path)
and whose manifest.json lists file -> row; --dataset_name defaults to the source's name:

  python scripts/extract_embeddings.py --backbone_dir=runs/pretrain/backbone --source=my_photos/

Beyond one device: with --num_shards=S --shard_index=i, S processes (or
machines sharing --out, or copying their shard folder into it) each embed a disjoint part
of every split (batch b = record // --batch_size when b % S == i) into
<out>/<dataset_name>/<crop>/shards/shard-0000i-of-0000S/, its manifest.json written last;
rerunning a finished shard with the same flags does nothing. Then the same command with
--merge instead of --shard_index (no --backbone_dir needed; given, it must be the shards')
checks that all S shards are there, finished, unchanged (sha256) and made with the same
backbone and flags, and writes the split files (byte for byte one process's with the
same --batch_size, unless images were skipped) and the manifest as one generation, then
removes the shards folder (--keep_shards keeps it); with or without --split:

  for i in 0 1; do python scripts/extract_embeddings.py --backbone_dir=runs/pretrain/backbone \
      --source=images/ --split=split.json --out=embeddings --dataset_name=mine \
      --num_shards=2 --shard_index=$i & done; wait
  python scripts/extract_embeddings.py --source=images/ --split=split.json \
      --out=embeddings --dataset_name=mine --num_shards=2 --merge

A missing, unfinished, changed or mismatched shard is refused in one line naming the shard
and the command to rerun; nothing is written then. docs/pretraining.md.
"""

import os

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.data import image_views  # pylint: disable=wrong-import-position
from leo_suite.data import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.pipelines import extraction  # pylint: disable=wrong-import-position
from leo_suite.pretrain import class_splits  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract_files  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract_shards  # pylint: disable=wrong-import-position

flags.DEFINE_string("backbone_dir", None, "The backbone/ folder written by pretrain.py.")
flags.DEFINE_multi_string("source", [], "Image source(s), as for pretrain.py.")
flags.DEFINE_string("split", None, "Class split: protocol name (omniglot_small), JSON file "
                    "or 'csv'. Omitted: embed every image of the source(s) into "
                    "all_embeddings.<format>, keyed by relative path.")
flags.DEFINE_list("splits", ["train", "val", "test"], "Which splits to extract.")
flags.DEFINE_string("protocol_dir", None, "Where named protocols' JSON files are.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources.")
flags.DEFINE_boolean("tfds_download", False, "Let tfds: sources download (network).")
flags.DEFINE_string("out", "embeddings", "Output root (the runner's --data_path).")
flags.DEFINE_string("dataset_name", "omniglot_small", "Dataset folder name.")
flags.DEFINE_enum("crop", "center", list(image_views.CROPS), "Views averaged per image.")
flags.DEFINE_enum("format", "pkl", list(extract.FORMATS), "pkl (LEO's format) or npz.")
flags.DEFINE_integer("batch_size", 256, "Images per batch.")
flags.DEFINE_boolean("skip_bad_images", False, "Skip and report unreadable images (default: fail).")
flags.DEFINE_string("expected_size", "any", "Required source size WIDTHxHEIGHT, or 'any'.")
flags.DEFINE_list("allowed_modes", list(images_lib.DEFAULT_MODES), "Accepted PIL image modes.")
flags.DEFINE_integer("num_shards", 1, "Split the extraction into this many shards (one "
                     "process or machine each): pass --shard_index, then --merge.")
flags.DEFINE_integer("shard_index", None, "Which shard (0 .. --num_shards-1) this run embeds.")
flags.DEFINE_boolean("merge", False, "Combine the finished shards into the split files and "
                     "manifest (same --out/--dataset_name/--crop as the shard runs).")
flags.DEFINE_boolean("keep_shards", False, "With --merge: keep the shards folder.")
flags.DEFINE_list("rotated_splits", [], "With --split, one process: splits whose classes are "
                  "also embedded turned by 90, 180 and 270 degrees, each turn a class.")
flags.DEFINE_list("view_splits", [], "With --split: splits also saved per view (--metatrain_views).")
FLAGS = flags.FLAGS


def run_shard(plan, name):
  extraction.run_shard(FLAGS.backbone_dir, plan, FLAGS.out, name, FLAGS.num_shards,
                       FLAGS.shard_index, FLAGS.crop, FLAGS.format, FLAGS.batch_size,
                       FLAGS.skip_bad_images, images_lib.parse_expected_size(
                           FLAGS.expected_size), tuple(FLAGS.allowed_modes))


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  extract_shards.check_flags(FLAGS.num_shards, FLAGS.shard_index, FLAGS.merge)
  keep = FLAGS.keep_shards and not FLAGS.merge
  if keep or (FLAGS.rotated_splits or FLAGS.view_splits) and (
      not FLAGS.split or FLAGS.num_shards > 1 or FLAGS.merge):
    raise errors.ConfigError("--keep_shards goes with --merge" if keep else "--rotated_splits and "
                             "--view_splits go with --split, in one process (no --num_shards, --merge)")
  name = (FLAGS.dataset_name if FLAGS["dataset_name"].present or FLAGS.split
          else extract_files.default_dataset_name(FLAGS.source))
  if FLAGS.merge:
    return extraction.merge(
        FLAGS.out, name, FLAGS.crop, FLAGS.num_shards if FLAGS["num_shards"].present else None,
        extraction.merge_expectations(
            FLAGS.source if FLAGS["source"].present else None, FLAGS.split,
            FLAGS.format if FLAGS["format"].present else None, FLAGS.backbone_dir),
        FLAGS.keep_shards)
  if not FLAGS.backbone_dir:
    raise errors.ConfigError("--backbone_dir is required (the backbone/ folder of a pretraining run)")
  if not FLAGS.split:
    records = extract_files.scan_all(FLAGS.source, FLAGS.tfds_data_dir, FLAGS.tfds_download)
    if FLAGS.shard_index is not None:
      return run_shard(extract_shards.plan_all(records, FLAGS.source), name)
    manifest = extract_files.extract_all(
        FLAGS.backbone_dir, records, FLAGS.out, name, FLAGS.crop, FLAGS.format,
        FLAGS.batch_size, FLAGS.skip_bad_images,
        images_lib.parse_expected_size(FLAGS.expected_size), tuple(FLAGS.allowed_modes),
        FLAGS.source)
    folder = os.path.join(FLAGS.out, name, FLAGS.crop)
    written = manifest["splits"][extract_files.ALL]
    print(f"embeddings: {os.path.join(folder, written['file'])} "
          f"({extract_files.describe_counts(written)}); "
          f"manifest: {os.path.join(folder, embeddings_lib.MANIFEST)}")
    return
  by_class, split_classes, origin = class_splits.load_labelled_splits(
      FLAGS.source, FLAGS.split, FLAGS.protocol_dir, FLAGS.tfds_data_dir,
      FLAGS.tfds_download)
  unknown = [s for s in FLAGS.splits if s not in split_classes]
  if unknown:
    raise errors.ConfigError(f"--splits={unknown}: {origin} defines only {sorted(split_classes)}")
  if FLAGS.shard_index is not None:
    return run_shard(extract_shards.plan_splits(
        by_class, {s: split_classes[s] for s in FLAGS.splits}, FLAGS.source, origin), name)
  manifest = extract.extract_embeddings(
      FLAGS.backbone_dir, by_class, {s: split_classes[s] for s in FLAGS.splits}, FLAGS.out,
      FLAGS.dataset_name, FLAGS.crop, FLAGS.format, FLAGS.batch_size, FLAGS.skip_bad_images,
      images_lib.parse_expected_size(FLAGS.expected_size), tuple(FLAGS.allowed_modes),
      FLAGS.source, origin, rotated_splits=FLAGS.rotated_splits, view_splits=FLAGS.view_splits)
  print(f"manifest: {os.path.join(FLAGS.out, FLAGS.dataset_name, FLAGS.crop, embeddings_lib.MANIFEST)}"
        f" ({extraction.describe_splits(manifest)})")


if __name__ == "__main__":
  console.run(main)
