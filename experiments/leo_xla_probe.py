"""Where LEO's XLA step loses time (issue 14): one meta-training step, plain vs XLA.

  python experiments/leo_xla_probe.py [--steps=30]

Times `loss_and_gradients` of a 5-way meta-batch of 12 tasks (D = 640, 15
queries) under tf.function with and without jit_compile (the benchmark's
`time_steps`), for ablations that isolate the suspects: the stateless
dropout, the latent/weight sampling (training=False skips both), K = 1 vs 5,
and the stateless RNG algorithm (`base.RNG_ALG`: 'auto_select', TF's default
and what the learners used before, against 'philox', what they use now).
Prints steps/s and the XLA/plain ratio per row, the XLA step with its draws
made outside XLA (training/xla.py's `Predrawn`, what the Trainer compiles),
and the draws alone: how many numbers a step draws and how long TF's
generators take to draw them (the floor of a step with sampling and dropout,
with or without XLA). Run it on a quiet machine.
"""
import itertools
import os

from leo_suite import console

tf = console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite.bench.timing import time_steps  # pylint: disable=wrong-import-position
from leo_suite.bench import flops  # pylint: disable=wrong-import-position
from leo_suite.models import base  # pylint: disable=wrong-import-position
from leo_suite.models import leo  # pylint: disable=wrong-import-position
from leo_suite.training import xla as xla_lib  # pylint: disable=wrong-import-position

flags.DEFINE_integer("steps", 30, "Timed steps per row.")
flags.DEFINE_string("rng_algs", "auto_select,philox",
                    "comma list of stateless RNG algorithms to try")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = [("default", {}, True), ("dropout 0", {"dropout_rate": 0.0}, True),
          ("training=False (no dropout, no sampling)", {}, False)]
  print(f"load average {os.getloadavg()[0]:.2f}")
  for alg in FLAGS.rng_algs.split(","):
    base.RNG_ALG = alg   # read by the learners at trace time
    for shots in (1, 5):
      episodes = itertools.repeat(flops.random_episode(shots, rng))
      for name, overrides, training in rows:
        learner = leo.LEO(leo.Config(**overrides), 5, 640)

        def compute(e, seed, learner=learner, training=training):
          with tf.GradientTape() as tape:
            loss, _ = learner.meta_loss(e, training=training, seed=seed)
          return loss, tape.gradient(loss, learner.trainable_variables,
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO)
        plain = time_steps(tf.function(compute), episodes, FLAGS.steps)
        xla = time_steps(tf.function(compute, jit_compile=True), episodes, FLAGS.steps)
        predrawn = time_steps(tf.function(xla_lib.Predrawn(compute)), episodes, FLAGS.steps)
        draw_only = tf.function(lambda e, seed, compute=compute: xla_lib.record_draws(
            compute, e, seed) or [tf.zeros([])])
        draws = draw_only(next(episodes), tf.constant([0, 0]))
        numbers = sum(int(tf.size(d)) for d in draws) if training else 0
        draw_rate = time_steps(draw_only, episodes, FLAGS.steps)
        print(f"{alg:11s} K={shots} {name:42s} plain {plain:7.1f} st/s  XLA {xla:7.1f} "
              f"st/s  XLA/plain {xla / plain:5.2f}  XLA predrawn {predrawn:7.1f} st/s "
              f"({predrawn / plain:5.2f})  draws {numbers / 1e6:.2f}M numbers in "
              f"{1000 / draw_rate:6.1f} ms", flush=True)
  print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  console.run(main)
