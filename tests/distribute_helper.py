"""Subprocess side of tests/test_distribute.py (logical devices, TF_CONFIG).

Logical CPU devices must be configured before TensorFlow initialises its
devices, and MultiWorkerMirroredStrategy needs one process per worker, so the
checks run here and report to the test as JSON / checkpoints.

  python tests/distribute_helper.py mirrored OUT_DIR
      default and mirrored on 2 logical CPUs: trains every learner two steps
      (4 logical CPUs: FOUR_REPLICA_MODELS) through Trainer (real EpisodeSampler, sharded stream), evaluates,
      restores checkpoints across strategies; writes OUT_DIR/report.json and
      OUT_DIR/<strategy>/<model>/ckpt-2.
  python tests/distribute_helper.py multi_worker OUT_DIR INDEX PORT0,PORT1
      one worker of a two-worker MultiWorkerMirroredStrategy on 127.0.0.1;
      the chief writes OUT_DIR/multi_worker/<model>/ckpt-2 (MULTI_WORKER_MODELS).
"""

import json
import os
import sys

import numpy as np

def _models():
  """$LEO_SUITE_MODELS (comma list), else every registered learner."""
  chosen = [m for m in os.environ.get("LEO_SUITE_MODELS", "").split(",") if m]
  if chosen:
    return tuple(chosen)
  from leo_suite.models import registry  # pylint: disable=import-outside-toplevel
  return tuple(registry.LEARNERS)


MODELS = _models()
# Every learner is checked on one device against 2 replicas; the cases that do
# not depend on the learner (4 replicas, two worker processes) use a few: each
# replica and worker traces every learner again, and tracing is the cost here.
FOUR_REPLICA_MODELS = tuple(m for m in ("leo", "maml") if m in MODELS)
MULTI_WORKER_MODELS = tuple(m for m in ("leo", "maml", "protonet") if m in MODELS)
NUM_WAYS, NUM_SHOTS, NUM_QUERIES, DIM, BATCH = 3, 2, 3, 16, 4
# Small but non-trivial: every learner's inner loop, LEO's relation network.
OVERRIDES = {"leo": dict(num_latents=4, inner_unroll_length=2, finetuning_unroll_length=2),
             "maml": dict(inner_steps=3), "imaml": dict(inner_steps=3, cg_steps=3),
             "r2d2": dict(projection_dim=8), "l2f": dict(hidden_sizes="8", inner_steps=2),
             "hallucination": dict(num_hallucinated=2, noise_dim=4, hidden_sizes="8"),
             "snail": dict(input_dim=8, key_sizes="8,8", value_sizes="4,4", tc_filters=8,
                           sequence_length=7),
             "protonet": dict(map_dim=8), "matching": dict(fce=True, map_dim=8),
             "relation": dict(map_dim=8, module_hidden_sizes="8,4"),
             "reptile": dict(hidden_sizes="8", inner_steps=3),
             "meta_lstm": dict(hidden_sizes="8", inner_steps=3, lstm_units=3)}


def make_split():
  from leo_suite.data import embeddings
  rng = np.random.default_rng(0)
  counts = [7, 8, 6, 9, 7, 8, 10]
  rows = [rng.standard_normal(DIM) + 0.7 * rng.standard_normal((c, DIM)) for c in counts]
  starts = np.cumsum([0] + counts[:-1])
  return embeddings.EmbeddingSplit(
      np.concatenate(rows).astype(np.float32), [f"c{i}" for i in range(len(counts))],
      np.asarray(starts, np.int64), np.asarray(counts, np.int64),
      [f"img{i}" for i in range(sum(counts))], {})


def build_learner(model):
  """Same initial values in every strategy (seeded just before building)."""
  import tensorflow as tf
  from leo_suite.models import leo
  from leo_suite.models import registry
  config = registry.spec(model).config_class(**OVERRIDES.get(model, {}))
  tf.random.set_seed(7)
  if model in NOISY:
    return _deterministic_class(model)(config, NUM_WAYS, DIM)
  return registry.build(model, config, NUM_WAYS, DIM)


