"""Validation-only feature sweep for Omniglot-small (issue 12).

Pretrains one Conv-4 variant on the meta-train alphabets and scores cosine
nearest class mean on the meta-val alphabets (Early_Aramaic, Tagalog) at
5w1s / 5w5s / 20w1s on fixed episodes after the epochs in --eval_epochs (and
at the end). Latin (meta-test) is never loaded here.

  nice -n 10 .venv/bin/python experiments/omniglot_feature_sweep.py \
      --out_dir=runs/sweep/affine_e30_s0 --augment=affine --epochs=30

Appends one JSON line per evaluation to <out_dir>/val.jsonl and prints it.
"""

import json
import os
import time

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite.data import image_views  # pylint: disable=wrong-import-position
from leo_suite.data import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pretrain_config  # pylint: disable=wrong-import-position
from leo_suite.pretrain import train as train_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("out_dir", None, "Run folder.")
flags.DEFINE_integer("epochs", 10, "Pretraining epochs.")
flags.DEFINE_string("backbone", "conv4", "Backbone (leo_suite/models/backbones.py).")
flags.DEFINE_string("augment", "shift", "none, shift, shift_flip or affine.")
flags.DEFINE_integer("image_size", 28, "Input size (the 105x105 drawings are resized to it).")
flags.DEFINE_integer("max_shift", 2, "Translation range (pixels at --image_size).")
flags.DEFINE_string("head", "linear", "linear or cosine.")
flags.DEFINE_float("learning_rate", 0.05, "Peak SGD learning rate.")
flags.DEFINE_integer("seed", 0, "Pretraining seed.")
flags.DEFINE_list("eval_epochs", [], "Also evaluate after these epochs.")
flags.DEFINE_string("teacher", "", "Distil from this finished pretraining run (born-again).")
flags.DEFINE_float("distill_alpha", 0.5, "Weight of the distillation term.")
flags.DEFINE_float("distill_temperature", 4.0, "Distillation temperature.")
flags.DEFINE_integer("num_episodes", 1000, "Fixed val episodes per setting.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  _, by_class, split_classes, _ = pipeline.omniglot_small()
  options = images_lib.DecodeOptions(FLAGS.image_size, 1, (105, 105), ("1", "L"))
  images, labels, _ = pipeline.decode_classes(by_class, split_classes["train"], options)
  val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"], options)
  config = pretrain_config.PretrainConfig(backbone=FLAGS.backbone, epochs=FLAGS.epochs,
                                    image_size=FLAGS.image_size,
                                    augment=FLAGS.augment, max_shift=FLAGS.max_shift,
                                    head=FLAGS.head,
                                    learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
                                    teacher=FLAGS.teacher, distill_alpha=FLAGS.distill_alpha,
                                    distill_temperature=FLAGS.distill_temperature)
  trainer = train_lib.Pretrainer(config, images, labels, FLAGS.out_dir,
                                 class_names=split_classes["train"])
  x = image_views.preprocess(val_images, config.invert)
  wanted = {int(e) for e in FLAGS.eval_epochs} | {FLAGS.epochs}
  log_path = os.path.join(FLAGS.out_dir, "val.jsonl")
  started = time.time()

  def callback(epoch, backbone):
    if epoch not in wanted:
      return {}
    record = {"epoch": epoch, "epochs": FLAGS.epochs, "augment": FLAGS.augment,
              "head": FLAGS.head, "backbone": FLAGS.backbone, "image_size": FLAGS.image_size,
              "lr": FLAGS.learning_rate, "seed": FLAGS.seed,
              "max_shift": FLAGS.max_shift, "teacher": FLAGS.teacher,
              "distill_alpha": FLAGS.distill_alpha,
              "distill_temperature": FLAGS.distill_temperature,
              "elapsed_s": round(time.time() - started),
              **pipeline.ncm_scores(backbone, x, val_labels, FLAGS.num_episodes)}
    with open(log_path, "a") as handle:
      handle.write(json.dumps(record) + "\n")
    print("VAL", json.dumps(record), flush=True)
    return {}

  trainer.train(epoch_callback=callback)


if __name__ == "__main__":
  flags.mark_flag_as_required("out_dir")
  console.run(main)
