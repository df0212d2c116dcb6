"""Dropout masks from packed random bits (leo_suite/models/draws.py): the
resolution, the Bernoulli distribution, independence, reproducibility."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import base
from leo_suite.models import draws
from leo_suite.models import leo
from leo_suite.training import xla as xla_lib

SEED = tf.constant([5, 11], tf.int32)


@pytest.mark.parametrize("keep, bits, threshold", [
    (0.5, 1, 1), (0.25, 2, 1), (0.75, 2, 3), (0.875, 4, 14), (1 / 256, 8, 1),
    (1.0, 1, 2)])
def test_a_dyadic_keep_takes_the_fewest_bits_and_is_exact(keep, bits, threshold):
  assert draws.mask_resolution(keep) == (bits, threshold)
  assert threshold / 2 ** bits == keep


@pytest.mark.parametrize("keep", [0.7, 0.9, 0.1, 1 / 3, 0.123456789])
def test_any_other_keep_is_16_bits_within_2_to_the_minus_17(keep):
  bits, threshold = draws.mask_resolution(keep)
  assert bits == 16
  assert abs(threshold / 2 ** 16 - keep) <= 2.0 ** -17


def test_keep_out_of_range_raises():
  for keep in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError):
      draws.mask_resolution(keep)


def counts_of_fields(words, bits):
  """Fields of b bits of uint32 `words`, low bits first (the layout keep_mask reads)."""
  shifts = np.arange(0, 32, bits, dtype=np.uint64)
  return ((words.astype(np.uint64)[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.9])
def test_the_mask_is_field_below_threshold_of_the_seeded_words(rate):
  """keep_mask reads exactly the stateless uint32 words of its seed, field by field."""
  shape = [7, 3, 37]   # 777 entries: not a whole number of words
  mask = draws.keep_mask(shape, 1 - rate, SEED).numpy()
  bits, threshold = draws.mask_resolution(1 - rate)
  count = -(-777 * bits // 32)
  words = base.random_draw("bits", [count], SEED, tf.uint32).numpy()
  expected = counts_of_fields(words, bits)[:777] < threshold
  np.testing.assert_array_equal(mask, expected.reshape(shape))


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.3])
def test_whole_words_per_row_are_drawn_by_rows_as_the_same_words(rate):
  """Rows of 64 entries (whole words at 1, 2 and 16 bits): the draw is
  [rows, words per row], holding the flat draw's words, so the mask is the
  flat layout's and a slice of the rows is the draw of those rows."""
  shape = [6, 4, 16]
  bits, threshold = draws.mask_resolution(1 - rate)
  with base.recording_draws() as recorded:
    mask = draws.keep_mask(shape, 1 - rate, SEED).numpy()
  assert recorded["draws"][0].shape == (6, 64 * bits // 32)
  words = base.random_draw("bits", [6 * 64 * bits // 32], SEED, tf.uint32).numpy()
  expected = counts_of_fields(words, bits) < threshold
  np.testing.assert_array_equal(mask, expected.reshape(shape))
  with base.recording_draws() as partial:   # rows of 15 entries: one flat draw
    draws.keep_mask([6, 3, 5], 1 - rate, SEED)
  assert partial["draws"][0].shape == (-(-90 * bits // 32),)


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.9, 0.05])
def test_mask_mean_is_keep_within_four_standard_errors(rate):
  keep = 1 - rate
  mask = draws.keep_mask([64, 5, 15, 640], keep, SEED).numpy().astype(np.float64)
  n = mask.size
  error = np.sqrt(keep * (1 - keep) / n)
  assert abs(mask.mean() - keep) < 4 * error
  # Per task (first axis) the counts are Binomial(n / 64, keep): their spread
  # matches, so tasks do not share masks.
  per_task = mask.reshape(64, -1).mean(axis=1)
  expected_var = keep * (1 - keep) / (n / 64)
  assert 0.6 < per_task.var(ddof=1) / expected_var < 1.5


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_mask_entries_are_pairwise_independent(rate):
  """Neighbours in a word, across words, across rows and across tasks: the
  joint keep frequency is keep^2 within four standard errors."""
  keep = 1 - rate
  mask = draws.keep_mask([40, 5, 15, 640], keep, SEED).numpy().astype(np.float64)
  flat = mask.reshape(-1)
  for lag in (1, 2, 31, 32, 33, 640, 640 * 15 * 5):
    both = (flat[:-lag] * flat[lag:]).mean()
    error = np.sqrt(keep ** 2 * (1 - keep ** 2) / (flat.size - lag))
    assert abs(both - keep ** 2) < 4 * error, lag


def test_two_seeds_give_independent_masks_and_one_seed_the_same():
  shape = [12, 5, 15, 640]
  first = draws.keep_mask(shape, 0.5, SEED).numpy()
  np.testing.assert_array_equal(first, draws.keep_mask(shape, 0.5, SEED).numpy())
  other = draws.keep_mask(shape, 0.5, tf.constant([5, 12])).numpy()
  agree = (first == other).mean()
  assert abs(agree - 0.5) < 4 * np.sqrt(0.25 / first.size)


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_dropout_scales_kept_entries_by_one_over_keep(rate):
  x = tf.random.stateless_normal([6, 4, 2, 33], [1, 2], dtype=tf.float64)
  dropped = draws.dropout(x, rate, SEED).numpy()
  mask = draws.keep_mask(tf.shape(x), 1 - rate, SEED).numpy()
  np.testing.assert_array_equal(dropped[mask], x.numpy()[mask] * (1 / (1 - rate)))
  assert not dropped[~mask].any()
  # Inverted dropout preserves the mean of a constant input.
  ones = draws.dropout(tf.ones([200, 1000], tf.float64), rate, SEED).numpy()
  assert abs(ones.mean() - 1) < 4 * np.sqrt(rate / (1 - rate) / ones.size)


def test_compiled_and_plain_masks_agree():
  """Inside tf.function, under XLA with the words pre-drawn, and eagerly:
  the same seed gives the same mask."""
  x = tf.ones([3, 5, 2, 64])
  step = lambda x, seed: draws.dropout(x, 0.3, seed)
  eager = step(x, SEED)
  np.testing.assert_array_equal(tf.function(step)(x, SEED), eager)
  np.testing.assert_array_equal(tf.function(xla_lib.Predrawn(step))(x, SEED), eager)


def test_leo_training_draws_masks_as_bits_and_normals_as_floats():
  """A LEO training step draws its masks as uint32 words (32 entries per word
  at the default rate 0.5) and its latent and weight samples as float normals
  whose moments are N(0, 1)'s."""
  model = leo.LEO(leo.Config(), 5, 640)
  rng = np.random.default_rng(0)
  x = lambda count: tf.constant(rng.standard_normal([12, 5, count, 640]), tf.float32)
  labels = lambda count: tf.constant(np.broadcast_to(np.arange(5)[None, :, None],
                                                     [12, 5, count]), tf.int32)
  from leo_suite.data.episodes import Episode  # pylint: disable=import-outside-toplevel
  episode = Episode(x(1), labels(1), x(15), labels(15))
  recorded = tf.function(lambda e, s: xla_lib.record_draws(
      lambda e, s: model.loss_and_gradients(e, seed=s)[:2], e, s))(episode, SEED)
  words = [d for d in recorded if d.dtype == tf.uint32]
  normals = [d for d in recorded if d.dtype == tf.float32]
  # Encoder, 5 latent and 5 fine-tuning support losses, the query loss: 12 masks.
  assert len(words) == 12
  assert sum(int(tf.size(w)) for w in words) * 32 == 12 * 5 * 640 * (11 + 15)
  # z_0 and the 6 decoded weight samples.
  assert len(normals) == 7
  z = np.concatenate([n.numpy().ravel() for n in normals]).astype(np.float64)
  error = 1 / np.sqrt(z.size)
  assert abs(z.mean()) < 4 * error
  assert abs(z.var() - 1) < 4 * np.sqrt(2) * error
  assert abs(np.mean(z ** 3)) < 4 * np.sqrt(15) * error
  assert abs(np.mean(z ** 4) - 3) < 4 * np.sqrt(96) * error
