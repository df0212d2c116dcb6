"""Meta-train and evaluate a few-shot learner on LEO-format embeddings.

  python runner.py --model=leo --dataset_name=tieredImageNet --num_tr_examples_per_class=5
  python runner.py --preset=demo --checkpoint_path=runs/demo            # embedded synthetic data
  python runner.py --checkpoint_path=runs/demo --evaluation_mode          # the run's own settings

The run directory (--checkpoint_path) is the record of the run: the first
training command writes its settings to config.json; resuming and evaluating
read them back. Flags given later must agree with it, except the ones that
only change how a command runs (steps limit, logging, test-set size and seed,
evaluation-time inner steps...), which are applied and recorded as overrides.
"""

import os
import signal
import sys

from leo_suite import console

tf = console.import_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

import config  # pylint: disable=g-import-not-at-top,wrong-import-position
from leo_suite import distribute  # pylint: disable=wrong-import-position
from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite import progress  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings  # pylint: disable=wrong-import-position
from leo_suite.data import episodes  # pylint: disable=wrong-import-position
from leo_suite.pretrain import baselines as baselines_lib  # pylint: disable=wrong-import-position
from leo_suite.training import evaluation  # pylint: disable=wrong-import-position
from leo_suite.training import run as run_lib  # pylint: disable=wrong-import-position
from leo_suite.training import trainer as trainer_lib  # pylint: disable=wrong-import-position
from leo_suite.training import xla  # pylint: disable=wrong-import-position

FLAGS = config.FLAGS
# Non-learned baselines evaluated on the same fixed episodes (--baselines).
BASELINES = {"ncm": baselines_lib.NCMCosine, "logreg": baselines_lib.LogisticRegression}
POSITIVE = ("num_classes", "num_tr_examples_per_class", "num_val_examples_per_class",
            "metatrain_batch_size", "metavalid_batch_size", "metatest_batch_size",
            "num_steps_limit", "checkpoint_steps", "num_val_batches", "num_test_tasks",
            "log_steps")


def check_settings(settings):
  for name in POSITIVE:
    if settings[name] < 1:
      raise errors.ConfigError(f"--{name}={settings[name]}: must be at least 1")
  trainer_lib.parse_profile_steps(settings.get("profile_steps", ""))  # ConfigError if bad
  if settings["eval_num_query"] < 0:
    raise errors.ConfigError(f"--eval_num_query={settings['eval_num_query']}: must be >= 0")
  unknown = [b for b in settings["baselines"].split(",") if b and b not in BASELINES]
  if unknown:
    raise errors.ConfigError(f"--baselines: unknown {unknown}; choose from {sorted(BASELINES)}")


def resolve(evaluation_mode):
  """(saved record or None, settings, overrides, data path) of this command."""
  record = run_lib.Run.read_record(FLAGS.checkpoint_path)
  if record is None and evaluation_mode:
    run_lib.Run.open(FLAGS.checkpoint_path)  # raises: not a run directory
  saved = record["settings"] if record else None
  model = saved["model"] if saved else FLAGS.model  # a different --model is a conflict
  preset_applied = config.apply_preset(model)
  # The release's presets carry LEO's settings: they apply to LEO runs only.
  learner_flags = config.all_learner_flags()
  explicit = config.explicit_flags(
      [n for n in preset_applied if learner_flags.get(n, model) == model])
  given = dict(config.settings(model), model=FLAGS.model)
  settings, overrides = run_lib.resolve(saved, given, explicit, evaluation_mode)
  run_lib.check_learner_flags(model, explicit, learner_flags)
  check_settings(settings)
  data_path = (record["data"]["data_path"] if record and not FLAGS["data_path"].present
               else FLAGS.data_path)
  for name, change in overrides.items():
    logging.info("--%s=%r overrides the run's %r", name, change["used"], change["saved"])
  return record, settings, overrides, data_path


def make_strategy():
  """The --distribution_strategy (--num_cpu_devices was applied in main)."""
  return distribute.make_strategy(FLAGS.distribution_strategy,
                                  distribute.parse_devices(FLAGS.devices))


def check_width(run, split):
  if split.dim != run.embedding_dim:
    raise errors.DataError(
        f"{next(iter(split.source))}: D={split.dim}, but the run was trained on D="
        f"{run.embedding_dim}; use the embeddings it was trained with")


class StopSignals:
  """SIGTERM / SIGINT during training: save at the next step boundary, then stop.

  A second signal of the same kind ends the process at once (SIGINT raises
  KeyboardInterrupt as usual).
  """

  def __init__(self):
    self.reason = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.reason:  # the second one: no more waiting
      signal.signal(signum, self._previous[signum])
      signal.raise_signal(signum)
      return
    self.reason = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the end of this step", self.reason)

  def __exit__(self, *exc_info):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def __call__(self):
    return self.reason


