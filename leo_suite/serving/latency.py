"""Predictions/s of an exported classifier version, loaded with plain TensorFlow."""

import os
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from leo_suite.serving import export


def _example_inputs(signature, batch, info, rng):
  """Random inputs for a signature's single input, at batch size `batch`."""
  (name, spec), = signature.structured_input_signature[1].items()
  if spec.dtype == tf.string:
    backbone = info.get("backbone") or {}
    size, channels = int(backbone.get("image_size", 28)), int(backbone.get("channels", 1))
    pixels = rng.integers(0, 256, [batch, size, size, channels], np.uint8)
    return {name: tf.constant([tf.io.encode_png(p).numpy() for p in pixels])}
  dim = int(spec.shape[1])
  return {name: tf.constant(rng.standard_normal([batch, dim]).astype(np.float32))}


def benchmark_latency(export_dir: str, batch_sizes: Sequence[int] = (1, 256),
                      signature_name: str = export.SIGNATURE_PREDICT,
                      min_seconds: float = 1.0, min_calls: int = 5, seed: int = 0) -> dict:
  """Predictions/s of an exported version, loaded with plain TensorFlow.

  For each batch size: one warm-up call, then calls repeated for at least
  `min_seconds` (and `min_calls`). Returns, per batch size b,
  `batch_<b>_predictions_per_s` (b * calls / time) and `batch_<b>_latency_ms`
  (median wall time of one call), plus `signature`, `input` and `export_dir`.
  """
  loaded = tf.saved_model.load(export_dir)
  signature = loaded.signatures[signature_name]
  try:
    info = export.read_export_info(export_dir)
  except (OSError, ValueError):
    info = {}
  rng = np.random.default_rng(seed)
  result = {"export_dir": os.path.abspath(export_dir), "signature": signature_name,
            "input": next(iter(signature.structured_input_signature[1]))}
  for batch in batch_sizes:
    inputs = _example_inputs(signature, batch, info, rng)
    signature(**inputs)                       # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
      t0 = time.perf_counter()
      outputs = signature(**inputs)
      next(iter(outputs.values())).numpy()
      times.append(time.perf_counter() - t0)
    total = sum(times)
    result[f"batch_{batch}_predictions_per_s"] = batch * len(times) / total
    result[f"batch_{batch}_latency_ms"] = 1000.0 * float(np.median(times))
  return result
