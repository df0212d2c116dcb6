"""Supervised feature pretraining on the meta-train classes.

A backbone plus a linear head is trained with cross-entropy over the
meta-train classes only (Chen et al. 2019 "Baseline"; Tian et al. 2020 RFS;
LEO's appendix). For Omniglot (Vinyals et al. 2016, Snell et al. 2017):
28x28, inverted strokes (x -> 1 - x) and rotations by 90/180/270 degrees as
extra training classes (label = 4 * class + k); no rotations at test time.

Determinism and resume: epoch e visits the images in the order
`permutation(seed, e)`, in full batches; augmentation at global step s uses the
stateless seed (seed, s). A run is therefore a pure function of (config,
data), and a run killed at any point and restarted from its last checkpoint
(tf.train.CheckpointManager: model, optimizer slots and iteration count, step)
ends with the same weights as an uninterrupted one.

Outputs under `out_dir`:
  checkpoints/          CheckpointManager checkpoints (resume state)
  logs/                 TensorBoard summaries (loss, accuracy, learning rate)
  backbone/backbone.weights.h5 + backbone.json   the exported feature extractor

Several devices or workers (a tf.distribute strategy from
`leo_suite.distribute.make_strategy`: mirrored, multi_worker): the global batch
of step s (the same images as on one device) is split into R equal, disjoint
shares of consecutive rows, one per replica, before it reaches the devices;
each share carries its row offset, so its augmentation is its rows of the
global batch's draw. Each replica's loss (mean cross-entropy over its share
plus the weight decay) is scaled by share / global batch, and the optimizer
sums the replicas' gradients: the update is the single-device one on the same
global batch (the optimizer, a Keras 3 one, is built inside the strategy's
scope before the first step). Batch norm is synchronised (Keras
`synchronized=True`: the mean and variance of the global batch, all-reduced;
the moving statistics follow, identical on every replica), so the forward
pass and the gradients match one device up to float reassociation (the
synchronised variance is E[x^2] - E[x]^2, one pass, where one device takes
E[(x - mean)^2]): ~1e-5 relative per step (tests/test_pretrain_distribute.py,
which also shows two float32 effects that are not distribution's: oneDNN's
shape-dependent convolution kernels, and max-pooling ties on images with a
constant background, which let any two float32 evaluations of a step differ
by up to ~1e-2 in the first layers). With `sync_batch_norm=False` each replica
normalises with its own share's statistics (cheaper; no longer the
single-device update). Dropout draws differ per replica (not the
single-device draw, the same distribution). Checkpoints, summaries and the
export are written by the chief only; other workers write theirs (every
worker must take part) into a scratch directory that is removed at once.
Checkpoints hold the same objects under every strategy, so a run may resume
under another one.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from leo_suite import distribute
from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite.data import image_views
from leo_suite.pretrain import classifier as classifier_lib
from leo_suite.pretrain import pretrain_config

def _scalar_summary(name, value):
  """A TensorBoard scalar (what tensorboard's summary.scalar writes).

  The `tensorboard` package is not a dependency, so `tf.summary.scalar` is not
  available; this writes the same event with the "scalars" plugin metadata.
  """
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = "scalars"
  tf.summary.write(name, tf.cast(value, tf.float32),
                   metadata=metadata.SerializeToString())


def _learning_rate(config: pretrain_config.PretrainConfig, total_steps: int):
  if config.schedule == "cosine":
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate if not config.warmup_steps else config.learning_rate * 0.1,
        decay_steps=max(1, total_steps - config.warmup_steps),
        warmup_target=config.learning_rate if config.warmup_steps else None,
        warmup_steps=config.warmup_steps)
  boundaries = [int(total_steps * 0.6), int(total_steps * 0.8)]
  values = [config.learning_rate, config.learning_rate * 0.1, config.learning_rate * 0.01]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def _use_mixed_precision(config: pretrain_config.PretrainConfig) -> bool:
  has_gpu = bool(tf.config.list_physical_devices("GPU"))
  if config.mixed_precision == "on" and not has_gpu:
    raise errors.ConfigError(
        "--mixed_precision=on needs a GPU and none is visible; use auto or off")
  return has_gpu and config.mixed_precision in ("auto", "on")


def replica_shares(order, replicas: int, share: int, pipelines: int = 1,
                   pipeline_id: int = 0):
  """One input pipeline's shares of consecutive global batches of `order`.

  `order` holds whole global batches of replicas * share rows. Pipeline p of
  P serves replicas p*L .. (p+1)*L - 1 (L = replicas / P): per global batch,
  its L shares of `share` consecutive rows, in replica order. Returns (rows
  [steps * L, share], the offset of each share in its global batch).
  """
  local = replicas // pipelines
  first = pipeline_id * local
  rows = np.asarray(order).reshape(-1, replicas, share)[:, first:first + local]
  offsets = np.tile(np.arange(first, first + local) * share, rows.shape[0])
  return rows.reshape(-1, share), offsets


class Pretrainer:
  """Trains `config.backbone` on (images uint8 [n, S, S, C], labels [n]).

  `strategy`: a tf.distribute strategy (default: one device); see the module
  docstring for how the global batch is split and what is synchronised.
  """

  def __init__(self, config: pretrain_config.PretrainConfig, images: np.ndarray,
               labels: np.ndarray, out_dir: str, class_names: Sequence[str] = (),
               log: Callable[[str], None] = print, strategy=None,
               sync_batch_norm: bool = True):
    pretrain_config.validate_config(config)
    if images.ndim != 4 or images.shape[1:] != (config.image_size, config.image_size,
                                                config.channels):
      raise errors.DataError(
          f"training images have shape {images.shape}, expected "
          f"[n, {config.image_size}, {config.image_size}, {config.channels}]")
    self.config = config
    self.out_dir = out_dir
    self.log = log
    self.class_names = list(class_names)
    labels = np.asarray(labels, np.int32)
    self.num_base_classes = int(labels.max()) + 1
    if config.rotations:
      images, labels = image_views.rotated_copies(images, labels)
    self.num_classes = int(labels.max()) + 1
    if len(labels) < config.batch_size:
      raise errors.ConfigError(
          f"--batch_size={config.batch_size} exceeds the {len(labels)} training images")
    self.images = tf.constant(images)
    self.labels = tf.constant(labels)
    self.num_images = len(labels)
    self.steps_per_epoch = self.num_images // config.batch_size
    self.total_steps = self.steps_per_epoch * config.epochs

    self.strategy = strategy or tf.distribute.get_strategy()
    self.replicas = distribute.num_replicas(self.strategy)
    self.replica_batch = distribute.check_batch(self.strategy, config.batch_size,
                                                "batch_size", "images")
    self.is_chief, self.worker_index, _ = distribute.worker_info(self.strategy)
    # A non-chief worker writes its checkpoints and export here (then removes them).
    self._scratch = None if self.is_chief else os.path.join(out_dir,
                                                            f".worker-{self.worker_index}")

    keras.utils.set_random_seed(config.seed)
    self.mixed = _use_mixed_precision(config)
    with self.strategy.scope():
      self.backbone, self.classifier = classifier_lib.build_classifier(
          config, self.num_classes, self.mixed,
          synchronized_batch_norm=sync_batch_norm and self.replicas > 1)
      optimizer = keras.optimizers.SGD(_learning_rate(config, self.total_steps),
                                       momentum=config.momentum, nesterov=True)
      if self.mixed:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
      # Keras 3: build slots (inside the strategy's scope) before the first
      # (traced) step.
      optimizer.build(self.classifier.trainable_variables)
      self.optimizer = optimizer
      self.teacher, self.teacher_description = (
          classifier_lib.load_teacher(config.teacher, self.num_classes, config.image_size,
                                      config.channels)
          if config.teacher else (None, None))
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.checkpoint = tf.train.Checkpoint(
        classifier=self.classifier, optimizer=self.optimizer, step=self.step)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(out_dir, "checkpoints"), max_to_keep=3)
    self._kernels = [v for v in self.classifier.trainable_variables
                     if "kernel" in v.path]
    self._train_step = tf.function(self._step_fn, autograph=False)
    self._first_step = 0
    self._saved_distribution = []  # the restored record's "distribution"

  # -- state -------------------------------------------------------------------
  def _config_path(self):
    return os.path.join(self.out_dir, "checkpoints", "pretrain_config.json")

  def restore(self) -> int:
    """Restores the latest checkpoint if any (checking the config); returns the step."""
    latest = self.manager.latest_checkpoint
    if not latest:
      return 0
    saved = {}
    if os.path.exists(self._config_path()):
      with safeio.open_regular(self._config_path(), error=errors.ConfigError) as handle:
        saved = json.load(handle)
    self._saved_distribution = saved.get("distribution", [])
    current = dataclasses.asdict(self.config)
    ignorable = {"log_every", "checkpoint_every", "mixed_precision"}
    changed = sorted(k for k in current if k not in ignorable and
                     k in saved.get("config", {}) and saved["config"][k] != current[k])
    if changed:
      was = ", ".join(f"{k}={saved['config'][k]!r}" for k in changed)
      raise errors.ConfigError(
          f"{os.path.dirname(self._config_path())}: the checkpoint was written with "
          f"different settings ({was}); "
          "use a new --out_dir or the original flags")
    data = {"num_classes": self.num_classes, "num_images": self.num_images}
    if self.class_names:
      data["train_classes"] = self.class_names
    other = [k for k in data if k in saved and saved[k] != data[k]]
    if other:
      said = ", ".join("other training classes" if k == "train_classes" else
                       f"{k} {saved[k]} then, {data[k]} now" for k in other)
      raise errors.ConfigError(
          f"{os.path.dirname(self._config_path())}: the checkpoint was trained on other "
          f"data ({said}); use a new --out_dir (the pipeline's --work_dir) or the "
          "original images and split")
    self.checkpoint.restore(latest).assert_existing_objects_matched()
    self.log(f"resumed from {latest} at step {int(self.step.numpy())}")
    return int(self.step.numpy())

  def _save(self):
    if not self.is_chief:  # every worker must save; only the chief keeps it
      self.checkpoint.write(os.path.join(self._scratch, "ckpt"))
      shutil.rmtree(self._scratch, ignore_errors=True)
      return
    fileio.atomic_write_text(self._config_path(), json.dumps(
        {"config": dataclasses.asdict(self.config), "num_classes": self.num_classes,
         "num_images": self.num_images, "distribution": self._distribution_history(),
         **({"train_classes": self.class_names} if self.class_names else {})},
        indent=2, sort_keys=True))
    self.manager.save(checkpoint_number=int(self.step.numpy()))

  def _distribution_history(self):
    """[{from_step, strategy, replicas, workers}]: how each stretch of steps
    was distributed (a resumed run may use another strategy; the steps are
    the same maths, the record says which ran)."""
    history = list(self._saved_distribution)
    now = {"strategy": type(self.strategy).__name__, "replicas": self.replicas,
           "workers": int(getattr(self.strategy.extended, "_num_workers", 1) or 1)}
    if not history or {k: history[-1][k] for k in now} != now:
      # Steps before this process's first save ran under the previous entry.
      history.append(dict(now, from_step=self._first_step))
    return history

  # -- the step ----------------------------------------------------------------
  def _replica_step(self, batch_images, batch_labels, offset, seed):
    """One replica's share (rows offset.. of the global batch): its loss scaled
    by share / global batch; the optimizer sums the replicas' gradients."""
    config = self.config
    scale = self.replica_batch / config.batch_size  # 1.0 on one replica
    x = image_views.preprocess(batch_images, config.invert)
    x = image_views.augment_batch(x, seed, config.augment, config.max_shift,
                                  rows=(offset, config.batch_size))
    teacher_logits = (None if self.teacher is None
                      else tf.stop_gradient(self.teacher(x, training=False)))
    with tf.GradientTape() as tape:
      logits = self.classifier(x, training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          batch_labels, tf.cast(logits, tf.float32)))
      if teacher_logits is not None:
        alpha = config.distill_alpha
        loss = (1.0 - alpha) * loss + alpha * classifier_lib.distillation_loss(
            logits, teacher_logits, config.distill_temperature)
      total = loss + 0.5 * config.weight_decay * tf.add_n(
          [tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in self._kernels])
      total = total * scale
      if self.mixed:
        total = self.optimizer.scale_loss(total)
    grads = tape.gradient(total, self.classifier.trainable_variables)
    self.optimizer.apply_gradients(zip(grads, self.classifier.trainable_variables))
    hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch_labels)
    return loss * scale, tf.reduce_mean(tf.cast(hits, tf.float32)) * scale

  def _step_fn(self, batch_images, batch_labels, offsets, seed):
    shares = self.strategy.run(self._replica_step,
                               args=(batch_images, batch_labels, offsets, seed))
    self.step.assign_add(1)
    return distribute.sum_over_replicas(self.strategy, shares)

  def _epoch_order(self, epoch):
    rng = np.random.default_rng([self.config.seed, epoch])
    return rng.permutation(self.num_images)[:self.steps_per_epoch * self.config.batch_size]

  def _dataset(self, epoch, first_batch):
    """Per step, each replica's share of global batch s (rows s*B .. of the
    epoch's order, as on one device): (images, labels, row offset); each input
    pipeline (worker) builds its replicas' shares (`replica_shares`)."""
    order = self._epoch_order(epoch)[first_batch * self.config.batch_size:]
    images, labels = self.images, self.labels

    def dataset_fn(context: tf.distribute.InputContext):
      rows, offsets = replica_shares(order, self.replicas, self.replica_batch,
                                     context.num_input_pipelines, context.input_pipeline_id)
      return (tf.data.Dataset.from_tensor_slices((rows.astype(np.int64),
                                                  offsets.astype(np.int64)))
              .map(lambda idx, offset: (tf.gather(images, idx), tf.gather(labels, idx),
                                        offset))
              .prefetch(2))

    return self.strategy.distribute_datasets_from_function(dataset_fn)

  def train(self, stop_after_steps: Optional[int] = None,
            epoch_callback: Optional[Callable[[int, keras.Model], Dict[str, float]]] = None):
    """Runs (or resumes) training; returns a summary dict. Exports at the end."""
    config = self.config
    step = self._first_step = self.restore()
    writer = (tf.summary.create_file_writer(os.path.join(self.out_dir, "logs"))
              if self.is_chief else tf.summary.create_noop_writer())
    history: List[dict] = []
    base_seed = tf.constant([config.seed, 0], tf.int32)
    start_time = time.time()
    images_done = 0
    stopped = False
    while step < self.total_steps and not stopped:
      epoch, first_batch = divmod(step, self.steps_per_epoch)
      losses, accs = [], []
      for batch_images, batch_labels, offsets in self._dataset(epoch, first_batch):
        seed = tf.random.experimental.stateless_fold_in(base_seed, step)
        loss, acc = self._train_step(batch_images, batch_labels, offsets, seed)
        step += 1
        images_done += config.batch_size
        losses.append(float(loss))
        accs.append(float(acc))
        if step % config.log_every == 0 or step == self.total_steps:
          with writer.as_default(step=step):
            _scalar_summary("train/loss", loss)
            _scalar_summary("train/accuracy", acc)
            _scalar_summary("train/learning_rate",
                              tf.cast(self.optimizer.learning_rate, tf.float32))
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          self._save()
        if stop_after_steps is not None and step >= stop_after_steps:
          stopped = True
          break
      if stopped:
        self._save()
        break
      record = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
                "accuracy": float(np.mean(accs)),
                "images_per_s": images_done / max(time.time() - start_time, 1e-9)}
      if epoch_callback is not None:
        record.update(epoch_callback(epoch + 1, self.backbone))
      with writer.as_default(step=step):
        for key, value in record.items():
          if key not in ("epoch", "step"):
            _scalar_summary(f"epoch/{key}", value)
      writer.flush()
      history.append(record)
      self.log("epoch {epoch}/{total}  step {step}  loss {loss:.4f}  acc {accuracy:.4f}"
               "  {images_per_s:.0f} images/s".format(total=config.epochs, **record) +
               "".join(f"  {k} {v:.4f}" for k, v in record.items()
                       if k not in ("epoch", "step", "loss", "accuracy", "images_per_s")))
      self._save()
    writer.close()
    summary = {"steps": step, "total_steps": self.total_steps, "finished": step >= self.total_steps,
               "history": history, "num_classes": self.num_classes,
               "num_base_classes": self.num_base_classes, "num_images": self.num_images}
    if summary["finished"]:
      export_dir = os.path.join(self._scratch or self.out_dir, "backbone")
      summary["export"] = classifier_lib.export_backbone(
          self.backbone, config, export_dir,
          {"train_classes": self.class_names, "num_train_images": self.num_images,
           "rotations_as_classes": config.rotations, "epochs": config.epochs,
           "teacher": self.teacher_description,
           "final_train_loss": history[-1]["loss"] if history else None})
      if self._scratch:
        shutil.rmtree(self._scratch, ignore_errors=True)
    return summary
