"""Supervised pretraining of a feature backbone on the meta-train classes.

  python scripts/pretrain.py --print_params --image_size=84
  python scripts/pretrain.py \
      --source=../shared/data/omniglot/images_background_small1.zip \
      --source=../shared/data/omniglot/images_background_small2.zip \
      --split=omniglot_small --out_dir=runs/pretrain_conv4 --epochs=12

Rerunning the same command after a kill resumes from the last checkpoint. The
exported feature extractor is <out_dir>/backbone/ (for extract_embeddings.py).

Beyond one device, with the runner's flags: --distribution_strategy=mirrored
(local GPUs, --devices, or --num_cpu_devices logical CPUs) or multi_worker
(one process per worker, TF_CONFIG). The global --batch_size is split evenly
over the replicas and the update is the single-device one (batch norm over the
global batch, see leo_suite/pretrain/train.py); only the chief writes <out_dir>.
"""

import dataclasses
import os

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import distribute  # pylint: disable=wrong-import-position
from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.models import backbones  # pylint: disable=wrong-import-position
from leo_suite.pretrain import class_splits  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pretrain_config  # pylint: disable=wrong-import-position
from leo_suite.pretrain import train as train_lib  # pylint: disable=wrong-import-position

_DEFAULTS = pretrain_config.PretrainConfig()
flags.DEFINE_multi_string("source", [], "Image source: a class-per-folder directory, a .zip "
                          "archive, tfds:<name>[:<split>] or csv:<miniImageNet root> (repeatable).")
flags.DEFINE_string("split", "omniglot_small", "Class split: a protocol name (omniglot_small), "
                    "a JSON file of class lists, or 'csv' (the miniImageNet CSVs).")
flags.DEFINE_string("protocol_dir", None, "Where named protocols' JSON files are "
                    "(default $LEO_SUITE_OMNIGLOT_DIR or ../shared/data/omniglot).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources.")
flags.DEFINE_boolean("tfds_download", False, "Let tfds: sources download and prepare the "
                     "dataset (needs network access); default: only read prepared data.")
flags.DEFINE_string("out_dir", "runs/pretrain", "Checkpoints, logs and the exported backbone/.")
flags.DEFINE_boolean("print_params", False, "Print the backbones' parameter counts and exit.")
flags.DEFINE_enum("backbone", _DEFAULTS.backbone, list(backbones.BACKBONES), "Feature backbone.")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Input size: 28 Omniglot, 84 miniImageNet.")
flags.DEFINE_integer("channels", _DEFAULTS.channels, "1 (grayscale) or 3 (RGB).")
flags.DEFINE_boolean("invert", _DEFAULTS.invert, "Use 1 - x (Omniglot strokes).")
flags.DEFINE_boolean("rotations", _DEFAULTS.rotations, "Add 90/180/270-degree rotations as classes.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Images per step.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak SGD learning rate.")
flags.DEFINE_enum("schedule", _DEFAULTS.schedule, ["cosine", "step"], "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps, "Linear warm-up steps.")
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "L2 on kernels.")
flags.DEFINE_enum("augment", _DEFAULTS.augment, list(pretrain_config.AUGMENTS), "Augmentation "
                  "(affine: Koch et al. 2015 rotation/shear/scale + translation, p = 0.5 each).")
flags.DEFINE_enum("head", _DEFAULTS.head, list(pretrain_config.HEADS), "Classifier head: linear or "
                  "cosine (learnable scale from 10).")
flags.DEFINE_integer("max_shift", _DEFAULTS.max_shift, "Random translation in pixels.")
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Dropout (ResNet-12 last stages, WRN blocks).")
flags.DEFINE_string("teacher", _DEFAULTS.teacher, "Born-again distillation: the --out_dir of a "
                    "finished pretraining run on the same classes; the loss becomes "
                    "(1 - alpha) * CE + alpha * T^2 * KL(teacher || student) at temperature T.")
flags.DEFINE_float("distill_alpha", _DEFAULTS.distill_alpha, "alpha of --teacher's loss.")
flags.DEFINE_float("distill_temperature", _DEFAULTS.distill_temperature,
                   "T of --teacher's loss.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of initialisation, data order, augmentation.")
