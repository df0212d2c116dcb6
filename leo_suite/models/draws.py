"""Random draws that take the bits the maths needs (issue 32).

A Bernoulli(keep) dropout mask needs a few random bits per entry, not a
32-bit float: `dropout` draws stateless uint32 words (`base.random_draw`
'bits', so under XLA they are pre-drawn outside the compiled step like every
other draw) and cuts each word into 32 / b fields of b bits; an entry is kept
when its field is below a threshold t, so P(keep) = t / 2^b. b is the
smallest of 1, 2, 4, 8, 16 at which keep * 2^b is a whole number: at the
default rate 0.5 one bit per entry (32 entries per word) and P(keep) is
exactly keep. Any other keep is rounded to 16 bits, t = round(keep * 2^16),
so P(keep) is within 2^-17 of the configured keep (`mask_resolution`); kept
entries are scaled by 1 / keep of the configured keep. (The float draw
`base.dropout` makes, u >= rate on a 23-bit uniform, was within 2^-23.)
Fields are independent: Philox's output bits are.
"""

import numpy as np
import tensorflow as tf

from leo_suite.models import base

FIELD_BITS = (1, 2, 4, 8, 16)
WORD_BITS = 32


def mask_resolution(keep):
  """(b, t): b random bits per mask entry, kept when the field is < t.

  P(keep) = t / 2^b: exactly `keep` when keep * 2^b is whole for some b in
  FIELD_BITS (the smallest such b), else t / 2^16 with |t / 2^16 - keep|
  <= 2^-17.
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"keep probability must be in (0, 1], got {keep}")
  for bits in FIELD_BITS:
    scaled = keep * 2 ** bits
    if scaled == int(scaled):
      return bits, int(scaled)
  bits = FIELD_BITS[-1]
  return bits, int(round(keep * 2 ** bits))


def keep_mask(shape, keep, seed):
  """A bool mask of `shape` (a 1-D int tensor or list), each entry
  independently True with probability t / 2^b (`mask_resolution(keep)`),
  from stateless uint32 words drawn with `seed`."""
  bits, threshold = mask_resolution(keep)
  per_word = WORD_BITS // bits
  static = tf.get_static_value(shape)
  shape = tf.cast(shape, tf.int32)
  size = tf.reduce_prod(shape)
  row = int(np.prod(static[1:])) if static is not None and len(static) >= 2 else 0
  if row and row % per_word == 0:
    # The same words as the flat draw below (a stateless draw fills its shape
    # in order), drawn [rows, words per row] so that the draw of a slice of
    # the rows is the slice of this draw (xla.split_draws).
    words_shape = [int(static[0]), row // per_word]
  else:
    words_shape = [(size + per_word - 1) // per_word]
  words = base.random_draw("bits", words_shape, seed, tf.uint32)
  # int32 (CPU kernels exist for it): the arithmetic shift's sign bits are masked off.
  words = tf.bitcast(tf.reshape(words, [-1]), tf.int32)[:, tf.newaxis]
  shifts = tf.constant(list(range(0, WORD_BITS, bits)), tf.int32)   # [32 / b]
  fields = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, shifts), 2 ** bits - 1)
  kept = fields < threshold
  return tf.reshape(tf.reshape(kept, [-1])[:size], shape)


def dropout(x, rate, seed):
  """Inverted dropout: x / keep where `keep_mask` keeps it, else 0 (keep = 1 - rate)."""
  keep = 1.0 - rate
  kept = keep_mask(tf.shape(x), keep, seed)
  return tf.where(kept, x * tf.constant(1.0 / keep, x.dtype), tf.zeros([], x.dtype))
