"""tf.distribute for meta-training: strategies, sharded episodes, combined steps.

Strategies (`make_strategy`):
  default       one device (tf.distribute's default strategy: no replication);
  mirrored      MirroredStrategy over all local GPUs, an explicit device list,
                or the logical CPU devices made by `configure_logical_cpus`;
  multi_worker  MultiWorkerMirroredStrategy from the TF_CONFIG environment
                variable (one process per worker).

A meta-batch of B tasks is split over the R replicas (B % R == 0, else a
ConfigError): each replica computes its learner's mean loss and gradients on
its B/R tasks, scales them by (B/R)/B and the replicas are summed with an
all-reduce. The sum is the full meta-batch's gradient, so LEO's NaN guard and
clipping (by value, then per-tensor norm) see exactly what they see on one
device, and the update equals the single-device update (up to float
reassociation). Clipping per replica before the sum would not.

Episodes are sharded by task index before batching: worker w of W draws tasks
w, w + W, ... of the (seed, index) stream, and its local replicas take
consecutive per-replica batches, so step s covers exactly the tasks
s*B .. (s+1)*B - 1 of the single-device run, no task twice.

Randomness: every replica receives the step seed folded with its replica id
(R > 1), so replicas draw independent dropout / latent noise; a learner's
noise is therefore not the same draw as on one device (only its distribution
is). Deterministic learners (MAML, iMAML, R2D2, L2F; LEO at training=False)
give the single-device update to float precision.
"""

import json
import os
from typing import Optional, Sequence

import tensorflow as tf

from leo_suite import errors

STRATEGIES = ("default", "mirrored", "multi_worker")


def configure_logical_cpus(num_devices: int):
  """Splits the physical CPU into `num_devices` logical devices /cpu:0.. .

  Must run before TensorFlow initialises its devices (before any op runs);
  used to exercise `mirrored` on a machine without GPUs.
  """
  if num_devices < 1:
    raise errors.ConfigError(f"--num_cpu_devices={num_devices}: must be at least 1")
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as exc:
    current = len(tf.config.list_logical_devices("CPU"))
    if current == num_devices:
      return
    raise errors.ConfigError(
        f"cannot create {num_devices} logical CPU devices: TensorFlow has already "
        f"initialised {current} ({exc}); configure them before any TF op runs") from exc


def parse_devices(text: str):
  """'/cpu:0,/cpu:1' -> ['/cpu:0', '/cpu:1'] ('' -> None: pick automatically)."""
  devices = [d.strip() for d in (text or "").split(",") if d.strip()]
  return devices or None


def _check_tf_config():
  raw = os.environ.get("TF_CONFIG")
  if not raw:
    raise errors.ConfigError(
        "--distribution_strategy=multi_worker needs the TF_CONFIG environment variable "
        '(e.g. {"cluster": {"worker": ["host0:port", "host1:port"]}, "task": '
        '{"type": "worker", "index": 0}}), set differently in each worker process')
  try:
    spec = json.loads(raw)
    workers = spec["cluster"]["worker"]
    task = spec["task"]
    index = int(task["index"])
  except (ValueError, KeyError, TypeError) as exc:
    raise errors.ConfigError(
        f"TF_CONFIG is not valid: {exc!r}; expected JSON with cluster.worker (a list of "
        "host:port) and task.type/task.index") from exc
  if not 0 <= index < len(workers):
    raise errors.ConfigError(
        f"TF_CONFIG task.index={index} but cluster.worker lists {len(workers)} workers")


def make_strategy(name: str = "default", devices: Optional[Sequence[str]] = None):
  """Builds the named strategy (see the module docstring)."""
  if name == "default":
    if devices:
      raise errors.ConfigError(
          "--devices needs --distribution_strategy=mirrored (default uses one device)")
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices is None:
      gpus = tf.config.list_logical_devices("GPU")
      devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    def key(name):
      spec = tf.DeviceSpec.from_string(name)
      return ((spec.device_type or "").upper(), spec.device_index or 0)
    known = {key(d.name) for d in tf.config.list_logical_devices()}
    for device in devices:
      try:
        found = key(device) in known
      except ValueError:
        found = False
      if not found:
        raise errors.ConfigError(
            f"--devices: {device!r} is not a device of this machine; available: "
            f"{sorted(d.name for d in tf.config.list_logical_devices())} (more CPU devices: "
            "--num_cpu_devices)")
    return tf.distribute.MirroredStrategy(devices)
  if name == "multi_worker":
    _check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise errors.ConfigError(
      f"--distribution_strategy={name!r}: choose one of {', '.join(STRATEGIES)}")


