"""Meta-train and evaluate a few-shot learner on LEO-format embeddings.

  python runner.py --model=leo --dataset_name=tieredImageNet --num_tr_examples_per_class=5
  python runner.py --preset=demo --checkpoint_path=runs/demo            # embedded synthetic data
  python runner.py --checkpoint_path=runs/demo --evaluation_mode          # the run's own settings
  python runner.py --preset=demo --checkpoint_path=runs/d2 --evaluate_after_training  # both

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
from leo_suite.data import embeddings  # pylint: disable=wrong-import-position
from leo_suite.data import episodes  # pylint: disable=wrong-import-position
from leo_suite.pretrain import baselines as baselines_lib  # pylint: disable=wrong-import-position
from leo_suite.training import layout  # pylint: disable=wrong-import-position
from leo_suite.training import run as run_lib  # pylint: disable=wrong-import-position
from leo_suite.training import rundata  # pylint: disable=wrong-import-position
from leo_suite.training import settings as settings_lib  # pylint: disable=wrong-import-position
from leo_suite.training import trainer as trainer_lib  # pylint: disable=wrong-import-position

FLAGS = config.FLAGS


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
  settings, overrides = settings_lib.resolve(saved, given, explicit, evaluation_mode)
  settings_lib.check_learner_flags(model, explicit, learner_flags)
  settings_lib.check(settings, baselines_lib.RUNNER_BASELINES)
  data_path = (record["data"]["data_path"] if record and not FLAGS["data_path"].present
               else FLAGS.data_path)
  for name, change in overrides.items():
    logging.info("--%s=%r overrides the run's %r", name, change["used"], change["saved"])
  return record, settings, overrides, data_path


def make_strategy():
  """The --distribution_strategy (--num_cpu_devices was applied in main)."""
  return distribute.make_strategy(FLAGS.distribution_strategy,
                                  distribute.parse_devices(FLAGS.devices))


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
  loaded = rundata.load_splits(settings, data_path, names)
  if record:
    rundata.check_data(record["data"], data_path, loaded, FLAGS.allow_data_change)
    run = run_lib.Run(FLAGS.checkpoint_path, dict(record, settings=settings))
  else:
    run = run_lib.Run.new(FLAGS.checkpoint_path, settings, loaded["train"].dim,
                          rundata.data_record(settings, data_path, loaded))
  train_split = loaded["train"]
  if settings["train_on_val"]:
    train_split = embeddings.merge_splits([loaded["train"], loaded["val"]])
  run.check_width(train_split)
  dtype = settings["dtype"]
  train_sampler = rundata.train_sampler(settings, data_path, train_split, run.train_spec(),
                                        dtype, record and record["data"],
                                        FLAGS.allow_data_change)
  val_sampler = episodes.EpisodeSampler(loaded["val"], run.eval_spec(loaded["val"]),
                                        "meta-validation", dtype)
  strategy = make_strategy()
  learner = run.build_learner(strategy)
  trainer = trainer_lib.Trainer(learner, trainer_lib.TrainConfig.from_run(run),
                                train_sampler, val_sampler, strategy=strategy,
                                evaluator=run.evaluator(learner, strategy))
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
  if FLAGS.evaluate_after_training:
    evaluate()


def evaluate():
  record, settings, overrides, data_path = resolve(evaluation_mode=True)
  run = run_lib.Run(FLAGS.checkpoint_path, dict(record, settings=settings))
  loaded = rundata.load_splits(settings, data_path, ["test"])
  data = rundata.check_data(record["data"], data_path, loaded, FLAGS.allow_data_change)
  return run_lib.score_test(run, loaded["test"], make_strategy, baselines_lib.RUNNER_BASELINES,
                            data, overrides)


def _environment_error_recovery():
  latest = layout.RunDirectory(FLAGS.checkpoint_path).latest_checkpoint() if os.path.isdir(
      FLAGS.checkpoint_path) else None
  if latest:
    return (f"The latest complete checkpoint ({os.path.basename(latest)}) is intact; fix "
            "that, then rerun the same command to resume.")
  return "No checkpoint was written; fix that, then rerun the same command."


def train_or_evaluate(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.num_cpu_devices:  # before any TF op initialises the devices
    distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  with run_lib.Run.lock(FLAGS.checkpoint_path, create=not FLAGS.evaluation_mode,
                        log=logging.warning):
    if FLAGS.evaluation_mode:
      evaluate()
    else:
      train()


main = console.guarded(
    train_or_evaluate, where=lambda: FLAGS.checkpoint_path,
    recovery=_environment_error_recovery, location_flag="--checkpoint_path",
    interrupted="interrupted: the latest complete checkpoint is kept; rerun to resume")

if __name__ == "__main__":
  console.run(main)
