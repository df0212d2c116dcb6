"""Meta-train and evaluate a few-shot learner on LEO-format embeddings.

  python runner.py --model=leo --dataset_name=tieredImageNet --num_tr_examples_per_class=5
  python runner.py --preset=demo --checkpoint_path=runs/demo            # embedded synthetic data
  python runner.py --preset=demo --checkpoint_path=runs/demo --evaluation_mode

Training resumes from the latest checkpoint in --checkpoint_path. Evaluation
restores the best-validation checkpoint and writes result_test.json beside it.
"""

import json
import os
import sys

from absl import app
from absl import logging
import tensorflow as tf

import config  # defines the flags
from leo_suite import distribute
from leo_suite import errors
from leo_suite.data import embeddings
from leo_suite.data import episodes
from leo_suite.data import synthetic
from leo_suite.models import registry
from leo_suite.pretrain import baselines as baselines_lib
from leo_suite.training import evaluation
from leo_suite.training import trainer as trainer_lib

FLAGS = config.FLAGS
# Non-learned baselines evaluated on the same fixed episodes (--baselines).
BASELINES = {"ncm": baselines_lib.ncm_cosine_logits,
             "logreg": baselines_lib.logistic_regression_logits}
RELEASED = ("miniImageNet", "tieredImageNet")


def _how_to_get(dataset_name):
  if dataset_name in RELEASED:
    return ("LEO's released embeddings are not bundled: run `python "
            "scripts/download_embeddings.py --dest embeddings` (needs internet; offline, "
            "pass --archive path/to/embeddings.zip), or pass "
            "--data_path=<directory holding miniImageNet/ and tieredImageNet/>. "
            "To try the suite without them use --dataset_name=synthetic.")
  found = sorted(d for d in os.listdir(FLAGS.data_path)
                 if os.path.isdir(os.path.join(FLAGS.data_path, d))) if os.path.isdir(
                     FLAGS.data_path) else []
  return f"datasets found under {FLAGS.data_path}: {found or 'none'}"


def load_splits(names):
  """Loads and cross-checks the named splits (train merges val with --train_on_val)."""
  if FLAGS.dataset_name == "tieredImageNet" and FLAGS.embedding_crop != "center":
    raise errors.ConfigError(
        "tieredImageNet has only the center crop in LEO's release; use --embedding_crop=center")
  if FLAGS.dataset_name == synthetic.DATASET_NAME:
    synthetic.ensure(FLAGS.data_path)
  hint = _how_to_get(FLAGS.dataset_name)

  def load(split):
    return embeddings.load_dataset_split(FLAGS.data_path, FLAGS.dataset_name,
                                         FLAGS.embedding_crop, split, hint)

  loaded = {name: load(name) for name in names}
  if "train" in loaded and FLAGS.train_on_val:
    loaded["train"] = embeddings.merge_splits([loaded["train"], loaded.get("val") or load("val")])
  embeddings.check_compatible(list(loaded.values()))
  return loaded


def build_learner(dim, strategy):
  tf.random.set_seed(FLAGS.seed)
  with strategy.scope():  # distributed variables under mirrored / multi_worker
    return registry.build(FLAGS.model, config.learner_config(), FLAGS.num_classes, dim,
                          FLAGS.dtype)


def make_strategy():
  """The --distribution_strategy (--num_cpu_devices was applied in main)."""
  return distribute.make_strategy(FLAGS.distribution_strategy,
                                  distribute.parse_devices(FLAGS.devices))


def train_config():
  return trainer_lib.TrainConfig(
      checkpoint_path=FLAGS.checkpoint_path, num_steps_limit=FLAGS.num_steps_limit,
      metatrain_batch_size=FLAGS.metatrain_batch_size,
      metavalid_batch_size=FLAGS.metavalid_batch_size,
      num_val_batches=FLAGS.num_val_batches, checkpoint_steps=FLAGS.checkpoint_steps,
      outer_lr=FLAGS.outer_lr, gradient_threshold=FLAGS.gradient_threshold,
      gradient_norm_threshold=FLAGS.gradient_norm_threshold, seed=FLAGS.seed,
      eval_seed=FLAGS.eval_seed, log_steps=FLAGS.log_steps, jit_compile=FLAGS.jit_compile)


def eval_spec(split):
  k = FLAGS.num_tr_examples_per_class
  v = FLAGS.eval_num_query or episodes.all_remaining_queries(split, k)
  return episodes.EpisodeSpec(FLAGS.num_classes, k, v)


