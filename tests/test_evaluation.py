"""Evaluation: the table path (class slices scored once per group of tasks)
gives exactly the per-task accuracies of the gather path on the same tasks."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data import embedding_keys

from leo_suite.data import embeddings
from leo_suite.data import episodes
from leo_suite.models import base
from leo_suite.models import registry
from leo_suite.pretrain import baselines
from leo_suite.training import evaluation

DIM = 16
# Learners whose classifier starts with a task-independent linear map of the
# query (a `Readout`): all of them. A learner without one goes through
# `predict` on class slices (the generic path, tested by disabling readouts).
LINEAR_READOUT = {"leo", "maml", "imaml", "r2d2", "protonet", "hallucination", "l2f",
                  "reptile", "meta_lstm", "matching", "relation", "snail"}


def clustered_split(counts, dim=DIM, spread=1.3, seed=0):
  """Classes around random centres, noisy enough that learners make mistakes."""
  rng = np.random.default_rng(seed)
  blocks, keys = [], []
  for c, count in enumerate(counts):
    centre = rng.standard_normal(dim)
    blocks.append(centre + spread * rng.standard_normal((count, dim)))
    keys += [embedding_keys.make_key(f"c{c}", i) for i in range(count)]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return embeddings.EmbeddingSplit(
      np.concatenate(blocks).astype(np.float32), [f"c{c}" for c in range(len(counts))],
      starts, np.asarray(counts, np.int64), keys, {})


def learner(model, num_ways):
  tf.random.set_seed(3)
  return registry.build(model, registry.spec(model).config_class(), num_ways, DIM)


def both_paths(model, split, spec, num_tasks=37, batch_size=8):
  evaluator = evaluation.Evaluator(learner(model, spec.num_ways))
  sampler = episodes.EpisodeSampler(split, spec)
  gather = evaluator.fixed_accuracy(sampler, 5, num_tasks, batch_size, method="gather")
  table = evaluator.fixed_accuracy(sampler, 5, num_tasks, batch_size, method="table")
  return gather, table


@pytest.mark.parametrize("model", registry.available())
def test_table_equals_gather_with_all_remaining_queries(model):
  split = clustered_split([9] * 8)
  gather, table = both_paths(model, split, episodes.EpisodeSpec(4, 2, 7))
  assert len(gather) == 37
  assert 0.0 < gather.mean() < 1.0 and np.ptp(gather) > 0  # mistakes that vary by task
  np.testing.assert_array_equal(table, gather)


def test_adaptation_in_parts_is_the_whole_batchs_in_order():
  traced = []

  def adapt(support_x, support_y):
    traced.append(int(support_x.shape[0]))
    return support_x * 2.0, {"labels": support_y + 1}
  x, y = tf.reshape(tf.range(12, dtype=tf.float32), [12, 1]), tf.range(12)
  doubled, labels = evaluation.adapt_in_parts(adapt, 5)(x, y)
  assert traced == [4, 4, 4]  # the largest divisor of 12 within 5: one shape
  np.testing.assert_array_equal(doubled, 2 * x.numpy())
  np.testing.assert_array_equal(labels["labels"], y.numpy() + 1)
  traced.clear()
  evaluation.adapt_in_parts(adapt, 5)(x[:7], y[:7])
  assert traced == [1] * 7  # 7 is prime: parts of one task
  assert evaluation.adapt_in_parts(adapt, None) is adapt


@pytest.mark.parametrize("model", ["meta_lstm", "maml"])
def test_adaptation_in_parts_scores_like_the_whole_batch(model, monkeypatch):
  """Batches of 8 adapted 3 tasks at most per part (parts of 2; the last
  batch of 5, parts of 1) give the accuracies of whole-batch adaptation."""
  split, spec = clustered_split([9] * 8), episodes.EpisodeSpec(4, 2, 7)
  whole, _ = both_paths(model, split, spec)
  monkeypatch.setattr(type(learner(model, 4)), "evaluation_adapt_tasks", 3)
  gather, table = both_paths(model, split, spec)
  assert 0.0 < whole.mean() < 1.0 and np.ptp(whole) > 0
  np.testing.assert_array_equal(table, whole)
  np.testing.assert_array_equal(gather, whole)  # the gather path adapts whole batches


@pytest.mark.parametrize("model", ["leo", "matching", "r2d2"])
def test_table_equals_gather_when_queries_are_part_of_unequal_classes(model):
  # Classes of 7..14 images, V = 4: the mask must keep exactly the drawn queries.
  split = clustered_split([7, 14, 9, 11, 8, 12, 10])
  gather, table = both_paths(model, split, episodes.EpisodeSpec(3, 1, 4))
  np.testing.assert_array_equal(table, gather)


@pytest.mark.parametrize("model", sorted(LINEAR_READOUT))
def test_linear_readouts_match_predict_and_the_generic_table_path(model, monkeypatch):
  split = clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 7)
  sampler = episodes.EpisodeSampler(split, spec)
  built = learner(model, spec.num_ways)
  episode = next(iter(sampler.fixed_set(1, 6, 6)))
  state = built.adapt(episode.support_x, episode.support_y, training=False,
                      seed=tf.zeros([2], tf.int32))
  readout = built.readout(state)
  assert readout is not None
  logits = built.predict(state, episode.query_x, training=False, seed=tf.zeros([2], tf.int32))
  rows = tf.reshape(episode.query_x, [6, -1, DIM])
  scores = tf.stack([readout.row_map(r) for r in rows])
  if readout.weights is not None:
    scores = tf.einsum("bqd,bnd->bqn", scores, readout.weights)
  if readout.bias is not None:
    scores += readout.bias[:, tf.newaxis]
  if readout.finish:
    scores = built.finish_readout(scores, evaluation.finish_state(readout, state))
  np.testing.assert_array_equal(np.argmax(scores, -1),
                                np.argmax(np.reshape(logits, [6, -1, spec.num_ways]), -1))
  evaluator = evaluation.Evaluator(built)
  linear = evaluator.fixed_accuracy(sampler, 5, 20, 4, method="table")
  monkeypatch.setattr(type(built), "readout", lambda self, state: None)
  generic = evaluation.Evaluator(built).fixed_accuracy(sampler, 5, 20, 4, method="table")
  np.testing.assert_array_equal(linear, generic)


def test_every_learner_is_covered_by_the_readout_tests():
  assert set(registry.available()) == LINEAR_READOUT


def test_auto_method_takes_the_table_only_when_queries_fill_the_classes():
  split = clustered_split([20] * 6)
  evaluator = evaluation.Evaluator(learner("protonet", 3))
  assert evaluator.method(episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 19))) == "table"
  assert evaluator.method(episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 5))) == "gather"
  with pytest.raises(ValueError, match="evaluation method"):
    evaluator.method(episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 5)), "fast")


@pytest.mark.parametrize("name", [n for n, b in baselines.BASELINES.items() if b.learner])
def test_baseline_learners_score_like_their_logit_functions_on_both_paths(name):
  baseline = baselines.BASELINES[name]
  assert baselines.RUNNER_BASELINES[baseline.flag] is baseline.learner
  split = clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 7)
  sampler = episodes.EpisodeSampler(split, spec)
  reference = np.concatenate([
      base.accuracy(baseline.logits(e.support_x, e.query_x), e.query_y).numpy()
      for e in sampler.fixed_set(5, 37, 8)])
  assert evaluation.evaluate_baseline(baseline.logits, sampler.fixed_set(5, 37, 8)) == (
      evaluation.summarise(reference))
  evaluator = evaluation.Evaluator(baseline.learner(spec.num_ways, DIM))
  for method in ("table", "gather"):
    np.testing.assert_array_equal(
        evaluator.fixed_accuracy(sampler, 5, 37, 8, method=method), reference)


def test_group_size_bounds_the_adapted_states_held_at_once():
  # One batch of 8 tasks whose state is 8 x (3 x 5) + 8 x 5 floats: 20 per task.
  state = (tf.zeros([8, 3, 5]), None, [tf.zeros([8, 5])])
  assert evaluation.table_group_tasks(state, 8, 8) == 8 * (evaluation.TABLE_GROUP_TASKS // 8)
  limit = evaluation.TABLE_STATE_FLOATS
  assert evaluation.table_group_tasks((tf.zeros([8, limit // 400]),), 8, 8) == 400
  assert evaluation.table_group_tasks((tf.zeros([8, limit // 399]),), 8, 8) == 392
  assert evaluation.table_group_tasks((tf.zeros([2, limit]),), 2, 8) == 8  # one batch at least


def test_chunk_bounds_rows_times_width_and_finished_readouts_get_the_smaller_budget():
  weights = tf.zeros([3, 64, 5])
  linear = base.Readout(tf.identity, weights, None, finish=False)
  finished = linear._replace(finish=True)
  shared = base.Readout(tf.identity, None, None, finish=True)
  big, small = evaluation.TABLE_CHUNK_FLOATS, evaluation.TABLE_FINISH_CHUNK_FLOATS
  assert small < big
  assert evaluation.table_chunk_tasks(linear, 600, 640) == big // (600 * 64)
  assert evaluation.table_chunk_tasks(finished, 600, 640) == small // (600 * 64)
  assert evaluation.table_chunk_tasks(shared, 600, 640) == small // (600 * 640)
  assert evaluation.table_chunk_tasks(None, 600, 640) == small // (600 * 640)
  # A readout that states its finish's floats per row and task is sized by them.
  assert evaluation.table_chunk_tasks(shared._replace(width=69), 600, 640) == small // (600 * 69)
  assert evaluation.table_chunk_tasks(linear, big, 640) == 1  # one task at least


@pytest.mark.parametrize("model", ["l2f", "leo"])
def test_small_state_budget_splits_groups_and_keeps_the_accuracies(model, monkeypatch):
  """With room for one batch of states per group, every group is one batch
  (adapt/score interleave) and the per-task accuracies equal the gather path's."""
  split = clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 7)
  evaluator = evaluation.Evaluator(learner(model, spec.num_ways))
  groups = []
  score_group = evaluator._score_group
  def counting(sampler, pending, correct, row_features):
    groups.append(sum(len(p[0]) for p in pending))
    return score_group(sampler, pending, correct, row_features)
  monkeypatch.setattr(evaluator, "_score_group", counting)
  monkeypatch.setattr(evaluation, "TABLE_STATE_FLOATS", 1)
  sampler = episodes.EpisodeSampler(split, spec)
  table = evaluator.fixed_accuracy(sampler, 5, 37, 8, method="table")
  assert groups == [8, 8, 8, 8, 5]
  gather = evaluator.fixed_accuracy(sampler, 5, 37, 8, method="gather")
  assert 0.0 < gather.mean() < 1.0 and np.ptp(gather) > 0
  np.testing.assert_array_equal(table, gather)


