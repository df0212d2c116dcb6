"""The one meta-training loop every learner shares.

A step, on one device or under any tf.distribute strategy (the default
strategy is one device): under `strategy.run` each replica computes
`learner.loss_and_gradients` on its share of the meta-batch (one compiled,
vectorised call), scaled so that the sum over replicas is the meta-batch
mean; the sum goes through the learner's outer chain (optim.build_chain: NaN
guard, clip by value, clip each tensor by its norm, Adam), so clipping sees
the full meta-batch gradient as LEO's release does. Checkpoints go through
tf.train.CheckpointManager (a killed save leaves the previous checkpoint as
the latest); the best-validation checkpoint (the initialisation, step 0,
included) is staged in a temporary directory and swapped in atomically. A
step's episodes and random draws are functions of (seed, step) only, so a
resumed run replays the uninterrupted one. The run directory's config.json
is written by `run.Run`, not here.

Each periodic log line (and TensorBoard's train/data_wait_fraction) gives
the share of the steps' time spent waiting for the next meta-batch from the
input pipeline (`DataWait`). `profile_steps` (A, B) records a TensorBoard
profile of steps A..B into <checkpoint_path>/profile/.
"""

import dataclasses
import shutil
import time
from typing import Callable, Optional, Tuple

from absl import logging
import tensorflow as tf

from leo_suite import distribute
from leo_suite import progress as progress_lib
from leo_suite.data.episodes import Episode
from leo_suite.training import layout
from leo_suite.training import optim
from leo_suite.training import run as run_lib
from leo_suite.training import settings as settings_lib
from leo_suite.training import xla


class DataWait:
  """How long steps wait for their meta-batch, against the time they compute.

  `next(iterator)` is timed apart from the step; `stepped()` is called once
  the step's results are fetched (so asynchronous dispatch cannot hide the
  compute in the next wait). fraction = wait / (wait + compute).
  """

  def __init__(self):
    self.wait = self.compute = 0.0
    self.steps = 0
    self._received = None

  def next(self, iterator):
    start = time.perf_counter()
    element = next(iterator)
    self._received = time.perf_counter()
    self.wait += self._received - start
    return element

  def stepped(self):
    self.compute += time.perf_counter() - self._received
    self.steps += 1

  @property
  def fraction(self) -> float:
    total = self.wait + self.compute
    return self.wait / total if total > 0 else 0.0

  @property
  def mean_wait(self) -> float:
    return self.wait / max(self.steps, 1)


class Profiler:
  """tf.profiler over steps `steps` = (A, B) (numbered from 1) into `directory`.

  TensorBoard's profile tab (the tensorboard-plugin-profile package) reads
  the <directory>/plugins/profile/<time>/*.xplane.pb it writes. A profiler
  that cannot start is logged and training goes on.
  """

  def __init__(self, steps: Optional[Tuple[int, int]], directory: str):
    self.steps = steps
    self.directory = directory
    self.active = False

  def before(self, step):
    """Starts before step A (or the first step run inside A..B, on resume)."""
    if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
      try:
        tf.profiler.experimental.start(self.directory)
      except (tf.errors.OpError, RuntimeError) as exc:
        logging.warning("--profile_steps: the profiler did not start (%s); training "
                        "without it", str(exc).splitlines()[0] if str(exc) else exc)
        self.steps = None
        return
      self.active = True
      logging.info("profiling steps %d to %d into %s", step, self.steps[1], self.directory)

  def after(self, step):
    if self.active and step >= self.steps[1]:
      self.stop()

  def stop(self):
    if self.active:
      tf.profiler.experimental.stop()
      self.active, self.steps = False, None
      logging.info("profile written to %s (TensorBoard --logdir=%s, Profile tab)",
                   self.directory, self.directory)