def run_config(splits, dim):
  identity = {"model": FLAGS.model, "dataset_name": FLAGS.dataset_name,
              "embedding_crop": FLAGS.embedding_crop, "train_on_val": FLAGS.train_on_val,
              "num_classes": FLAGS.num_classes,
              "num_tr_examples_per_class": FLAGS.num_tr_examples_per_class,
              "dtype": FLAGS.dtype, "seed": FLAGS.seed, "embedding_dim": dim,
              "learner": json.loads(json.dumps(config.learner_config().__dict__))}
  hashes = {}
  for split in splits.values():
    hashes.update(split.source)
  return {"identity": identity, "flags": config.flag_values(), "data_sha256": hashes,
          "code_version": evaluation.code_version()}


def check_flags():
  positive = ["num_classes", "num_tr_examples_per_class", "num_val_examples_per_class",
              "metatrain_batch_size", "metavalid_batch_size", "metatest_batch_size",
              "num_steps_limit", "checkpoint_steps", "num_val_batches", "num_test_tasks",
              "log_steps"]
  for name in positive:
    if FLAGS[name].value < 1:
      raise errors.ConfigError(f"--{name}={FLAGS[name].value}: must be at least 1")
  if FLAGS.eval_num_query < 0:
    raise errors.ConfigError(f"--eval_num_query={FLAGS.eval_num_query}: must be >= 0")
  unknown = [b for b in FLAGS.baselines.split(",") if b and b not in BASELINES]
  if unknown:
    raise errors.ConfigError(f"--baselines: unknown {unknown}; choose from {sorted(BASELINES)}")
  if FLAGS.outer_lr <= 0:
    raise errors.ConfigError(f"--outer_lr={FLAGS.outer_lr}: must be positive")


def train():
  splits = load_splits(["train", "val"])
  dim = splits["train"].dim
  spec = episodes.EpisodeSpec(FLAGS.num_classes, FLAGS.num_tr_examples_per_class,
                              FLAGS.num_val_examples_per_class)
  dtype = FLAGS.dtype
  train_sampler = episodes.EpisodeSampler(splits["train"], spec, "meta-training", dtype)
  val_sampler = episodes.EpisodeSampler(splits["val"], eval_spec(splits["val"]),
                                        "meta-validation", dtype)
  strategy = make_strategy()
  learner = build_learner(dim, strategy)
  trainer = trainer_lib.Trainer(learner, train_config(), train_sampler, val_sampler,
                                run_config(splits, dim), strategy=strategy)
  logging.info("Training %s on %s/%s (D=%d, %d train classes, %d-way %d-shot, %d queries) "
               "into %s", FLAGS.model, FLAGS.dataset_name, FLAGS.embedding_crop, dim,
               splits["train"].num_classes, spec.num_ways, spec.num_shots,
               spec.num_queries, FLAGS.checkpoint_path)
  trainer.train()


def evaluate():
  splits = load_splits(["test"])
  test = splits["test"]
  spec = eval_spec(test)
  sampler = episodes.EpisodeSampler(test, spec, "meta-test", FLAGS.dtype)
  strategy = make_strategy()
  learner = build_learner(test.dim, strategy)
  trainer = trainer_lib.Trainer(learner, train_config(), sampler, strategy=strategy)
  path = trainer.restore_for_evaluation()
  dataset = sampler.fixed_set(FLAGS.eval_seed, FLAGS.num_test_tasks, FLAGS.metatest_batch_size)
  result = trainer.evaluator.evaluate(dataset)
  header = (f"{spec.num_ways}-way {spec.num_shots}-shot, {spec.num_queries} queries/class, "
            f"{FLAGS.dataset_name} test")
  print(f"{FLAGS.model:>8s} test accuracy ({header}): {result.as_percent()}")
  baselines = {}
  for name in [b for b in FLAGS.baselines.split(",") if b]:
    baseline = evaluation.evaluate_baseline(BASELINES[name], dataset)
    baselines[name] = {"accuracy": baseline.accuracy, "ci95": baseline.ci95,
                       "num_tasks": baseline.num_tasks}
    print(f"{name:>8s} test accuracy ({header}): {baseline.as_percent()}")
  out = os.path.join(FLAGS.checkpoint_path, "result_test.json")
  evaluation.write_result(out, result, config.flag_values(), test.source, "test",
                          {"checkpoint": path, "num_queries": spec.num_queries,
                           "baselines": baselines})
  print(f"result written to {out}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config.apply_preset()
    check_flags()
    if FLAGS.num_cpu_devices:  # before any TF op initialises the devices
      distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
    if FLAGS.deterministic:
      tf.config.experimental.enable_op_determinism()
    if FLAGS.evaluation_mode:
      evaluate()
    else:
      train()
  except errors.UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
  except (OSError, tf.errors.OpError) as exc:
    message = errors.environment_error(
        exc, FLAGS.checkpoint_path,
        f"The latest complete checkpoint in {FLAGS.checkpoint_path} is intact; rerun the "
        "same command to resume.", "--checkpoint_path")
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: the latest complete checkpoint is kept; rerun to resume",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
