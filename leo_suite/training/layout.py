"""Where things are in a run directory: the only code that joins paths inside one.

Layout of a run directory:
  config.json        the run's settings (written once by run.Run)
  ckpt-<step>.*      the last checkpoints (tf.train.CheckpointManager)
  best/              the best-validation checkpoint and best.json, swapped in
                     whole (a kill between the two renames leaves best.old/,
                     recovered by `recover_best`)
  summaries/         TensorBoard
  profile/           --profile_steps' TensorBoard profile
  result_<split>.json  evaluation results (settings, overrides, data hashes)
  .lock              the holder of the run (leo_suite/runlock.py's RunLock)
  .worker-<i>/       a non-chief multi_worker replica's scratch checkpoint
"""

import glob
import json
import os
import shutil
from typing import Optional

import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite import runlock

CONFIG_FILE = "config.json"
BEST_DIR = "best"
BEST_RECORD = "best.json"
CHECKPOINT_NAME = "ckpt"
LOCK_FILE = runlock.LOCK_FILE
SUMMARIES_DIR = "summaries"
PROFILE_DIR = "profile"


class RunDirectory:
  """The paths of one run directory (it need not exist yet)."""

  def __init__(self, directory: str):
    self.directory = directory

  def path(self, *parts) -> str:
    return os.path.join(self.directory, *parts)

  @property
  def config_path(self) -> str:
    return self.path(CONFIG_FILE)

  @property
  def lock_path(self) -> str:
    return self.path(LOCK_FILE)

  @property
  def best_dir(self) -> str:
    return self.path(BEST_DIR)

  @property
  def summaries_dir(self) -> str:
    return self.path(SUMMARIES_DIR)

  @property
  def profile_dir(self) -> str:
    return self.path(PROFILE_DIR)

  def summary_files(self) -> list:
    """The TensorBoard event files under summaries/."""
    return glob.glob(self.path(SUMMARIES_DIR, "events.*"))

  def worker_scratch(self, worker_index: int) -> str:
    return self.path(f".worker-{worker_index}")

  def worker_checkpoint(self, worker_index: int) -> str:
    """The checkpoint a non-chief worker writes into its scratch directory."""
    return os.path.join(self.worker_scratch(worker_index), CHECKPOINT_NAME)

  def result_path(self, split: str) -> str:
    return self.path(f"result_{split}.json")

  # -- checkpoints ---------------------------------------------------------------------
  def recover_best(self):
    """Completes or undoes a best/ swap killed between its two renames.

    Refuses a best/ (or best.old/, best.tmp/) that is a symbolic link or a
    file: the run writes and replaces those directories, so it would write
    elsewhere or fail on every save.
    """
    for name in (BEST_DIR, BEST_DIR + ".old", BEST_DIR + ".tmp"):
      path = self.path(name)
      if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        kind = "a symbolic link" if os.path.islink(path) else "a file"
        raise errors.ConfigError(
            f"{path} is {kind}, not the run's own directory; move it away (the run "
            f"keeps its best checkpoint in {name}/ itself), then rerun")
    fileio.recover_directory(self.best_dir)

  def best_checkpoint(self) -> Optional[str]:
    path = self.path(BEST_DIR, CHECKPOINT_NAME)
    return path if os.path.exists(path + ".index") else None

  def latest_checkpoint(self) -> Optional[str]:
    return tf.train.latest_checkpoint(self.directory)

  def has_checkpoints(self) -> bool:
    return bool(self.latest_checkpoint() or self.best_checkpoint() or
                os.path.exists(self.path(BEST_DIR + ".old")))

  def best_record(self) -> Optional[dict]:
    """best/best.json ({step, val_accuracy, val_ci95}), None without one."""
    path = self.path(BEST_DIR, BEST_RECORD)
    if not os.path.exists(path):
      return None
    with open(path) as handle:
      return json.load(handle)

  def write_best(self, checkpoint, record: dict):
    """Writes `checkpoint` and `record` into best/, swapped in whole."""
    staging = self.path(BEST_DIR + ".tmp")
    if os.path.exists(staging):
      shutil.rmtree(staging)
    os.makedirs(staging)
    checkpoint.write(self.path(BEST_DIR + ".tmp", CHECKPOINT_NAME))
    fileio.atomic_write_text(self.path(BEST_DIR + ".tmp", BEST_RECORD), json.dumps(record))
    fileio.replace_directory(staging, self.best_dir)

  # -- results -------------------------------------------------------------------------
  def read_result(self, split: str) -> dict:
    with open(self.result_path(split)) as handle:
      return json.load(handle)
