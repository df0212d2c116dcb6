"""The tf.data episode sampler: layout, invariants, reproducibility."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings
from leo_suite.data import episodes


def make_split(counts=(7, 9, 12, 8, 10, 11), dim=6, seed=0):
  rng = np.random.default_rng(seed)
  keys, rows = [], []
  for c, count in enumerate(counts):
    keys += [embedding_keys.make_key(f"c{c}", i) for i in range(count)]
    # Row j of class c is (c, j, noise...) scaled, so rows can be traced back.
    block = np.concatenate([np.full((count, 1), c + 1.0), np.arange(count)[:, None] + 1.0,
                            rng.standard_normal((count, dim - 2))], 1) * 3.0
    rows.append(block)
  return embeddings.group_by_class(
      np.concatenate(rows).astype(np.float32),
      {f"c{c}": list(range(sum(counts[:c]), sum(counts[:c + 1]))) for c in range(len(counts))},
      keys, {"fixture": "0"})


def test_layout_labels_normalisation_and_no_overlap():
  split = make_split()
  spec = episodes.EpisodeSpec(num_ways=4, num_shots=2, num_queries=5)
  sampler = episodes.EpisodeSampler(split, spec)
  episode = next(iter(sampler.dataset(seed=7, batch_size=3)))
  assert episode.support_x.shape == (3, 4, 2, 6)
  assert episode.query_x.shape == (3, 4, 5, 6)
  np.testing.assert_allclose(np.linalg.norm(episode.support_x.numpy(), axis=-1), 1, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(episode.query_x.numpy(), axis=-1), 1, rtol=1e-6)
  for b in range(3):
    labels = episode.support_y.numpy()[b]
    assert labels.sum() / spec.num_shots == spec.num_ways * (spec.num_ways - 1) / 2  # release assert
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4)[:, None], 2, 1))
    rows = np.concatenate([episode.support_x.numpy()[b], episode.query_x.numpy()[b]], 1)
    ratio = rows[..., 0] / rows[..., 1]        # (c + 1) / (j + 1) identifies an image
    for n in range(4):
      assert len(set(np.round(ratio[n], 5))) == spec.examples_per_class  # no repeats


def test_classes_distinct_within_task_and_images_from_their_class():
  split = make_split()
  spec = episodes.EpisodeSpec(num_ways=5, num_shots=1, num_queries=3)
  sampler = episodes.EpisodeSampler(split, spec)
  normalised = split.embeddings / np.linalg.norm(split.embeddings, axis=1, keepdims=True)
  owner = np.repeat(np.arange(split.num_classes), split.class_count)
  for episode in sampler.dataset(seed=3, batch_size=4).take(3):
    x = np.concatenate([episode.support_x.numpy(), episode.query_x.numpy()], 2)
    for task in x:
      task_classes = []
      for n in range(5):
        matches = [np.flatnonzero(np.all(np.isclose(normalised, row, atol=1e-6), 1))
                   for row in task[n]]
        cls = {int(owner[m[0]]) for m in matches}
        assert len(cls) == 1                       # one class per label
        assert len({int(m[0]) for m in matches}) == 4  # K + V distinct images
        task_classes.append(cls.pop())
      assert len(set(task_classes)) == 5           # N distinct classes


def test_same_seed_same_episodes_and_resume_offset():
  split = make_split()
  sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 2))
  a = [e.support_x.numpy() for e in sampler.dataset(seed=1, batch_size=2).take(3)]
  b = [e.support_x.numpy() for e in sampler.dataset(seed=1, batch_size=2).take(3)]
  c = [e.support_x.numpy() for e in sampler.dataset(seed=2, batch_size=2).take(3)]
  resumed = next(iter(sampler.dataset(seed=1, batch_size=2, start=4))).support_x.numpy()
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
  np.testing.assert_array_equal(resumed, a[2])   # step 2 of batch 2 starts at task 4


def test_shards_partition_the_tasks():
  split = make_split()
  sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 2))
  whole = np.concatenate([e.support_x.numpy() for e in sampler.fixed_set(5, 8, 8)])
  parts = [np.concatenate([e.support_x.numpy() for e in sampler.dataset(
      5, 4, count=8, num_shards=2, shard_index=i)]) for i in range(2)]
  np.testing.assert_array_equal(parts[0], whole[0::2])
  np.testing.assert_array_equal(parts[1], whole[1::2])


def test_eval_queries_are_all_remaining_images_of_smallest_class():
  split = make_split()
  assert episodes.all_remaining_queries(split, 1) == 6
  sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(5, 1, 6))
  episode = next(iter(sampler.fixed_set(0, 5, 5)))
  assert episode.query_x.shape == (5, 5, 6, 6)


def test_impossible_specs_are_refused():
  split = make_split()
  with pytest.raises(errors.ConfigError, match="only 6"):
    episodes.EpisodeSampler(split, episodes.EpisodeSpec(7, 1, 1))
  with pytest.raises(errors.ConfigError, match="fewer"):
    episodes.EpisodeSampler(split, episodes.EpisodeSpec(2, 5, 3))
  with pytest.raises(errors.ConfigError, match="at least 1"):
    episodes.EpisodeSampler(split, episodes.EpisodeSpec(2, 0, 3))


def test_float64_episodes():
  sampler = episodes.EpisodeSampler(make_split(), episodes.EpisodeSpec(2, 1, 1), dtype=tf.float64)
  assert next(iter(sampler.dataset(0, 1))).support_x.dtype == tf.float64


def test_smallest_is_argsort_prefix_including_ties():
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 7, size=(50, 40)).astype(np.float32)  # many ties
  keys[:, -5:] = 2.0
  for count in (1, 6, 16, 40):
    np.testing.assert_array_equal(episodes.smallest(tf.constant(keys), count).numpy(),
                                  tf.argsort(keys, axis=-1).numpy()[:, :count])