flags.DEFINE_enum("mixed_precision", "auto", ["auto", "on", "off"], "float16 compute on a GPU only.")
flags.DEFINE_integer("checkpoint_every", 0, "Steps between checkpoints (0: every epoch).")
flags.DEFINE_boolean("skip_bad_images", False, "Skip and report unreadable images (default: fail).")
flags.DEFINE_string("expected_size", "any", "Required source size WIDTHxHEIGHT, or 'any'.")
flags.DEFINE_list("allowed_modes", list(images_lib.DEFAULT_MODES), "Accepted PIL image modes.")
flags.DEFINE_integer("val_episodes", 200, "Meta-val 5-way 1-shot NCM episodes after each "
                     "epoch (0: off).")
# The runner's (config.py) flags, same values and meaning; a bad value is a
# one-line error (exit 2), so the strategy is a string checked by make_strategy.
flags.DEFINE_string("distribution_strategy", "default", "One of " +
                    ", ".join(distribute.STRATEGIES) + ". default: one device; mirrored: all "
                    "local GPUs (or --devices, or --num_cpu_devices logical CPUs); "
                    "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG. The global "
                    "--batch_size is split over the replicas (must divide evenly).")
flags.DEFINE_string("devices", "", "With --distribution_strategy=mirrored: comma list of "
                    "devices, e.g. /gpu:0,/gpu:1 or /cpu:0,/cpu:1 ('' = all local GPUs, "
                    "else CPUs).")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into this many logical devices "
                     "/cpu:0.. (0 = leave as is); for testing mirrored without GPUs.")
flags.DEFINE_boolean("sync_batch_norm", True, "With several replicas, batch norm uses the "
                     "statistics of the global batch (all-reduced): the single-device update. "
                     "--nosync_batch_norm: each replica's own share (cheaper, differs).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  if FLAGS.num_cpu_devices:  # before any TF op initialises the devices
    distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
  if FLAGS.print_params:
    print(f"{'backbone':<10} {'parameters':>12} {'feature dim':>12}   "
          f"(input {FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels})")
    for name, count, dim in backbones.parameter_table(FLAGS.image_size, FLAGS.channels):
      print(f"{name:<10} {count:>12,} {dim:>12}")
    return
  # Every PretrainConfig field with a flag here takes it (the rest keep their defaults).
  config_class = pretrain_config.PretrainConfig
  config = config_class(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(config_class)
                           if f.name in FLAGS})
  pretrain_config.validate_config(config)
  # Before the data are read (multi_worker must start before other TF ops).
  strategy = distribute.make_strategy(FLAGS.distribution_strategy,
                                      distribute.parse_devices(FLAGS.devices))
  distribute.check_batch(strategy, config.batch_size, "batch_size", "images")
  by_class, split_classes, origin = class_splits.load_labelled_splits(
      FLAGS.source, FLAGS.split, FLAGS.protocol_dir, FLAGS.tfds_data_dir,
      FLAGS.tfds_download)
  print(f"split {origin}: " + ", ".join(f"{k} {len(v)} classes" for k, v in split_classes.items()))
  options = images_lib.DecodeOptions(
      config.image_size, config.channels, images_lib.parse_expected_size(FLAGS.expected_size),
      tuple(FLAGS.allowed_modes), FLAGS.skip_bad_images)
  images, labels, skipped = pipeline.decode_classes(by_class, split_classes["train"], options)
  print("".join(f"skipped {origin_name}: {reason}\n" for origin_name, reason in skipped), end="")
  callback = None
  if FLAGS.val_episodes and split_classes.get("val"):
    val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"], options)
    if len(split_classes["val"]) >= 5 and min(
        len(by_class[c]) for c in split_classes["val"]) >= 16:
      callback = pipeline.val_ncm_callback(val_images, val_labels, config.invert,
                                           FLAGS.val_episodes, config.seed)
  trainer = train_lib.Pretrainer(config, images, labels, FLAGS.out_dir,
                                 class_names=split_classes["train"], strategy=strategy,
                                 sync_batch_norm=FLAGS.sync_batch_norm)
  replicas = (f" on {trainer.replicas} replicas ({trainer.replica_batch} images each)" * (
      trainer.replicas > 1))
  print(f"training {config.backbone} on {len(labels)} images of {trainer.num_base_classes} "
        f"classes ({trainer.num_classes} with rotations), {trainer.total_steps} steps"
        f"{replicas}")
  summary = trainer.train(epoch_callback=callback)
  if trainer.is_chief:
    pipeline.write_json(os.path.join(FLAGS.out_dir, "pretrain_summary.json"),
                        {**summary, "skipped": skipped})
    print(f"backbone exported to {os.path.join(FLAGS.out_dir, 'backbone')}")


if __name__ == "__main__":
  console.run(main)
