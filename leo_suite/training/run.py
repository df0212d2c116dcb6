"""A run directory: the one record of how a model was trained.

`Run` is the only reader and writer of `<run>/config.json`. The file is written
once, atomically, when a training run starts, and holds every setting that
defines the run (flag name -> value, learner and outer-loop settings resolved),
the embedding width, the data files' sha256 and the code version. Evaluation,
export, prediction and comparison rebuild the learner, the episode shapes and
the outer loop from it, never from whatever flags they were given.

Layout of a run directory:
  config.json        the run's settings (this module)
  ckpt-<step>.*      the last checkpoints (tf.train.CheckpointManager)
  best/              the best-validation checkpoint and best.json, swapped in
                     whole (a kill between the two renames leaves best.old/,
                     recovered by `recover_best`)
  summaries/         TensorBoard
  result_<split>.json  evaluation results (settings, overrides, data hashes)
"""

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf

import leo_suite
from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import episodes
from leo_suite.data import synthetic
from leo_suite.models import registry
from leo_suite.training import optim

CONFIG_FILE = "config.json"
BEST_DIR = "best"
FORMAT = 2
RELEASED = ("miniImageNet", "tieredImageNet")
SPLITS = ("train", "val", "test")

# Settings that never change what a run is: they may differ between the
# command that created a run and a later one (resume, evaluation).
FREE_SETTINGS = ("num_steps_limit", "log_steps", "jit_compile", "deterministic",
                 "num_test_tasks", "metatest_batch_size", "baselines", "profile_steps",
                 "evaluation_method")
# Settings evaluation may override (recorded as overrides in the result);
# each learner adds its spec's eval_fields (prefixed flag names).
EVAL_SETTINGS = ("eval_seed", "eval_num_query")
# Outer-loop settings: flag name -> optim.OuterConfig field.
OUTER_FLAGS = {"outer_optimizer": "optimizer", "outer_lr": "learning_rate",
               "adam_epsilon": "adam_epsilon", "gradient_threshold": "clip_value",
               "gradient_norm_threshold": "clip_norm", "nan_guard": "nan_guard"}


# Every setting but the learner's own and the outer loop's, at its default
# (LEO's release defaults where the release has the flag); config.py's flags
# take their defaults from here.
DEFAULTS = {
    "dataset_name": "miniImageNet", "embedding_crop": "center", "train_on_val": False,
    "num_classes": 5, "num_tr_examples_per_class": 1, "num_val_examples_per_class": 15,
    "metatrain_batch_size": 12, "metavalid_batch_size": 200, "metatest_batch_size": 200,
    "num_steps_limit": 100000, "checkpoint_steps": 1000, "seed": 0, "eval_seed": 1,
    "num_val_batches": 10, "num_test_tasks": 10000, "eval_num_query": 0,
    "dtype": "float32", "deterministic": False, "jit_compile": "auto", "baselines": "ncm",
    "log_steps": 100, "preset": "", "profile_steps": "", "evaluation_method": "auto",
}


def default_settings(model: str, learner_config=None, **values) -> dict:
  """A complete settings dict without flags (for scripts and tests).

  `learner_config` (default: the learner's Config()) gives the learner's
  settings, the learner's spec's outer_defaults the outer loop's; `values` override
  any of them by flag name.
  """
  learner_config = learner_config or registry.spec(model).config_class()
  settings = dict(DEFAULTS, model=model, **outer_defaults(model))
  settings.update({flag: getattr(learner_config, field)
                   for flag, field in learner_flag_names(model).items()})
  unknown = sorted(set(values) - set(settings))
  if unknown:
    raise errors.ConfigError(f"unknown settings {unknown} for --model={model}")
  settings.update(values)
  return settings


def learner_flag_names(model: str) -> Dict[str, str]:
  """Flag name -> Config field of `model`'s learner flags."""
  spec = registry.spec(model)
  return {spec.flag_prefix + f.name: f.name for f in dataclasses.fields(spec.config_class)}


def eval_overridable(model: str):
  """Settings evaluation may override for `model`."""
  spec = registry.spec(model)
  return set(EVAL_SETTINGS) | {spec.flag_prefix + f for f in spec.eval_fields}