# Learners whose training step draws noise: model -> class.
NOISY = {"leo": "LEO", "hallucination": "Hallucination"}


def _deterministic_class(model):
  import importlib
  from leo_suite.models import registry

  class _Deterministic(getattr(importlib.import_module(registry.LEARNERS[model]), NOISY[model])):
    """The learner on its training=False path (LEO: no dropout/latent noise;
    hallucination: G's fixed evaluation noise), everything else (relation net,
    both second-order inner loops, penalties, G's gradients) unchanged: replicas
    draw their own noise, so only the noise-free step can match one device."""

    def meta_loss(self, episode, *, training, seed):
      del training
      return super().meta_loss(episode, training=False, seed=seed)

  return _Deterministic


def train_two_steps(strategy, model, checkpoint_path, per_replica_clip=False):
  import tensorflow as tf
  from leo_suite import distribute
  from leo_suite.data import episodes
  from leo_suite.models import transforms
  from leo_suite.training import optim
  from leo_suite.training import trainer as trainer_lib
  sampler = episodes.EpisodeSampler(make_split(), episodes.EpisodeSpec(
      NUM_WAYS, NUM_SHOTS, NUM_QUERIES))
  with strategy.scope():
    learner = build_learner(model)
  config = trainer_lib.TrainConfig(checkpoint_path=checkpoint_path, num_steps_limit=2,
                                   metatrain_batch_size=BATCH, checkpoint_steps=2,
                                   outer=optim.OuterConfig(learning_rate=1e-2), seed=3,
                                   log_steps=1)
  trainer = trainer_lib.Trainer(learner, config, sampler, strategy=strategy)
  if per_replica_clip:  # the wrong order, to show the test can tell
    def wrong_step(episode, seed):
      def share(e, s):
        loss, grads, metrics = distribute.scaled_loss_and_gradients(
            trainer._replica_compute, e, s, BATCH)
        clip = transforms.chain(transforms.clip_by_value(0.1), transforms.clip_by_tensor_norm(0.1))
        grads = [g * strategy.num_replicas_in_sync for g in grads]
        return loss, clip.update(grads, clip.init(grads))[0], metrics
      loss, grads, metrics = distribute.sum_over_replicas(
          strategy, strategy.run(share, args=(episode, seed)))
      grads = [g / strategy.num_replicas_in_sync for g in grads]
      return trainer._apply(loss, grads, metrics)
    trainer._train_step = tf.function(wrong_step)
  trainer.train()
  return trainer


def evaluation_check(strategies):
  """Per-task accuracies of a fixed set (13 tasks, batches of 6) per strategy.

  The last batch holds one task, so one of two replicas gets an empty batch.
  """
  from leo_suite import distribute
  from leo_suite.data import episodes
  from leo_suite.training import evaluation
  sampler = episodes.EpisodeSampler(make_split(), episodes.EpisodeSpec(
      NUM_WAYS, NUM_SHOTS, NUM_QUERIES))
  out = {}
  for model in MODELS:
    dataset = sampler.fixed_set(5, 13, 6)
    results = {"default": evaluation.Evaluator(build_learner(model)).per_task_accuracy(dataset)}
    for name, strategy in strategies.items():
      if name == "mirrored4" and model != "maml":
        continue  # tracing each learner per replica is slow; 2 replicas cover the cases
      with strategy.scope():
        learner = build_learner(model)
      results[name] = evaluation.Evaluator(learner, strategy).per_task_accuracy(dataset)
    out[model] = {k: v.tolist() for k, v in results.items()}
  return out


