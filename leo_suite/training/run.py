"""A run directory: the one record of how a model was trained.

`Run` is the only reader and writer of `<run>/config.json` and, through
`layout.RunDirectory`, the only code that knows where a run keeps its
checkpoints, best checkpoint and its record, results and lock. config.json
is written once, atomically, when a training run starts, and holds every
setting that defines the run (flag name -> value, learner and outer-loop
settings resolved; leo_suite/training/settings.py), the embedding width, the
data files' sha256 (rundata.py) and the code version. Evaluation, export,
prediction and comparison open a `Run` and rebuild the learner, the episode
shapes, the outer loop and the evaluator from it, never from flags.
"""

import contextlib
import datetime
import json
import os
import subprocess
from typing import Optional

from absl import logging
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite import report as report_lib
from leo_suite import runlock
from leo_suite.data import episodes
from leo_suite.models import registry
from leo_suite.training import evaluation
from leo_suite.training import layout
from leo_suite.training import optim
from leo_suite.training import settings as settings_lib
from leo_suite.training import xla
import leo_suite

FORMAT = 2


class Run(layout.RunDirectory):
  """One run directory: its saved settings, learner, episodes and checkpoints."""

  def __init__(self, directory: str, record: dict):
    super().__init__(directory)
    self.record = record

  # -- creating and opening ----------------------------------------------------------
  @staticmethod
  def read_record(directory: str) -> Optional[dict]:
    """The saved config.json, None for a new run; refuses what is not a run."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
      raise errors.ConfigError(
          f"--checkpoint_path={directory} is a file, not a run directory; choose a "
          "directory (a new one for a new run)")
    files = layout.RunDirectory(directory)
    path = files.config_path
    if not os.path.exists(path):
      if os.path.isdir(directory) and files.has_checkpoints():
        raise errors.ConfigError(
            f"{directory} holds checkpoints but no {layout.CONFIG_FILE}, so what they were "
            "trained with is unknown; use a new --checkpoint_path")
      return None
    try:
      with safeio.open_regular(path) as handle:   # a FIFO is refused (DataError), not read
        record = json.load(handle)
      if record.get("format") != FORMAT:
        raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
      record["settings"] = settings_lib.with_earlier_defaults(record["settings"])
      run = Run(directory, record)
      run.learner_config().validate()
      run.outer_config().validate()
      int(record["embedding_dim"])
    except errors.ConfigError as exc:
      raise errors.ConfigError(f"{path}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
      raise errors.ConfigError(
          f"{path}: cannot be read as a run configuration ({type(exc).__name__}: "
          f"{settings_lib.shorten(str(exc))}); it is damaged or from an incompatible leo-suite "
          "version: use a new --checkpoint_path") from None
    return record

  @classmethod
  def open(cls, directory: str) -> "Run":
    if not os.path.isdir(directory):
      raise errors.UserError(
          f"{directory}: no such run directory (pass the --checkpoint_path of a "
          "`python runner.py` training run)")
    record = cls.read_record(directory)
    if record is None:
      raise errors.UserError(
          f"{layout.RunDirectory(directory).config_path}: missing; {directory} is not a run "
          "directory (train first: `python runner.py --checkpoint_path=...`)")
    return cls(directory, record)

  @staticmethod
  def lock(directory: str, create: bool = False, log=None) -> runlock.RunLock:
    """The run's lock (a context manager, leo_suite/runlock.py): one command per run
    directory at a time, held by flock; `create` makes the directory of a new run."""
    return runlock.RunLock(directory, log=log, create=create)

  @classmethod
  @contextlib.contextmanager
  def opened(cls, directory: str, log=None):
    """`open`, holding the run's lock for the block."""
    with cls.lock(directory, log=log):
      yield cls.open(directory)

  @classmethod
  def new(cls, directory: str, settings: dict, embedding_dim: int, data: dict) -> "Run":
    """A run not yet written: validated, so `create` cannot fail on settings."""
    run = cls(directory, {"format": FORMAT, "settings": dict(settings),
                          "embedding_dim": int(embedding_dim), "data": data})
    run.learner_config().validate()
    run.outer_config().validate()
    return run

  def create(self):
    """Writes config.json once, atomically (the directory must hold no run)."""
    path = self.config_path
    if os.path.exists(path):
      raise errors.ConfigError(f"{path} exists already; a run's config is written once")
    self.record.update(code_version=code_version(),
                       created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"))
    os.makedirs(self.directory, exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(self.record, indent=1, sort_keys=True))

  # -- what the run is ----------------------------------------------------------------
  @property
  def settings(self) -> dict:
    return self.record["settings"]

  @property
  def model(self) -> str:
    return self.settings["model"]

  @property
  def embedding_dim(self) -> int:
    return int(self.record["embedding_dim"])

  @property
  def num_ways(self) -> int:
    return int(self.settings["num_classes"])

  def learner_config(self):
    return settings_lib.learner_config(self.model, self.settings)

  def outer_config(self) -> optim.OuterConfig:
    return settings_lib.outer_config(self.settings)

  @property
  def jit_compile(self) -> bool:
    """Whether the step and evaluation's adaptation compile (--jit_compile resolved)."""
    return xla.resolve(self.settings["jit_compile"], self.model)

  @property
  def jit_readout(self) -> bool:
    return xla.resolve_readout(self.settings["jit_compile"], self.model)

  def build_learner(self, strategy=None):
    """The learner, initialised from the run's seed (inside `strategy.scope()`)."""
    tf.random.set_seed(int(self.settings["seed"]))
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():  # learner registry
      return registry.build(self.model, self.learner_config(), self.num_ways,
                            self.embedding_dim, self.settings["dtype"])

  def train_spec(self) -> episodes.EpisodeSpec:
    s = self.settings
    return episodes.EpisodeSpec(s["num_classes"], s["num_tr_examples_per_class"],
                                s["num_val_examples_per_class"])

  def eval_spec(self, split) -> episodes.EpisodeSpec:
    """Validation/test episodes: V = eval_num_query, or all remaining images."""
    k = self.settings["num_tr_examples_per_class"]
    v = self.settings["eval_num_query"] or episodes.all_remaining_queries(split, k)
    return episodes.EpisodeSpec(self.settings["num_classes"], k, v)

  # -- checkpoints -------------------------------------------------------------------
  def checkpoint_for_evaluation(self) -> str:
    """best/ckpt, else the latest checkpoint (recovering a half-swapped best/)."""
    self.recover_best()
    path = self.best_checkpoint() or self.latest_checkpoint()
    if not path:
      raise errors.UserError(
          f"{self.directory}: no checkpoint to evaluate; train first (run without "
          "--evaluation_mode)")
    return path

  def restore(self, learner, path: Optional[str] = None) -> str:
    """Restores the learner's weights (best, else latest); returns the path."""
    path = path or self.checkpoint_for_evaluation()
    try:
      status = tf.train.Checkpoint(learner=learner).read(path)
      status.expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
      first = str(exc).strip().splitlines()[0][:300]
      raise errors.UserError(
          f"{path}: does not match {self.config_path} (model "
          f"{self.model!r}, {self.num_ways}-way, D={self.embedding_dim}): {first}") from None
    return path

  def restored_learner(self, strategy=None):
    """(learner with the evaluation checkpoint's weights, checkpoint path)."""
    learner = self.build_learner(strategy)
    return learner, self.restore(learner)

  def evaluator(self, learner, strategy=None) -> evaluation.Evaluator:
    """The Evaluator of `learner` with the run's XLA settings."""
    return evaluation.Evaluator(learner, strategy, jit_compile=self.jit_compile,
                                jit_readout=self.jit_readout)

  def check_width(self, split):
    """DataError unless `split`'s embeddings are as wide as the run's."""
    if split.dim != self.embedding_dim:
      raise errors.DataError(
          f"{next(iter(split.source))}: D={split.dim}, but the run was trained on D="
          f"{self.embedding_dim}; use the embeddings it was trained with")

  # -- results -----------------------------------------------------------------------
  def write_result(self, split: str, payload: dict) -> str:
    """Writes result_<split>.json atomically with the run's config beside the
    figures; returns its path."""
    payload = dict(payload, run_config=self.record, code_version=code_version())
    path = self.result_path(split)
    fileio.atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))
    return path