def outer_defaults(model: str) -> dict:
  """The learner's outer-loop defaults as flag name -> value."""
  config = optim.OuterConfig(**registry.spec(model).outer_defaults)
  return {flag: getattr(config, field) for flag, field in OUTER_FLAGS.items()}


def shorten(value, limit=200):
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "...'"


def resolve(saved: Optional[dict], given: dict, explicit: Sequence[str],
            evaluation: bool) -> Tuple[dict, dict]:
  """The settings a command runs with, and the overrides it applies.

  saved: the run's settings (None for a new run); given: every setting as
  the command's flags have it (defaults included); explicit: the names the
  user set (on the command line or through a preset). A new run takes
  `given`. An existing run takes its saved settings; an explicit value that
  differs is applied when the setting is free (or, in evaluation, one
  evaluation may override) and recorded as an override; any other is
  refused, naming every conflicting flag with its saved and given values.
  """
  if saved is None:
    return dict(given), {}
  model = saved["model"]
  overridable = set(FREE_SETTINGS) | (eval_overridable(model) if evaluation else set())
  settings, overrides, conflicts = dict(saved), {}, []
  for name in explicit:
    if name not in given or given[name] == saved.get(name):
      continue
    if name in overridable:
      settings[name] = given[name]
      overrides[name] = {"saved": saved.get(name), "used": given[name]}
    elif name in saved or name == "model":
      conflicts.append(f"--{name}: saved {shorten(saved.get(name))}, given "
                       f"{shorten(given[name])}")
    else:
      conflicts.append(f"--{name} does not apply to this run (--model={model})")
  if conflicts:
    mode = "evaluate" if evaluation else "resume"
    raise errors.ConfigError(
        f"the run's config.json disagrees with the flags given: {'; '.join(conflicts)}. "
        f"To {mode} this run pass only --checkpoint_path (and flags that may change: "
        f"{', '.join(sorted(overridable))}); to train something else use a new "
        "--checkpoint_path")
  return settings, overrides


def check_learner_flags(model: str, explicit: Sequence[str], all_learner_flags: Dict[str, str]):
  """Refuses explicit flags of another learner (they would silently do nothing)."""
  own = learner_flag_names(model)
  foreign = [n for n in explicit if n in all_learner_flags and n not in own]
  if foreign:
    raise errors.ConfigError(
        f"{', '.join('--' + n for n in foreign)} "
        f"appl{'ies' if len(foreign) == 1 else 'y'} to --model="
        f"{all_learner_flags[foreign[0]]}, not to --model={model}; remove "
        f"{'it' if len(foreign) == 1 else 'them'}")


# -- data ------------------------------------------------------------------------
def how_to_get(data_path, dataset_name):
  if dataset_name in RELEASED:
    return ("LEO's released embeddings are not bundled: run `python "
            "scripts/download_embeddings.py --dest embeddings` (needs internet; offline, "
            "pass --archive path/to/embeddings.zip), or pass "
            "--data_path=<directory holding miniImageNet/ and tieredImageNet/>. "
            "To try the suite without them use --dataset_name=synthetic.")
  found = sorted(d for d in os.listdir(data_path)
                 if os.path.isdir(os.path.join(data_path, d))) if os.path.isdir(
                     data_path) else []
  return f"datasets found under {data_path}: {found or 'none'}"


def load_splits(settings: dict, data_path: str, names: Sequence[str]):
  """Loads the named splits of the run's dataset (name -> EmbeddingSplit)."""
  dataset, crop = settings["dataset_name"], settings["embedding_crop"]
  if dataset == "tieredImageNet" and crop != "center":
    raise errors.ConfigError(
        "tieredImageNet has only the center crop in LEO's release; use --embedding_crop=center")
  if dataset == synthetic.DATASET_NAME:
    synthetic.ensure(data_path)
  hint = how_to_get(data_path, dataset)
  loaded = {name: embeddings_lib.load_dataset_split(data_path, dataset, crop, name, hint)
            for name in names}
  embeddings_lib.check_compatible(list(loaded.values()))
  return loaded


def split_sha256(split) -> str:
  return next(iter(split.source.values()))


def data_record(settings: dict, data_path: str, loaded: dict) -> dict:
  """{data_path, sha256 per split}: hashes of the loaded splits, the others' files."""
  hashes = {}
  for name in SPLITS:
    if name in loaded:
      hashes[name] = split_sha256(loaded[name])
    else:
      path = embeddings_lib.split_path(
          data_path, settings["dataset_name"], settings["embedding_crop"], name)
      hashes[name] = fileio.file_sha256(path) if os.path.exists(path) else None
  return {"data_path": os.path.abspath(data_path), "sha256": hashes}