def small_chunks(monkeypatch, floats):
  """(spec, sampler) of 4-way 2-shot tasks on classes of 9 to 12 images, with
  both chunk bounds set to `floats`, so that a class's tasks span chunks."""
  spec = episodes.EpisodeSpec(4, 2, 7)
  sampler = episodes.EpisodeSampler(clustered_split([9, 11, 9, 10, 9, 12, 9, 9]), spec)
  monkeypatch.setattr(evaluation, "TABLE_CHUNK_FLOATS", floats)
  monkeypatch.setattr(evaluation, "TABLE_FINISH_CHUNK_FLOATS", floats)
  return spec, sampler


@pytest.mark.parametrize("model", ["relation", "leo", "l2f", "snail"])
def test_xla_readout_pads_calls_and_scores_like_the_gather_path(model, monkeypatch):
  """With the readout compiled (one chunk's score; a class within the chunk
  bound padded to a power of two with masked copies, a larger one to whole
  chunks), per-task accuracies equal the gather path's; a small chunk makes
  classes span several chunks with ragged ends."""
  spec, sampler = small_chunks(monkeypatch, 12 * 16 * 5)
  plain = evaluation.Evaluator(learner(model, spec.num_ways))
  compiled = evaluation.Evaluator(learner(model, spec.num_ways), jit_readout=True)
  gather = plain.fixed_accuracy(sampler, 5, 37, 8, method="gather")
  table = compiled.fixed_accuracy(sampler, 5, 37, 8, method="table")
  assert compiled._score_readout.jit  # compiled, no fallback taken
  assert 0.0 < gather.mean() < 1.0 and np.ptp(gather) > 0
  np.testing.assert_array_equal(table, gather)