def score_test(run: Run, test, make_strategy, baselines, data: dict, overrides: dict,
               report=print) -> evaluation.Result:
  """Scores the run's evaluation checkpoint, then each of its --baselines, on the
  same fixed test tasks of `test`; writes result_test.json.

  baselines: --baselines name -> factory(num_ways, embedding_dim) of the
  non-learned baselines (pretrain/baselines.py's RUNNER_BASELINES), scored as
  learners by an Evaluator without XLA; make_strategy() gives the
  tf.distribute strategy, once the test tasks are set up; `report` gets one line per
  method and the result's path; data/overrides: what the result records.
  """
  settings = run.settings
  run.check_width(test)
  spec = run.eval_spec(test)
  sampler = episodes.EpisodeSampler(test, spec, "meta-test", settings["dtype"])
  strategy = make_strategy()
  learner, checkpoint = run.restored_learner(strategy)
  evaluator = run.evaluator(learner, strategy)
  num_tasks = settings["num_test_tasks"]
  fixed = dict(sampler=sampler, seed=settings["eval_seed"], num_tasks=num_tasks,
               batch_size=settings["metatest_batch_size"],
               method=settings.get("evaluation_method", "auto"))
  method = evaluator.method(sampler, fixed["method"])
  logging.info("Scoring %d test tasks by the %s path (--evaluation_method=%s)", num_tasks,
               method, fixed["method"])
  result = evaluator.evaluate_fixed(progress=evaluation.Progress("test", num_tasks), **fixed)
  header = (f"{spec.num_ways}-way {spec.num_shots}-shot, {spec.num_queries} queries/class, "
            f"{settings['dataset_name']} test")
  report(f"{run.model:>8s} test accuracy ({header}): {result.as_percent()}")
  best = run.best_record()
  best_step = int(best["step"]) if best else None
  if report_lib.untrained(best_step):
    report(f"warning: {run.model}'s chosen checkpoint is step 0, its initialisation: "
           "meta-training never beat it on validation, so this figure is the untrained "
           "learner's")
  scored = {}
  for name in settings_lib.baseline_names(settings):
    scorer = evaluation.Evaluator(baselines[name](spec.num_ways, run.embedding_dim))
    baseline = scorer.evaluate_fixed(**fixed)
    scored[name] = baseline.as_dict()
    report(f"{name:>8s} test accuracy ({header}): {baseline.as_percent()}")
  path = run.write_result("test", {
      "split": "test", **result.as_dict(), "checkpoint": checkpoint, "best_step": best_step,
      "chosen_initialisation": report_lib.untrained(best_step),
      "num_queries": spec.num_queries, "baselines": scored, "evaluation_method": method,
      "jit_compile_used": run.jit_compile,
      "jit_readout_used": run.jit_readout and method == "table",
      "settings": settings, "overrides": overrides, "data": data})
  report(f"result written to {path}")
  return result


def code_version():
  """Package version plus the git commit of the checkout, when there is one."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(leo_suite.__file__)))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return leo_suite.__version__
  return f"{leo_suite.__version__}+{commit[:12]}{'-dirty' if dirty else ''}"
