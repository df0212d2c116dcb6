"""Validation-only probe of episodic fine-tuning of a pretrained backbone (issue 12).

Meta-Baseline (Chen et al., ICCV 2021): after classifier pretraining, train
the whole backbone on episodes of the meta-train classes with the cosine
nearest-class-mean classifier, logits tau * cos(f(x_q), mean_k f(x_s)) with a
learned tau (initialised to 10), SGD with momentum 0.9. Here on Omniglot-small:
episodes of the 708 rotation classes, the pretraining's affine augmentation,
and cosine NCM on the meta-val alphabets (Early_Aramaic, Tagalog) at 5w1s /
5w5s / 20w1s on the feature sweep's fixed episodes, before any step and
every --eval_every steps. Latin is never loaded.

  python experiments/omniglot_episodic_sweep.py --run=runs/sweep/affine_e30_s0 \
      --out=runs/sweep/episodic_20w1s --num_ways=20 --num_shots=1 --steps=600

Appends one JSON line per evaluation to <out>/val.jsonl and prints it; the
fine-tuned backbone is not kept (the lever was not adopted).
"""

import json
import os
import time

from leo_suite import console

tf = console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from leo_suite.data import image_views  # pylint: disable=wrong-import-position
from leo_suite.data import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.models import backbones  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_string("run", None, "A finished pretraining run (its backbone/ folder is read).")
flags.DEFINE_string("out", None, "Folder for val.jsonl.")
flags.DEFINE_integer("num_ways", 20, "Classes per training episode.")
flags.DEFINE_integer("num_shots", 1, "Support images per class.")
flags.DEFINE_integer("num_queries", 15, "Query images per class.")
flags.DEFINE_float("learning_rate", 1e-3, "SGD learning rate (Meta-Baseline: 0.001).")
flags.DEFINE_integer("steps", 600, "Episodes of fine-tuning.")
flags.DEFINE_integer("eval_every", 100, "Validation interval (steps).")
flags.DEFINE_bool("batch_norm_training", True,
                  "Batch statistics of each episode (True) or the pretrained running ones.")
flags.DEFINE_integer("num_episodes", 1000, "Fixed val episodes per setting.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  _, by_class, split_classes, _ = pipeline.omniglot_small()
  backbone, description = backbones.load_backbone(os.path.join(FLAGS.run, "backbone"))
  size = int(description["image_size"])
  options = images_lib.DecodeOptions(size, 1, (105, 105), ("1", "L"))
  images, labels, _ = pipeline.decode_classes(by_class, split_classes["train"], options)
  images, labels = image_views.rotated_copies(images, labels)
  val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"], options)
  invert = bool(description["invert"])
  train_x = image_views.preprocess(images, invert).numpy()
  val_x = image_views.preprocess(val_images, invert)
  rows_of = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
  ways, shots, queries = FLAGS.num_ways, FLAGS.num_shots, FLAGS.num_queries

  log_tau = tf.Variable(np.log(10.0), dtype=tf.float32)
  optimizer = tf.keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9)
  variables = backbone.trainable_variables + [log_tau]
  query_labels = tf.repeat(tf.range(ways), queries)

  @tf.function
  def step(x, seed):
    x = image_views.affine_batch(x, seed, 2.0)
    with tf.GradientTape() as tape:
      features = tf.reshape(backbone(x, training=FLAGS.batch_norm_training),
                            [ways, shots + queries, -1])
      prototypes = tf.math.l2_normalize(tf.reduce_mean(features[:, :shots], 1), -1)
      query = tf.math.l2_normalize(tf.reshape(features[:, shots:], [ways * queries, -1]), -1)
      logits = tf.exp(log_tau) * tf.matmul(query, prototypes, transpose_b=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(query_labels, logits))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  os.makedirs(FLAGS.out, exist_ok=True)
  log_path = os.path.join(FLAGS.out, "val.jsonl")
  settings = {"run": FLAGS.run, "num_ways": ways, "num_shots": shots,
              "learning_rate": FLAGS.learning_rate,
              "batch_norm_training": FLAGS.batch_norm_training}

  def record(values):
    line = json.dumps({**settings, **values})
    print("VAL", line, flush=True)
    with open(log_path, "a") as handle:
      handle.write(line + "\n")

  val_scores = lambda: pipeline.ncm_scores(backbone, val_x, val_labels, FLAGS.num_episodes)
  record({"step": 0, **val_scores()})
  rng, started, losses = np.random.default_rng(0), time.time(), []
  for number in range(1, FLAGS.steps + 1):
    classes = rng.choice(len(rows_of), ways, replace=False)
    x = np.concatenate([train_x[rng.choice(rows_of[c], shots + queries, replace=False)]
                        for c in classes])
    losses.append(float(step(tf.constant(x), tf.constant([number, 7], tf.int32))))
    if number % FLAGS.eval_every == 0:
      record({"step": number, "loss": round(float(np.mean(losses[-FLAGS.eval_every:])), 4),
              "tau": round(float(tf.exp(log_tau)), 2),
              "elapsed_s": round(time.time() - started), **val_scores()})


if __name__ == "__main__":
  flags.mark_flags_as_required(["run", "out"])
  console.run(main)
