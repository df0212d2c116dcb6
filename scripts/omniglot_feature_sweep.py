"""Validation-only feature sweep for Omniglot-small (issue 12).

Pretrains one Conv-4 variant on the meta-train alphabets and scores cosine
nearest class mean on the meta-val alphabets (Early_Aramaic, Tagalog) at
5w1s / 5w5s / 20w1s on fixed episodes after the epochs in --eval_epochs (and
at the end). Latin (meta-test) is never loaded here.

  nice -n 10 .venv/bin/python scripts/omniglot_feature_sweep.py \
      --out_dir=runs/sweep/affine_e30_s0 --augment=affine --epochs=30

Appends one JSON line per evaluation to <out_dir>/val.jsonl and prints it.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import baselines  # pylint: disable=wrong-import-position
from leo_suite.pretrain import cli  # pylint: disable=wrong-import-position
from leo_suite.pretrain import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position
from leo_suite.pretrain import train as train_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("out_dir", None, "Run folder.")
flags.DEFINE_integer("epochs", 10, "Pretraining epochs.")
flags.DEFINE_string("backbone", "conv4", "Backbone (leo_suite/pretrain/backbones.py).")
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


def val_scores(backbone, x, labels, num_episodes, post="l2"):
  features = np.concatenate([backbone(x[i:i + 512], training=False).numpy()
                             for i in range(0, len(labels), 512)])
  split = embeddings_lib.split_from_labels(features, labels)
  return {f"{w}w{s}s": round(baselines.evaluate(baselines.ncm_cosine_logits, split, w, s, 15,
                                                 num_episodes, 0)["accuracy"], 2)
          for w, s in pipeline.SETTINGS}


def main(argv):
  del argv
  omniglot_dir = images_lib.default_omniglot_dir()
  archives = [os.path.join(omniglot_dir, n) for n in
              ("images_background_small1.zip", "images_background_small2.zip")]
  by_class, split_classes, _ = images_lib.load_labelled_splits(
      archives, "omniglot_small", omniglot_dir)
  options = images_lib.DecodeOptions(FLAGS.image_size, 1, (105, 105), ("1", "L"))
  images, labels, _ = pipeline.decode_classes(by_class, split_classes["train"], options)
  val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"], options)
  config = train_lib.PretrainConfig(backbone=FLAGS.backbone, epochs=FLAGS.epochs,
                                    image_size=FLAGS.image_size,
                                    augment=FLAGS.augment, max_shift=FLAGS.max_shift,
                                    head=FLAGS.head,
                                    learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
                                    teacher=FLAGS.teacher, distill_alpha=FLAGS.distill_alpha,
                                    distill_temperature=FLAGS.distill_temperature)
  trainer = train_lib.Pretrainer(config, images, labels, FLAGS.out_dir,
                                 class_names=split_classes["train"])
  x = train_lib.preprocess(val_images, config.invert)
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
              **val_scores(backbone, x, val_labels, FLAGS.num_episodes)}
    with open(log_path, "a") as handle:
      handle.write(json.dumps(record) + "\n")
    print("VAL", json.dumps(record), flush=True)
    return {}

  trainer.train(epoch_callback=callback)


if __name__ == "__main__":
  flags.mark_flag_as_required("out_dir")
  cli.run(main)