_D = settings_lib.DEFAULTS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop's settings (defaults: settings.DEFAULTS'); `from_run`
  takes a run's."""
  checkpoint_path: str
  num_steps_limit: int = _D["num_steps_limit"]
  metatrain_batch_size: int = _D["metatrain_batch_size"]
  metavalid_batch_size: int = _D["metavalid_batch_size"]
  num_val_batches: int = _D["num_val_batches"]
  checkpoint_steps: int = _D["checkpoint_steps"]
  outer: optim.OuterConfig = optim.OuterConfig()
  seed: int = _D["seed"]
  eval_seed: int = _D["eval_seed"]
  log_steps: int = _D["log_steps"]
  jit_compile: bool = False
  evaluation_method: str = _D["evaluation_method"]  # evaluation.EVALUATION_METHODS
  keep_best: bool = True   # False: validation is logged, best/ is not written
  profile_steps: Optional[Tuple[int, int]] = None  # (A, B): profile steps A..B

  @classmethod
  def from_run(cls, run: run_lib.Run) -> "TrainConfig":
    """The run's training settings (its directory is the checkpoint path)."""
    s = run.settings
    return cls(checkpoint_path=run.directory, num_steps_limit=s["num_steps_limit"],
               metatrain_batch_size=s["metatrain_batch_size"],
               metavalid_batch_size=s["metavalid_batch_size"],
               num_val_batches=s["num_val_batches"], checkpoint_steps=s["checkpoint_steps"],
               outer=run.outer_config(), seed=s["seed"], eval_seed=s["eval_seed"],
               log_steps=s["log_steps"], jit_compile=run.jit_compile,
               evaluation_method=s.get("evaluation_method", "auto"),
               keep_best=not s["train_on_val"],
               # .get: runs created before the setting existed lack it.
               profile_steps=settings_lib.parse_profile_steps(s.get("profile_steps", "")))