def check_data(saved: dict, data_path: str, loaded: dict, allow_change: bool) -> dict:
  """Compares loaded splits with the hashes saved at training.

  Returns what is recorded in results: the path used, and the splits whose
  contents differ (only with allow_change; else a ConfigError).
  """
  changed = [name for name, split in loaded.items()
             if saved["sha256"].get(name) and split_sha256(split) != saved["sha256"][name]]
  if changed and not allow_change:
    details = "; ".join(
        f"{name}: trained with sha256 {saved['sha256'][name][:12]}..., "
        f"{next(iter(loaded[name].source))} has {split_sha256(loaded[name])[:12]}..."
        for name in changed)
    raise errors.ConfigError(
        f"the data differs from the data the run was trained with ({details}). Point "
        f"--data_path at the original files (the run used {saved['data_path']}), or pass "
        "--allow_data_change to proceed knowingly (recorded in the result)")
  return {"data_path": os.path.abspath(data_path),
          "moved": os.path.abspath(data_path) != saved["data_path"],
          "changed_splits": changed,
          "sha256": {name: split_sha256(split) for name, split in loaded.items()}}


# -- checkpoints -------------------------------------------------------------------
def recover_best(directory):
  """Completes or undoes a best/ swap killed between its two renames.

  Refuses a best/ (or best.old/, best.tmp/) that is a symbolic link or a file:
  the run writes and replaces those directories, so it would write elsewhere
  or fail on every save.
  """
  for name in (BEST_DIR, BEST_DIR + ".old", BEST_DIR + ".tmp"):
    path = os.path.join(directory, name)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
      kind = "a symbolic link" if os.path.islink(path) else "a file"
      raise errors.ConfigError(
          f"{path} is {kind}, not the run's own directory; move it away (the run "
          f"keeps its best checkpoint in {name}/ itself), then rerun")
  fileio.recover_directory(os.path.join(directory, BEST_DIR))


def best_checkpoint(directory) -> Optional[str]:
  path = os.path.join(directory, BEST_DIR, "ckpt")
  return path if os.path.exists(path + ".index") else None


def latest_checkpoint(directory) -> Optional[str]:
  return tf.train.latest_checkpoint(directory)


def has_checkpoints(directory) -> bool:
  return bool(latest_checkpoint(directory) or best_checkpoint(directory) or
              os.path.exists(os.path.join(directory, BEST_DIR + ".old")))


class Run:
  """One run directory: its saved settings, learner, episodes and checkpoints."""

  def __init__(self, directory: str, record: dict):
    self.directory = directory
    self.record = record

  # -- creating and opening ----------------------------------------------------------
  @staticmethod
  def read_record(directory: str) -> Optional[dict]:
    """The saved config.json, None for a new run; refuses what is not a run."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
      raise errors.ConfigError(
          f"--checkpoint_path={directory} is a file, not a run directory; choose a "
          "directory (a new one for a new run)")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
      if os.path.isdir(directory) and has_checkpoints(directory):
        raise errors.ConfigError(
            f"{directory} holds checkpoints but no {CONFIG_FILE}, so what they were "
            "trained with is unknown; use a new --checkpoint_path")
      return None
    try:
      with open(path) as handle:
        record = json.load(handle)
      if record.get("format") != FORMAT:
        raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
      run = Run(directory, record)
      run.learner_config().validate()
      run.outer_config().validate()
      int(record["embedding_dim"])
    except errors.ConfigError as exc:
      raise errors.ConfigError(f"{path}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
      raise errors.ConfigError(
          f"{path}: cannot be read as a run configuration ({type(exc).__name__}: "
          f"{shorten(str(exc))}); it is damaged or from an incompatible leo-suite "
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
          f"{os.path.join(directory, CONFIG_FILE)}: missing; {directory} is not a run "
          "directory (train first: `python runner.py --checkpoint_path=...`)")
    return cls(directory, record)

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
    path = os.path.join(self.directory, CONFIG_FILE)
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
    return registry.spec(self.model).config_class(**{field: self.settings[flag]
                            for flag, field in learner_flag_names(self.model).items()})

  def outer_config(self) -> optim.OuterConfig:
    return optim.OuterConfig(**{field: self.settings[flag]
                                for flag, field in OUTER_FLAGS.items()})

  def build_learner(self, strategy=None):
    """The learner, initialised from the run's seed (inside `strategy.scope()`)."""
    tf.random.set_seed(int(self.settings["seed"]))
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
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
    recover_best(self.directory)
    path = best_checkpoint(self.directory) or latest_checkpoint(self.directory)
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
          f"{path}: does not match {os.path.join(self.directory, CONFIG_FILE)} (model "
          f"{self.model!r}, {self.num_ways}-way, D={self.embedding_dim}): {first}") from None
    return path

  def restored_learner(self, strategy=None):
    """(learner with the evaluation checkpoint's weights, checkpoint path)."""
    learner = self.build_learner(strategy)
    return learner, self.restore(learner)

  # -- results -----------------------------------------------------------------------
  def write_result(self, name: str, payload: dict) -> dict:
    """Writes <run>/<name> atomically with the run's config beside the figures."""
    payload = dict(payload, run_config=self.record, code_version=code_version())
    fileio.atomic_write_text(os.path.join(self.directory, name),
                             json.dumps(payload, indent=1, sort_keys=True))
    return payload


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


