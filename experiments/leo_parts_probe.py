"""LEO's meta-training step in parts (xla.PartsStep, issue 32), at 1 and 5 shots.

  nice -n 19 python experiments/leo_parts_probe.py [--steps=40 --rounds=4]

Two tables, 5-way, meta-batch 12, D = 640, 15 queries (the benchmark's shapes):
  compiled   ms per call of the XLA loss and gradients on fixed pre-drawn
             numbers, for 12, 6 and 4 tasks per call, and 2 x 6 and 3 x 4
             calls side by side in one graph (the fastest of three windows);
  trainer    tasks/s of the Trainer's XLA step on the sampler's episodes with
             `training_step_examples` set to each of --examples (0: xla.WholeStep),
             in rounds that take the settings in turn.
Run it on a quiet machine; compare within one run only.
"""
import itertools
import os
import tempfile

from leo_suite import console

tf = console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite.bench import benchmark  # pylint: disable=wrong-import-position
from leo_suite.bench import timing  # pylint: disable=wrong-import-position
from leo_suite.bench import flops  # pylint: disable=wrong-import-position
from leo_suite.data import episodes  # pylint: disable=wrong-import-position
from leo_suite.models import base  # pylint: disable=wrong-import-position
from leo_suite.models import leo  # pylint: disable=wrong-import-position
from leo_suite.training import trainer as trainer_lib  # pylint: disable=wrong-import-position
from leo_suite.training import xla as xla_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("shots", "1,5", "comma list of K")
flags.DEFINE_string("examples", "0,100,150,50", "comma list of training_step_examples "
                    "for the trainer table (0: one compiled call, xla.WholeStep)")
flags.DEFINE_integer("steps", 40, "Timed steps per window or round.")
flags.DEFINE_integer("rounds", 4, "Rounds of the trainer table.")
FLAGS = flags.FLAGS


def compiled_table(shots):
  """ms per call: the compiled loss and gradients on pre-drawn numbers."""
  learner = leo.LEO(leo.Config(), benchmark.NUM_WAYS, benchmark.DIM)
  compute = lambda e, s: learner.loss_and_gradients(e, seed=s)[:2]
  seed = tf.constant([0, 0])
  rows = {}
  for tasks in (12, 6, 4):
    episode = flops.random_episode(shots, np.random.default_rng(0), batch=tasks)
    draws = tf.function(lambda e, s: xla_lib.record_draws(compute, e, s))(episode, seed)

    def replayed(args, draws):
      with base.replaying_draws(draws):
        return compute(*args)
    call = tf.function(replayed, jit_compile=True, autograph=False)
    parts = benchmark.BATCH // tasks
    variants = {f"{tasks}": tf.function(lambda e, s, c=call, d=draws: c((e, s), d))}
    if parts > 1:
      variants[f"{parts} x {tasks} side by side"] = tf.function(
          lambda e, s, c=call, d=draws, p=parts: [c((e, s + i), d) for i in range(p)])
    for name, function in variants.items():
      rows[name] = min(1000 / timing.time_steps(function, itertools.repeat(episode),
                                                   FLAGS.steps) for _ in range(3))
  return rows


def trainer_table(shots):
  """tasks/s of the Trainer's XLA step per training_step_examples, in rounds."""
  spec = episodes.EpisodeSpec(benchmark.NUM_WAYS, shots, benchmark.TRAIN_QUERIES)
  sampler = episodes.EpisodeSampler(benchmark.synthetic_split(64, 40), spec)
  steps = {}
  for examples in (int(n) for n in FLAGS.examples.split(",")):
    run = benchmark.make_run("leo", tempfile.mkdtemp(), num_tr_examples_per_class=shots,
                             num_val_examples_per_class=benchmark.TRAIN_QUERIES,
                             metatrain_batch_size=benchmark.BATCH, jit_compile=True)
    learner = run.build_learner()
    learner.training_step_examples = examples or None
    trainer = trainer_lib.Trainer(learner, trainer_lib.TrainConfig.from_run(run), sampler)
    steps[examples] = (trainer._train_step,  # pylint: disable=protected-access
                       iter(sampler.dataset(0, benchmark.BATCH)))
  rows = {examples: [] for examples in steps}
  for _ in range(FLAGS.rounds):
    for examples, (step, data) in steps.items():
      rows[examples].append(round(timing.time_steps(step, data, FLAGS.steps) *
                                  benchmark.BATCH))
  return rows


def main(argv):
  del argv
  print(f"load average {os.getloadavg()[0]:.2f}")
  for shots in [int(s) for s in FLAGS.shots.split(",")]:
    compiled = compiled_table(shots)
    print(f"K={shots} compiled ms per call: " +
          ", ".join(f"{k}: {v:.2f}" for k, v in compiled.items()), flush=True)
    trainer = trainer_table(shots)
    print(f"K={shots} trainer tasks/s by training_step_examples: " +
          ", ".join(f"{k}: {v}" for k, v in trainer.items()), flush=True)
  print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  console.run(main)
