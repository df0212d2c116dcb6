"""Where LEO's meta-training step spends its time (issue 32), at 1 and 5 shots.

  nice -n 19 python experiments/leo_step_breakdown.py [--steps=30]

The step the Trainer compiles (--jit_compile=auto): `loss_and_gradients` of
a 5-way meta-batch of 12 tasks (D = 640, 15 queries per class) under XLA with
its random draws made outside it (training/xla.py's `Predrawn`). Each row
times one sub-graph under tf.function (the benchmark's `time_steps`, ms per
call, the fastest of three windows):
  step          the whole Predrawn step (draws + compiled loss and gradients)
  draws         the draws alone (the plain graph Predrawn runs first)
  compiled      the XLA loss and gradients on pre-drawn numbers (no draws)
  forward       the XLA meta-loss alone on pre-drawn numbers
  T_w=0         `compiled` without the 5 fine-tuning steps
  T_z=1         `compiled` with 1 latent step instead of 5
  encoder       XLA: dropout + encoder + relation network, forward and gradient
The loops' shares are differences: fine-tuning = compiled - (T_w=0), the 4
latent steps beyond the first = compiled - (T_z=1); backward = compiled -
forward. Run it on a quiet machine; the shares, not the absolute figures,
carry over.
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

flags.DEFINE_integer("steps", 30, "Timed calls per row.")
flags.DEFINE_string("shots", "1,5", "comma list of K")
FLAGS = flags.FLAGS


def gradients_of(learner):
  def compute(e, seed):
    return learner.loss_and_gradients(e, seed=seed)[:2]
  return compute


def replayed(function, draws):
  """`function` compiled with XLA on the fixed pre-drawn `draws`."""
  def call(e, seed, draws=draws):
    with base.replaying_draws(draws):
      return function(e, seed)
  return tf.function(call, jit_compile=True)


def ms(function, episodes):
  """The fastest of three timed windows (the machine may be shared)."""
  return min(1000 / time_steps(function, episodes, FLAGS.steps) for _ in range(3))


def breakdown(shots, rng):
  episodes = itertools.repeat(flops.random_episode(shots, rng))
  seed = tf.constant([0, 0])
  rows = {}
  learner = leo.LEO(leo.Config(), 5, 640)
  compute = gradients_of(learner)
  rows["step"] = ms(tf.function(xla_lib.Predrawn(compute)), episodes)
  draw_only = tf.function(lambda e, s: xla_lib.record_draws(compute, e, s))
  draws = draw_only(next(episodes), seed)
  rows["draws"] = ms(draw_only, episodes)
  rows["compiled"] = ms(replayed(compute, draws), episodes)
  forward = lambda e, s: learner.meta_loss(e, training=True, seed=s)[0]
  rows["forward"] = ms(replayed(forward, draws), episodes)
  for name, overrides in (("T_w=0", {"finetuning_unroll_length": 0}),
                          ("T_z=1", {"inner_unroll_length": 1})):
    variant = leo.LEO(leo.Config(**overrides), 5, 640)
    variant_compute = gradients_of(variant)
    recorded = tf.function(lambda e, s, c=variant_compute: xla_lib.record_draws(c, e, s))(
        next(episodes), seed)
    rows[name] = ms(replayed(variant_compute, recorded), episodes)

  def encoder(e, s):
    with tf.GradientTape() as tape:
      out = learner.encode(e.support_x, True, base.SeedStream(s))
      total = tf.reduce_sum(tf.square(out))
    return tape.gradient(total, [learner.encoder_w] + learner.relation_ws)
  encoder_draws = tf.function(lambda e, s: xla_lib.record_draws(encoder, e, s))(
      next(episodes), seed)
  rows["encoder"] = ms(replayed(encoder, encoder_draws), episodes)
  numbers = sum(int(tf.size(d)) for d in draws)
  return rows, numbers


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  print(f"load average {os.getloadavg()[0]:.2f}")
  for shots in [int(s) for s in FLAGS.shots.split(",")]:
    rows, numbers = breakdown(shots, rng)
    print(f"K={shots}: {numbers / 1e6:.3f}M drawn values; ms per call: " +
          ", ".join(f"{k} {v:.2f}" for k, v in rows.items()), flush=True)
    derived = {"fine-tuning (5 steps)": rows["compiled"] - rows["T_w=0"],
               "latent steps 2-5": rows["compiled"] - rows["T_z=1"],
               "backward": rows["compiled"] - rows["forward"]}
    print(f"K={shots} derived ms: " + ", ".join(f"{k} {v:.2f}" for k, v in derived.items()),
          flush=True)
  print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  console.run(main)