@pytest.mark.parametrize("model,generic", [("relation", False), ("l2f", False),
                                           ("protonet", False), ("meta_lstm", True)])
def test_chunks_loop_in_one_call_per_class_and_score_like_the_gather_path(model, generic,
                                                                          monkeypatch):
  """A small chunk bound splits each class's tasks into several chunks (the
  last padded with masked copies); they are looped over inside one call per
  class, on the readout path and the generic one (no readout), plain."""
  spec, sampler = small_chunks(monkeypatch, 12 * 16 * 3)
  evaluator = evaluation.Evaluator(learner(model, spec.num_ways))
  if generic:
    monkeypatch.setattr(type(evaluator.learner), "readout", lambda self, state: None)
  name = "_score_generic" if generic else "_score_readout"
  calls, scorer = [], getattr(evaluator, name)
  def counting(*args, chunk):
    calls.append((int(args[2].shape[0]), chunk))
    return scorer(*args, chunk=chunk)
  counting.jit = False
  monkeypatch.setattr(evaluator, name, counting)
  table = evaluator.fixed_accuracy(sampler, 5, 37, 8, method="table")
  classes = [d[0] for d in sampler.drawn_supports(5, 37, 0, 37)][0].numpy()
  assert len(calls) == len(np.unique(classes))      # one call per class
  looped = [(tasks, chunk) for tasks, chunk in calls if chunk is not None]
  assert looped and all(tasks % chunk == 0 and chunk & (chunk - 1) == 0
                        for tasks, chunk in looped)   # whole chunks of a power of two
  assert any(tasks // chunk > 1 for tasks, chunk in looped)
  gather = evaluator.fixed_accuracy(sampler, 5, 37, 8, method="gather")
  assert 0.0 < gather.mean() < 1.0 and np.ptp(gather) > 0
  np.testing.assert_array_equal(table, gather)
