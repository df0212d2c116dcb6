"""The one meta-training loop every learner shares.

A step: `learner.loss_and_gradients` on a meta-batch (one compiled, vectorised
call), LEO's NaN guard, clip by value then per-tensor norm, Adam. Checkpoints
go through tf.train.CheckpointManager (a killed save leaves the previous
checkpoint as the latest); the best-validation checkpoint is staged in a
temporary directory and swapped in atomically. A step's episodes and random
draws are functions of (seed, step) only, so a resumed run replays the
uninterrupted one.

Under a tf.distribute strategy (`strategy=`, see leo_suite/distribute.py) each
replica computes its share of the meta-batch; the scaled gradients are summed
across replicas BEFORE the NaN guard and clipping, so the update is the
single-device one. The learner must be built inside `strategy.scope()`.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from leo_suite import distribute
from leo_suite import errors
from leo_suite import fileio
from leo_suite.models.base import Episode
from leo_suite.training import evaluation
from leo_suite.training import optim

BEST_DIR = "best"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  checkpoint_path: str
  num_steps_limit: int = 100000
  metatrain_batch_size: int = 12
  metavalid_batch_size: int = 200
  num_val_batches: int = 10
  checkpoint_steps: int = 1000
  outer_lr: float = 1e-4
  gradient_threshold: float = 0.1
  gradient_norm_threshold: float = 0.1
  seed: int = 0
  eval_seed: int = 1
  log_steps: int = 100
  jit_compile: bool = False


class Trainer:
  """Meta-trains `learner` on episodes from `train_sampler`."""

  def __init__(self, learner, config: TrainConfig, train_sampler, val_sampler=None,
               run_config: Optional[dict] = None, strategy=None):
    self.learner = learner
    self.config = config
    self.train_sampler = train_sampler
    self.val_sampler = val_sampler
    self.run_config = run_config or {}
    self.strategy = strategy or tf.distribute.get_strategy()
    self.distributed = not distribute.is_default(self.strategy)
    self.is_chief, self.worker_index, _ = distribute.worker_info(self.strategy)
    variables = learner.trainable_variables
    if self.distributed:
      distribute.check_batch(self.strategy, config.metatrain_batch_size)
      outside = [v.name for v in variables
                 if not self.strategy.extended.variable_created_in_scope(v)]
      if outside:
        raise ValueError(f"build the learner inside strategy.scope(); {outside} are not "
                         "distributed variables")
    with self.strategy.scope():
      self.optimizer = optim.AdamState(variables, optim.AdamHyper(config.outer_lr))
    self.checkpoint = tf.train.Checkpoint(learner=learner, optimizer=self.optimizer)
    # Create the (lazy) save counter now, so best/ (written before the first
    # regular save) holds it too and restores with assert_existing_objects_matched.
    _ = self.checkpoint.save_counter
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, config.checkpoint_path, max_to_keep=3,
        step_counter=self.optimizer.step, checkpoint_name="ckpt")
    # A non-chief worker of multi_worker saves (every worker must) into a
    # private scratch directory that is removed after each save.
    self._scratch = (None if self.is_chief else os.path.join(
        config.checkpoint_path, f".worker-{self.worker_index}"))
    if self.distributed and not isinstance(self.strategy,
                                           tf.distribute.MultiWorkerMirroredStrategy):
      self.evaluator = distribute.DistributedEvaluator(self.strategy, learner,
                                                       jit_compile=config.jit_compile)
    else:  # one device, or every worker evaluates the full set locally
      self.evaluator = evaluation.Evaluator(learner, jit_compile=config.jit_compile)
    if self.distributed:
      compute = lambda episode, seed: learner.loss_and_gradients(episode, seed=seed)
      # XLA per replica (a compiled function inside strategy.run); the
      # all-reduce and the update stay outside it.
      self._replica_compute = (tf.function(compute, jit_compile=True)
                               if config.jit_compile else compute)
      self._train_step = tf.function(self._distributed_step)
    else:
      self._train_step = tf.function(self._step, jit_compile=config.jit_compile)

  # -- one meta-training step -------------------------------------------------
  def _apply(self, loss, grads, metrics):
    """NaN guard, clipping (of the full meta-batch gradient) and Adam."""
    learner = self.learner
    grads, skipped = optim.guard_nan(loss, grads, learner.nan_fallback_gradients())
    grads = optim.clip_gradients(grads, self.config.gradient_threshold,
                                 self.config.gradient_norm_threshold)
    self.optimizer.apply(grads, learner.trainable_variables)
    return dict(metrics, loss=loss, skipped=tf.cast(skipped, tf.float32))

  def _step(self, episode: Episode, seed):
    loss, grads, metrics = self.learner.loss_and_gradients(episode, seed=seed)
    return self._apply(loss, grads, metrics)

  def _distributed_step(self, episode, seed):
    """Per-replica shares, summed across replicas, then one update everywhere."""
    batch = self.config.metatrain_batch_size
    shares = self.strategy.run(
        lambda e, s: distribute.scaled_loss_and_gradients(self._replica_compute, e, s, batch),
        args=(episode, seed))
    loss, grads, metrics = distribute.sum_over_replicas(self.strategy, shares)
    return self._apply(loss, list(grads), metrics)

  def train_dataset(self, start_step):
    """Meta-batches from `start_step` on (per replica under a strategy)."""
    cfg = self.config
    start = start_step * cfg.metatrain_batch_size
    if self.distributed:
      return distribute.distributed_episodes(self.strategy, self.train_sampler, cfg.seed,
                                             cfg.metatrain_batch_size, start=start)
    return self.train_sampler.dataset(cfg.seed, cfg.metatrain_batch_size, start=start)

  def step_seed(self, step):
    return tf.constant([self.config.seed, step], tf.int32)

  def train_step(self, episode, step):
    return self._train_step(episode, self.step_seed(step))

  # -- checkpoints --------------------------------------------------------------
  @property
  def best_dir(self):
    return os.path.join(self.config.checkpoint_path, BEST_DIR)

  def check_or_write_config(self):
    """Refuses to resume a run whose model-defining config differs."""
    path = os.path.join(self.config.checkpoint_path, CONFIG_FILE)
    identity = self.run_config.get("identity", {})
    if os.path.exists(path):
      with open(path) as handle:
        saved = json.load(handle)
      differ = {k: (saved.get("identity", {}).get(k), v) for k, v in identity.items()
                if saved.get("identity", {}).get(k) != v}
      if differ:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise errors.ConfigError(
            f"{self.config.checkpoint_path} holds a run with a different setup ({details}); "
            "use a new --checkpoint_path or the original flags")
    if self.is_chief:
      fileio.atomic_write_text(path, json.dumps(self.run_config, indent=1, sort_keys=True))

  def _save(self, step):
    if self.is_chief:
      self.manager.save(checkpoint_number=step)
    else:
      self.checkpoint.write(os.path.join(self._scratch, "ckpt"))
      shutil.rmtree(self._scratch, ignore_errors=True)

  def restore(self):
    """Restores the latest complete checkpoint; returns the step reached."""
    if self.is_chief:
      fileio.recover_directory(self.best_dir)
    latest = self.manager.latest_checkpoint
    if latest:
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s at step %d", latest, int(self.optimizer.step.numpy()))
    return int(self.optimizer.step.numpy())

  def restore_for_evaluation(self, prefer_best=True):
    fileio.recover_directory(self.best_dir)
    path = None
    if prefer_best and os.path.exists(os.path.join(self.best_dir, "ckpt.index")):
      path = os.path.join(self.best_dir, "ckpt")
    path = path or self.manager.latest_checkpoint
    if not path:
      raise errors.UserError(
          f"{self.config.checkpoint_path}: no checkpoint to evaluate; train first "
          "(run without --evaluation_mode) or point --checkpoint_path at a run")
    self.checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    return path

  def _best_accuracy(self):
    path = os.path.join(self.best_dir, "best.json")
    if os.path.exists(path):
      with open(path) as handle:
        return json.load(handle)["val_accuracy"]
    return -1.0

  def _save_best(self, step, result):
    staging = self.best_dir + ".tmp"
    if os.path.exists(staging):
      shutil.rmtree(staging)
    os.makedirs(staging)
    self.checkpoint.write(os.path.join(staging, "ckpt"))
    fileio.atomic_write_text(os.path.join(staging, "best.json"), json.dumps(
        {"step": step, "val_accuracy": result.accuracy, "val_ci95": result.ci95}))
    fileio.replace_directory(staging, self.best_dir)

  # -- the loop -------------------------------------------------------------
  def validate(self):
    if self.val_sampler is None:
      return None
    dataset = self.val_sampler.fixed_set(
        self.config.eval_seed, self.config.num_val_batches * self.config.metavalid_batch_size,
        self.config.metavalid_batch_size)
    return self.evaluator.evaluate(dataset)

  def train(self):
    cfg = self.config
    os.makedirs(cfg.checkpoint_path, exist_ok=True)
    self.check_or_write_config()
    step = self.restore()
    if step >= cfg.num_steps_limit:
      logging.info("Step %d >= num_steps_limit %d: nothing to train", step, cfg.num_steps_limit)
      return step
    writer = (tf.summary.create_file_writer(os.path.join(cfg.checkpoint_path, "summaries"))
              if self.is_chief else tf.summary.create_noop_writer())
    best = self._best_accuracy()
    dataset = self.train_dataset(step)
    window_start, window_steps, sums = time.time(), 0, {}
    for episode in dataset:
      metrics = {k: float(v) for k, v in self.train_step(episode, step).items()}
      step += 1
      window_steps += 1
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
      if metrics["skipped"]:
        logging.warning("step %d: loss or gradient not finite; NaN guard applied "
                        "the fallback update (step skipped)", step)
      if step % cfg.log_steps == 0 or step == cfg.num_steps_limit:
        elapsed = time.time() - window_start
        rate = window_steps / max(elapsed, 1e-9)
        means = {k: v / window_steps for k, v in sums.items()}
        eta = (cfg.num_steps_limit - step) / max(rate, 1e-9)
        logging.info("step %d  loss %.4f  query_loss %.4f  train_acc %.4f  "
                     "%.1f steps/s  ETA %s", step, means["loss"], means["query_loss"],
                     means["accuracy"], rate, _format_seconds(eta))
        with writer.as_default(step=step):
          for k, v in means.items():
            tf.summary.scalar("train/" + k, v)
          tf.summary.scalar("train/steps_per_second", rate)
        window_start, window_steps, sums = time.time(), 0, {}
      if step % cfg.checkpoint_steps == 0 or step == cfg.num_steps_limit:
        result = self.validate() if self.is_chief else None
        if result is not None:
          logging.info("step %d  validation accuracy %s", step, result.as_percent())
          with writer.as_default(step=step):
            tf.summary.scalar("valid/accuracy", result.accuracy)
          if result.accuracy > best:
            # Before the regular save: a kill in between replays this step,
            # which validates to the same accuracy, so best/ never misses it.
            best = result.accuracy
            self._save_best(step, result)
            logging.info("step %d  new best validation accuracy: saved to %s",
                         step, self.best_dir)
        self._save(step)
      if step >= cfg.num_steps_limit:
        break
    writer.flush()
    return step


def _format_seconds(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