def train():
  record, settings, _, data_path = resolve(evaluation_mode=False)
  names = ["train", "val"] + (["test"] if settings["train_on_val"] else [])
  loaded = run_lib.load_splits(settings, data_path, names)
  if record:
    run_lib.check_data(record["data"], data_path, loaded, FLAGS.allow_data_change)
    run = run_lib.Run(FLAGS.checkpoint_path, dict(record, settings=settings))
  else:
    run = run_lib.Run.new(FLAGS.checkpoint_path, settings, loaded["train"].dim,
                          run_lib.data_record(settings, data_path, loaded))
  train_split = loaded["train"]
  if settings["train_on_val"]:
    train_split = embeddings.merge_splits([loaded["train"], loaded["val"]])
  check_width(run, train_split)
  dtype = settings["dtype"]
  train_sampler = episodes.EpisodeSampler(train_split, run.train_spec(), "meta-training", dtype)
  val_sampler = episodes.EpisodeSampler(loaded["val"], run.eval_spec(loaded["val"]),
                                        "meta-validation", dtype)
  strategy = make_strategy()
  learner = run.build_learner(strategy)
  trainer = trainer_lib.Trainer(learner, trainer_lib.TrainConfig.from_run(run),
                                train_sampler, val_sampler, strategy=strategy)
  if not record:
    run.create()  # the first write of a new run, after every check
  spec = run.train_spec()
  logging.info("Training %s on %s/%s (D=%d, %d train classes, %d-way %d-shot, %d queries) "
               "into %s", run.model, settings["dataset_name"], settings["embedding_crop"],
               run.embedding_dim, train_split.num_classes, spec.num_ways, spec.num_shots,
               spec.num_queries, run.directory)
  logging.info("XLA %s for %s's step (--jit_compile=%s)",
               "on" if trainer.config.jit_compile else "off", run.model, settings["jit_compile"])
  if settings["train_on_val"]:
    logging.warning(
        "--train_on_val: meta-training on train + val (%d classes). Validation still runs "
        "on val, as the release did, but those classes are now training classes: its "
        "accuracy is not held out, so no best/ checkpoint is kept and evaluation uses the "
        "last checkpoint. Test classes are disjoint from both.", train_split.num_classes)
  with StopSignals() as stop:
    step = trainer.train(stop_requested=stop)
  if trainer.stopped_by:
    print(f"stopped by {trainer.stopped_by}: checkpoint of step {step} saved in "
          f"{run.directory}; rerun the same command to resume", file=sys.stderr)
    sys.exit(128 + getattr(signal, trainer.stopped_by))


def evaluate():
  record, settings, overrides, data_path = resolve(evaluation_mode=True)
  run = run_lib.Run(FLAGS.checkpoint_path, dict(record, settings=settings))
  loaded = run_lib.load_splits(settings, data_path, ["test"])
  data = run_lib.check_data(record["data"], data_path, loaded, FLAGS.allow_data_change)
  test = loaded["test"]
  check_width(run, test)
  spec = run.eval_spec(test)
  sampler = episodes.EpisodeSampler(test, spec, "meta-test", settings["dtype"])
  strategy = make_strategy()
  learner, checkpoint = run.restored_learner(strategy)
  jit = xla.resolve(settings["jit_compile"], run.model)
  jit_readout = xla.resolve_readout(settings["jit_compile"], run.model)
  evaluator = evaluation.Evaluator(learner, strategy, jit_compile=jit, jit_readout=jit_readout)
  num_tasks = settings["num_test_tasks"]
  fixed = dict(sampler=sampler, seed=settings["eval_seed"], num_tasks=num_tasks,
               batch_size=settings["metatest_batch_size"],
               method=settings.get("evaluation_method", "auto"))
  method = evaluator.method(sampler, fixed["method"])
  logging.info("Scoring %d test tasks by the %s path (--evaluation_method=%s)", num_tasks,
               method, fixed["method"])
  result = evaluator.evaluate_fixed(progress=progress.Progress("test", num_tasks), **fixed)
  header = (f"{spec.num_ways}-way {spec.num_shots}-shot, {spec.num_queries} queries/class, "
            f"{settings['dataset_name']} test")
  print(f"{run.model:>8s} test accuracy ({header}): {result.as_percent()}")
  baselines = {}
  for name in [b for b in settings["baselines"].split(",") if b]:
    scorer = evaluation.Evaluator(BASELINES[name](spec.num_ways, run.embedding_dim))
    baseline = scorer.evaluate_fixed(**fixed)
    baselines[name] = baseline.as_dict()
    print(f"{name:>8s} test accuracy ({header}): {baseline.as_percent()}")
  out = "result_test.json"
  run.write_result(out, {"split": "test", **result.as_dict(), "checkpoint": checkpoint,
                         "num_queries": spec.num_queries, "baselines": baselines,
                         "evaluation_method": method, "jit_compile_used": jit,
                         "jit_readout_used": jit_readout and method == "table",
                         "settings": settings, "overrides": overrides, "data": data})
  print(f"result written to {os.path.join(run.directory, out)}")
  return result


def _environment_error_recovery():
  latest = run_lib.latest_checkpoint(FLAGS.checkpoint_path) if os.path.isdir(
      FLAGS.checkpoint_path) else None
  if latest:
    return (f"The latest complete checkpoint ({os.path.basename(latest)}) is intact; fix "
            "that, then rerun the same command to resume.")
  return "No checkpoint was written; fix that, then rerun the same command."


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if FLAGS.num_cpu_devices:  # before any TF op initialises the devices
      distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
    if FLAGS.deterministic:
      tf.config.experimental.enable_op_determinism()
    with run_lib.RunLock(FLAGS.checkpoint_path, log=logging.warning,
                         create=not FLAGS.evaluation_mode):
      if FLAGS.evaluation_mode:
        evaluate()
      else:
        train()
  except errors.UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
  except (OSError, tf.errors.OpError) as exc:
    message = errors.environment_error(exc, FLAGS.checkpoint_path,
                                       _environment_error_recovery(), "--checkpoint_path")
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