def is_default(strategy) -> bool:
  """True for no strategy or tf.distribute's default (single-device) one."""
  return strategy is None or type(strategy).__name__ == "_DefaultDistributionStrategy"


def splits_batches(strategy) -> bool:
  """True where a batch is split over local replicas (mirrored, several devices).

  Not for one device, nor for MultiWorkerMirroredStrategy, whose workers each
  evaluate the whole set locally.
  """
  return not (is_default(strategy) or
              isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy))


def num_replicas(strategy) -> int:
  return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def worker_info(strategy):
  """(is_chief, worker index, number of workers) of this process."""
  resolver = getattr(strategy.extended, "_cluster_resolver", None) if strategy else None
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True, 0, 1
  task_type, task_id = resolver.task_type, resolver.task_id or 0
  num_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
  is_chief = task_type in (None, "chief") or (task_type == "worker" and task_id == 0)
  return is_chief, int(task_id), num_workers


def check_batch(strategy, global_batch: int, flag="metatrain_batch_size", unit="tasks"):
  """The per-replica batch; a ConfigError unless the batch splits evenly over the replicas."""
  replicas = num_replicas(strategy)
  if global_batch % replicas:
    divisible = [b for b in range(replicas, 4 * replicas + 1, replicas)]
    raise errors.ConfigError(
        f"--{flag}={global_batch} {unit} cannot be split evenly over {replicas} replicas; "
        f"use a multiple of {replicas} (e.g. {divisible[:3]}) or fewer devices")
  return global_batch // replicas


def distributed_episodes(strategy, sampler, seed: int, global_batch: int, start: int = 0):
  """Per-replica meta-batches of an infinite task stream, sharded before batching.

  Step s of the returned distributed dataset holds tasks start + s*B ..
  start + (s+1)*B - 1 in total over all replicas (see module docstring).
  """
  check_batch(strategy, global_batch)

  def dataset_fn(context: tf.distribute.InputContext):
    per_replica = context.get_per_replica_batch_size(global_batch)
    return sampler.dataset(seed, per_replica, start=start,
                           num_shards=context.num_input_pipelines,
                           shard_index=context.input_pipeline_id)

  return strategy.distribute_datasets_from_function(dataset_fn)


def replica_seed(seed):
  """The step seed, folded with the replica id when there are several replicas."""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return seed
  return tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)


def scaled_loss_and_gradients(compute, episode, seed, global_batch: int):
  """One replica's share: its mean loss/gradients/metrics times local_B / B.

  Summing these over the replicas gives the meta-batch mean (learners return
  means over their local tasks; regularisers added once per replica sum to
  one copy since the local batch sizes sum to B).
  """
  loss, grads, metrics = compute(episode, replica_seed(seed))
  local = tf.cast(tf.shape(episode.support_x)[0], loss.dtype)
  scale = local / tf.cast(global_batch, loss.dtype)
  grads = [g * tf.cast(scale, g.dtype) for g in grads]
  metrics = {k: tf.cast(v, tf.float32) * tf.cast(scale, tf.float32)
             for k, v in metrics.items()}
  return loss * scale, grads, metrics


def sum_over_replicas(strategy, per_replica):
  """All-reduce sum of a nest of per-replica values to one (cross-replica) value."""
  # One reduce per tensor: MultiWorkerMirroredStrategy's packed reduce of a
  # nest fails on tensors of different ranks.
  return tf.nest.map_structure(
      lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None),
      per_replica)


def local_concat(strategy, per_replica):
  """Concatenates this worker's replicas' values in replica order (no collectives)."""
  return tf.concat(strategy.experimental_local_results(per_replica), axis=0)