LOCK_FILE = ".lock"


class RunLock:
  """One writer per run directory: `<run>/.lock` holds the holder's pid and host.

  Taken (O_CREAT | O_EXCL) before anything else is written; a second command
  on the same directory is refused naming the holder. A lock whose process is
  gone (same host, dead pid) is stale: it is taken over, with a log line.
  Released on exit; a directory this lock created is removed again if nothing
  else was written into it (a command that failed leaves no trace).
  """

  def __init__(self, directory: str, log=None, create: bool = True):
    self.directory = directory
    self.create = create
    self.path = os.path.join(directory, LOCK_FILE)
    self.log = log or (lambda message: None)
    self._created_dir = False
    self._held = False

  def __enter__(self):
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise errors.ConfigError(
          f"--checkpoint_path={self.directory} is a file, not a run directory; choose a "
          "directory (a new one for a new run)")
    if not os.path.isdir(self.directory):
      if not self.create:
        raise errors.UserError(
            f"{self.directory}: no such run directory (pass the --checkpoint_path of a "
            "`python runner.py` training run)")
      os.makedirs(self.directory)
      self._created_dir = True
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "command": " ".join(os.path.basename(a) if i == 0 else a
                                  for i, a in enumerate(sys.argv))[:300]}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read_holder()
        if other is not None and not self._is_stale(other):
          self._cleanup_dir()
          raise errors.ConfigError(
              f"{self.directory} is in use by process {other.get('pid')} on "
              f"{other.get('host')} (since {other.get('started')}: "
              f"{shorten(other.get('command', ''), 120)}); wait for it to finish or use "
              f"another --checkpoint_path. If that process is gone, delete {self.path}")
        self.log(f"{self.path}: taking over a stale lock of process "
                 f"{(other or {}).get('pid')} on {(other or {}).get('host')}, which is gone")
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(holder))
      self._held = True
      return self
    raise errors.ConfigError(f"{self.path}: could not take the run's lock; retry")

  def _read_holder(self):
    try:
      with open(self.path) as handle:
        return json.loads(handle.read(4096))
    except FileNotFoundError:
      return {}  # released meanwhile: retry
    except (OSError, ValueError):
      return None if time_since_modified(self.path) < 5 else {}  # being written

  @staticmethod
  def _is_stale(holder) -> bool:
    if not holder:
      return True
    if holder.get("host") != socket.gethostname():
      return False  # cannot tell: another machine may be running it
    try:
      os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, ValueError, TypeError, OverflowError):
      return False
    return False

  def _cleanup_dir(self):
    if self._created_dir:
      with contextlib.suppress(OSError):
        os.rmdir(self.directory)

  def __exit__(self, *exc_info):
    if self._held:
      with contextlib.suppress(OSError):
        os.remove(self.path)
      self._held = False
    self._cleanup_dir()
    return False


def time_since_modified(path) -> float:
  try:
    return time.time() - os.stat(path).st_mtime
  except OSError:
    return float("inf")