def restore_check(strategy, out_dir):
  """Checkpoints cross strategies: mirrored -> none and none -> mirrored.

  Restored values must equal the stored tensors exactly (compared as a
  multiset of (dtype, shape, bytes): the learner's and Adam's variables), and
  every replica's copy must equal the first.
  """
  import collections
  import tensorflow as tf
  from leo_suite.training import optim
  report = {}
  for model in MODELS:
    mirrored = "mirrored4" if model in FOUR_REPLICA_MODELS else "mirrored2"
    for source, target in ((mirrored, None), ("default", strategy)):
      path = os.path.join(out_dir, source, model, "ckpt-2")
      stored = checkpoint_variables(path)
      scope = target.scope() if target else tf.distribute.get_strategy().scope()
      with scope:
        learner = build_learner(model)
        outer = optim.OptimizerState(
            optim.build_chain(optim.OuterConfig(learning_rate=1e-2)),
            learner.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      tf.train.Checkpoint(learner=learner, optimizer=outer, step=step).restore(
          path).assert_existing_objects_matched()
      restored, copies_agree, num_copies = [], True, 1
      for var in list(learner.variables) + list(outer.variables) + [step]:
        copies = [np.asarray(c.numpy()) for c in (
            target.experimental_local_results(var) if target else [var])]
        num_copies = max(num_copies, len(copies))
        copies_agree &= all(np.array_equal(c, copies[0]) for c in copies)
        restored.append(copies[0])
      key = lambda a: (str(a.dtype), a.shape, a.tobytes())
      report[f"{'default' if target else 'mirrored'}->{'mirrored' if target else 'none'}/{model}"] = {
          "num_copies": num_copies, "copies_agree": bool(copies_agree),
          "step": int(step.numpy()), "num_stored": len(stored),
          "exact": collections.Counter(map(key, restored)) ==
                   collections.Counter(map(key, stored.values()))}
  return report


def checkpoint_variables(path):
  import tensorflow as tf
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith(("learner/", "optimizer/", "step/")) and "OBJECT_GRAPH" not in name}


def run_mirrored(out_dir):
  from leo_suite import distribute
  distribute.configure_logical_cpus(4)
  import tensorflow as tf
  strategies = {
      "mirrored2": distribute.make_strategy("mirrored", ["/cpu:0", "/cpu:1"]),
      "mirrored4": distribute.make_strategy("mirrored", None),
  }
  report = {"num_replicas": {k: s.num_replicas_in_sync for k, s in strategies.items()}}
  for model in MODELS:
    train_two_steps(tf.distribute.get_strategy(), model,
                    os.path.join(out_dir, "default", model))
    for name, strategy in strategies.items():
      if name == "mirrored4" and model not in FOUR_REPLICA_MODELS:
        continue
      train_two_steps(strategy, model, os.path.join(out_dir, name, model))
    if model == "maml":
      train_two_steps(strategies["mirrored4"], model,
                      os.path.join(out_dir, "per_replica_clip", model), per_replica_clip=True)
  # An uneven meta-batch is refused with a ConfigError.
  try:
    distribute.check_batch(strategies["mirrored4"], 6)
    report["uneven_error"] = None
  except Exception as exc:  # pylint: disable=broad-except
    report["uneven_error"] = f"{type(exc).__name__}: {exc}"
  report["evaluation"] = evaluation_check(strategies)
  report["restore"] = restore_check(strategies["mirrored2"], out_dir)
  with open(os.path.join(out_dir, "report.json"), "w") as handle:
    json.dump(report, handle)


def run_multi_worker(out_dir, index, ports):
  os.environ["TF_CONFIG"] = json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
      "task": {"type": "worker", "index": int(index)}})
  from leo_suite import distribute
  strategy = distribute.make_strategy("multi_worker")
  for model in MULTI_WORKER_MODELS:
    train_two_steps(strategy, model, os.path.join(out_dir, "multi_worker", model))
  with open(os.path.join(out_dir, f"worker{index}.json"), "w") as handle:
    json.dump({"num_replicas": strategy.num_replicas_in_sync,
               "worker_info": list(distribute.worker_info(strategy))}, handle)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if os.environ.get("LEO_SUITE_DUMP_STACKS_AFTER"):  # debugging hangs
    import faulthandler
    faulthandler.dump_traceback_later(float(os.environ["LEO_SUITE_DUMP_STACKS_AFTER"]),
                                      exit=True)
  if sys.argv[1] == "mirrored":
    run_mirrored(sys.argv[2])
  elif sys.argv[1] == "multi_worker":
    run_multi_worker(*sys.argv[2:5])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