class Trainer:
  """Meta-trains `learner` on episodes from `train_sampler`; validates on
  `val_sampler`'s fixed tasks with `evaluator`, an `evaluation.Evaluator` of
  the same learner and strategy (`run.Run.evaluator` builds a run's)."""

  def __init__(self, learner, config: TrainConfig, train_sampler, val_sampler=None,
               strategy=None, evaluator=None):
    if val_sampler is not None and evaluator is None:
      raise ValueError("validation needs the learner's evaluator (run.Run.evaluator)")
    if evaluator is not None and evaluator.learner is not learner:
      raise ValueError("the evaluator scores another learner than the one trained")
    self.learner = learner
    self.config = config
    self.train_sampler = train_sampler
    self.val_sampler = val_sampler
    self.strategy = strategy or tf.distribute.get_strategy()
    self.is_chief, self.worker_index, _ = distribute.worker_info(self.strategy)
    variables = learner.trainable_variables
    if not distribute.is_default(self.strategy):
      distribute.check_batch(self.strategy, config.metatrain_batch_size)
      outside = [v.name for v in variables
                 if not self.strategy.extended.variable_created_in_scope(v)]
      if outside:
        raise ValueError(f"build the learner inside strategy.scope(); {outside} are not "
                         "distributed variables")
    with self.strategy.scope():
      self.optimizer = optim.OptimizerState(optim.build_chain(config.outer), variables)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.files = layout.RunDirectory(config.checkpoint_path)
    self.checkpoint = tf.train.Checkpoint(learner=learner, optimizer=self.optimizer,
                                          step=self.step)
    # Create the (lazy) save counter now, so best/ (written before the first
    # regular save) holds it too and restores with assert_existing_objects_matched.
    _ = self.checkpoint.save_counter
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, config.checkpoint_path, max_to_keep=3,
        step_counter=self.step, checkpoint_name=layout.CHECKPOINT_NAME)
    # A non-chief worker of multi_worker saves (every worker must) into a
    # private scratch directory that is removed after each save.
    self._scratch = (None if self.is_chief else self.files.worker_scratch(self.worker_index))
    self.evaluator = evaluator
    compute = lambda episode, seed: learner.loss_and_gradients(episode, seed=seed)

    def build_step(jit):
      # On one device XLA compiles the whole step, update included (the
      # outer chain is plain TF ops; one compiled call per step instead of
      # one per op). Under a strategy, XLA per replica (a compiled function
      # inside strategy.run); the all-reduce and the update stay outside it.
      # Either way the random draws are made outside XLA (xla.Predrawn):
      # the whole step's draws are those of its one replica's compute.
      whole = jit and distribute.is_default(self.strategy)
      self._replica_compute = (xla.Predrawn(compute) if jit and not whole else compute)
      if whole and learner.training_step_examples:
        return xla.PartsStep(compute, self._apply, learner.training_step_examples)
      if whole:
        return xla.WholeStep(self._step, lambda e, s: compute(e, distribute.replica_seed(s)))
      return tf.function(self._step, autograph=False)
    self._train_step = xla.WithFallback(build_step, config.jit_compile,
                                        f"{type(learner).__name__} meta-training step")

  # -- one meta-training step -------------------------------------------------
  def _apply(self, loss, grads, metrics):
    """The outer chain on the full meta-batch gradient: guard, clipping, Adam."""
    finite = self.optimizer.apply(loss, grads, self.learner.trainable_variables)
    self.step.assign_add(1)
    return dict(metrics, loss=loss, skipped=1.0 - tf.cast(finite, tf.float32))

  def _step(self, episode: Episode, seed):
    """Per-replica shares (one replica on one device), summed, one update."""
    batch = self.config.metatrain_batch_size
    shares = self.strategy.run(
        lambda e, s: distribute.scaled_loss_and_gradients(self._replica_compute, e, s, batch),
        args=(episode, seed))
    loss, grads, metrics = distribute.sum_over_replicas(self.strategy, shares)
    return self._apply(loss, list(grads), metrics)

  def train_dataset(self, start_step):
    """Meta-batches from `start_step` on (per replica under a strategy)."""
    cfg = self.config
    return distribute.distributed_episodes(
        self.strategy, self.train_sampler, cfg.seed, cfg.metatrain_batch_size,
        start=start_step * cfg.metatrain_batch_size)

  def step_seed(self, step):
    return tf.constant([self.config.seed, step], tf.int32)

  def train_step(self, episode, step):
    return self._train_step(episode, self.step_seed(step))

  # -- checkpoints --------------------------------------------------------------
  @property
  def best_dir(self):
    return self.files.best_dir

  def _save(self, step):
    if self.is_chief:
      self.manager.save(checkpoint_number=step)
    else:
      self.checkpoint.write(self.files.worker_checkpoint(self.worker_index))
      shutil.rmtree(self._scratch, ignore_errors=True)

  def restore(self):
    """Restores the latest complete checkpoint; returns the step reached."""
    if self.is_chief:
      self.files.recover_best()
    latest = self.manager.latest_checkpoint
    if latest:
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s at step %d", latest, int(self.step.numpy()))
    return int(self.step.numpy())

  def _best_accuracy(self):
    best = self.files.best_record()
    return best["val_accuracy"] if best else -1.0

  def _save_best(self, step, result):
    self.files.write_best(self.checkpoint, {"step": step, "val_accuracy": result.accuracy,
                                            "val_ci95": result.ci95})

  # -- the loop -------------------------------------------------------------
  def validate(self):
    if self.val_sampler is None:
      return None
    num_tasks = self.config.num_val_batches * self.config.metavalid_batch_size
    return self.evaluator.evaluate_fixed(
        self.val_sampler, self.config.eval_seed, num_tasks, self.config.metavalid_batch_size,
        progress_lib.Progress("validation", num_tasks), self.config.evaluation_method)

  def train(self, stop_requested: Optional[Callable[[], Optional[str]]] = None):
    """Trains to num_steps_limit; returns the step reached.

    `stop_requested()` is polled at every step boundary: when it returns a
    reason (e.g. "SIGTERM"), a checkpoint of the step just finished is saved
    and training returns early.
    """
    cfg = self.config
    self.stopped_by = None
    step = self.restore()
    if step >= cfg.num_steps_limit:
      logging.info("Step %d >= num_steps_limit %d: nothing to train", step, cfg.num_steps_limit)
      return step
    writer = (tf.summary.create_file_writer(self.files.summaries_dir)
              if self.is_chief else tf.summary.create_noop_writer())
    best = self._best_accuracy()
    if step == 0 and cfg.keep_best and best < 0:
      # The initialisation is a candidate too: several learners start at a
      # nearest-class-mean classifier, and on features pretrained on the
      # meta-train classes meta-training can lower validation accuracy from
      # there (docs/results.md, Omniglot-small). best/ then holds step 0.
      best = self._validate_and_keep_best(0, best, writer)
    iterator = iter(self.train_dataset(step))
    profiler = Profiler(cfg.profile_steps if self.is_chief else None,
                        self.files.profile_dir)
    try:
      step = self._loop(step, iterator, stop_requested, writer, best, profiler)
    finally:
      profiler.stop()
    with writer.as_default(step=step):  # after the last validation and save
      tf.summary.scalar("train/peak_rss_mib", progress_lib.peak_rss_mib())
    writer.flush()
    return step

  def _loop(self, step, iterator, stop_requested, writer, best, profiler):
    """The steps from `step` on: log, validate, checkpoint; returns the step reached."""
    cfg = self.config
    window_start, window_steps, sums, data_wait = time.time(), 0, {}, DataWait()
    while True:
      profiler.before(step + 1)
      try:
        episode = data_wait.next(iterator)
      except StopIteration:
        break
      metrics = {k: float(v) for k, v in self.train_step(episode, step).items()}
      data_wait.stepped()
      step += 1
      profiler.after(step)
      window_steps += 1
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
      if metrics["skipped"]:
        logging.warning(
            "step %d: loss or gradient not finite: %s (%d such steps so far)", step,
            "step skipped, variables and optimizer state unchanged"
            if cfg.outer.nan_guard == "skip" else
            "the release's fallback (the variables as gradient) was applied",
            int(self.optimizer.num_skipped.numpy()))
      if step % cfg.log_steps == 0 or step == cfg.num_steps_limit:
        elapsed = time.time() - window_start
        rate = window_steps / max(elapsed, 1e-9)
        means = {k: v / window_steps for k, v in sums.items()}
        # Reptile fits its queries: its accuracy is a support-fit accuracy.
        accuracy_label = getattr(self.learner, "train_accuracy_label", "train_acc")
        eta = (cfg.num_steps_limit - step) / max(rate, 1e-9)
        logging.info("step %d  loss %.4f  query_loss %.4f  %s %.4f  "
                     "%.1f steps/s  data wait %.0f%%  ETA %s", step, means["loss"],
                     means["query_loss"], accuracy_label, means["accuracy"], rate,
                     100 * data_wait.fraction, progress_lib.format_seconds(eta))
        with writer.as_default(step=step):
          for k, v in means.items():
            tf.summary.scalar("train/" + k, v)
          tf.summary.scalar("train/steps_per_second", rate)
          tf.summary.scalar("train/data_wait_fraction", data_wait.fraction)
          tf.summary.scalar("train/skipped_steps_total",
                            float(self.optimizer.num_skipped.numpy()))
        window_start, window_steps, sums, data_wait = time.time(), 0, {}, DataWait()
      scheduled = step % cfg.checkpoint_steps == 0 or step == cfg.num_steps_limit
      if scheduled:
        best = self._validate_and_keep_best(step, best, writer)
        self._save(step)
      self.stopped_by = stop_requested() if stop_requested else None
      if self.stopped_by:
        if not scheduled:
          self._save(step)
        logging.warning("%s: saved a checkpoint at step %d", self.stopped_by, step)
        break
      if step >= cfg.num_steps_limit:
        break
    return step

  def _validate_and_keep_best(self, step, best, writer):
    result = self.validate() if self.is_chief else None
    if result is None:
      return best
    logging.info("step %d  validation accuracy %s", step, result.as_percent())
    with writer.as_default(step=step):
      tf.summary.scalar("valid/accuracy", result.accuracy)
    if self.config.keep_best and result.accuracy > best:
      # Before the regular save: a kill in between replays this step,
      # which validates to the same accuracy, so best/ never misses it.
      self._save_best(step, result)
      logging.info("step %d  new best validation accuracy: saved to %s",
                   step, self.best_dir)
      return result.accuracy
    return best
