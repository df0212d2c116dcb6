"""Property-based bad input: the embedding loader, the episode sampler, the runner's flags.

Every invalid input must end in a `UserError` (DataError / ConfigError) naming
what is wrong, never another exception type; every valid one must load /
sample / train. Example counts are kept modest so the file runs in ~2 minutes
(see the `settings` of each test).
"""

import io
import os
import pickle
import sys
import tempfile

from absl.testing import flagsaver
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings
from leo_suite.data import episodes

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


def sample_file(fmt="pkl", seed=0, num_classes=3, per_class=4, dim=5):
  rng = np.random.default_rng(seed)
  keys = [embedding_keys.make_key(f"c{c}", i) for c in range(num_classes) for i in range(per_class)]
  rows = rng.standard_normal((len(keys), dim)).astype(np.float32)
  if fmt == "pkl":
    return pickle.dumps({"keys": np.asarray(keys, dtype=object), "embeddings": rows}, 2)
  buffer = io.BytesIO()
  np.savez(buffer, keys=np.asarray(keys), embeddings=rows)
  return buffer.getvalue()


def load_bytes(payload, suffix=".pkl"):
  """load_split on `payload`: the split, or the DataError. Anything else fails the test."""
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "train_embeddings" + suffix)
    with open(path, "wb") as handle:
      handle.write(payload)
    try:
      split = embeddings.load_split(path)
    except errors.DataError as exc:
      assert path in str(exc) and "\n" not in str(exc).strip()
      return exc
  # A file that loads is internally consistent.
  assert split.embeddings.dtype == np.float32 and split.embeddings.ndim == 2
  assert np.isfinite(split.embeddings).all()
  assert split.class_count.sum() == split.embeddings.shape[0] == len(split.image_names)
  assert (split.class_count > 0).all() and len(set(split.image_names)) == len(split.image_names)
  return split


# -- the loader ---------------------------------------------------------------------
@settings(max_examples=150, **SETTINGS)
@given(payload=st.binary(max_size=600), suffix=st.sampled_from([".pkl", ".npz"]))
def test_random_bytes_never_escape_as_other_errors(payload, suffix):
  load_bytes(payload, suffix)


@settings(max_examples=80, **SETTINGS)
@given(fmt=st.sampled_from(["pkl", "npz"]), data=st.data())
def test_truncated_files_are_refused(fmt, data):
  payload = sample_file(fmt)
  cut = data.draw(st.integers(0, len(payload) - 1))
  assert isinstance(load_bytes(payload[:cut], "." + fmt), errors.DataError)


@settings(max_examples=150, **SETTINGS)
@given(fmt=st.sampled_from(["pkl", "npz"]), data=st.data())
def test_mutated_valid_files_load_consistently_or_are_refused(fmt, data):
  payload = bytearray(sample_file(fmt))
  for _ in range(data.draw(st.integers(1, 4))):
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] = data.draw(st.integers(0, 255))
  load_bytes(bytes(payload), "." + fmt)


leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                   st.text(max_size=12), st.binary(max_size=12),
                   st.sampled_from(["x-a-a_1", "x-a-a_2", "x-b-b_1", "bad", "x-a-b_1"]),
                   st.just(np.zeros((2, 3), np.float32)),
                   st.just(np.asarray(["x-a-a_1", "x-b-b_1"], dtype=object)),
                   st.just(np.asarray([[1, 2]], dtype=object)),
                   st.just(np.zeros(3, np.complex64)))
structures = st.recursive(
    leaves, lambda children: st.one_of(
        st.lists(children, max_size=4), st.tuples(children, children),
        st.dictionaries(st.one_of(st.sampled_from(["keys", "embeddings"]), st.text(max_size=4)),
                        children, max_size=4)), max_leaves=12)


@settings(max_examples=150, **SETTINGS)
@given(content=structures, protocol=st.integers(0, 5))
def test_random_structures_are_refused_or_valid(content, protocol):
  load_bytes(pickle.dumps(content, protocol))


ROW_DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_,
              np.complex64, object, "U3", "datetime64[s]"]


@settings(max_examples=100, **SETTINGS)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=5), dim=st.integers(0, 4),
       dtype=st.sampled_from(ROW_DTYPES), bytes_keys=st.booleans(),
       duplicate=st.booleans(), extra_row=st.booleans(), fmt=st.sampled_from(["pkl", "npz"]),
       seed=st.integers(0, 2**16))
def test_generated_splits_load_iff_well_formed(counts, dim, dtype, bytes_keys, duplicate,
                                               extra_row, fmt, seed):
  rng = np.random.default_rng(seed)
  keys = [embedding_keys.make_key(f"c{c}", i) for c, n in enumerate(counts) for i in range(n)]
  if duplicate and keys:
    keys.append(keys[0])
  rows = (rng.standard_normal((len(keys) + extra_row, dim)) * 3).astype(
      np.float64).astype(dtype if dtype != "datetime64[s]" else np.int64)
  if dtype == "datetime64[s]":
    rows = rows.astype(dtype)
  order = rng.permutation(len(keys))
  keys = [keys[i] for i in order]
  if fmt == "pkl":
    stored = np.asarray([k.encode() for k in keys] if bytes_keys else keys, dtype=object)
    payload = pickle.dumps({"keys": stored, "embeddings": rows}, 2)
  else:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.asarray(keys), embeddings=rows)
    payload = buffer.getvalue()
  numeric = dtype in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8)
  well_formed = (numeric and dim > 0 and len(keys) > 0 and not duplicate and not extra_row)
  result = load_bytes(payload, "." + fmt)
  assert isinstance(result, embeddings.EmbeddingSplit) == well_formed, result
  if well_formed:
    assert result.class_names == sorted(f"c{c}" for c, n in enumerate(counts) if n)
    np.testing.assert_array_equal(result.class_count, [n for n in counts if n])


@settings(max_examples=20, **SETTINGS)
@given(dims=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_splits_of_different_widths_are_refused_together(dims):
  splits = []
  with tempfile.TemporaryDirectory() as directory:
    for name, dim in zip(("train", "val"), dims):
      keys = [embedding_keys.make_key(f"{name}{c}", i) for c in range(2) for i in range(2)]
      path = os.path.join(directory, f"{name}_embeddings.pkl")
      embeddings.write_split(path, keys, np.ones((4, dim)))
      splits.append(embeddings.load_split(path))
  if dims[0] == dims[1]:
    embeddings.check_compatible(splits)
  else:
    with pytest.raises(errors.DataError, match="different embedding widths"):
      embeddings.check_compatible(splits)


# -- the episode sampler -----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("split") / "train_embeddings.pkl")
  counts = [3, 5, 6, 4]      # unequal classes, as tieredImageNet
  keys = [embedding_keys.make_key(f"c{c}", i) for c, n in enumerate(counts) for i in range(n)]
  embeddings.write_split(path, keys, np.random.default_rng(0).standard_normal((len(keys), 6)))
  return embeddings.load_split(path)


@settings(max_examples=40, **SETTINGS)
@given(n=st.integers(-1, 6), k=st.integers(-1, 7), v=st.integers(-1, 7))
def test_sampler_accepts_exactly_the_feasible_specs(small_split, n, k, v):
  spec = episodes.EpisodeSpec(n, k, v)
  feasible = n >= 1 and k >= 1 and v >= 1 and n <= 4 and k + v <= 3
  if not feasible:
    with pytest.raises(errors.ConfigError):
      episodes.EpisodeSampler(small_split, spec, "fuzz")
    return
  sampler = episodes.EpisodeSampler(small_split, spec, "fuzz")
  episode = next(iter(sampler.dataset(seed=n * 100 + k * 10 + v, batch_size=2)))
  assert episode.support_x.shape == (2, n, k, 6) and episode.query_x.shape == (2, n, v, 6)
  rows = tf.concat([episode.support_x, episode.query_x], axis=2).numpy().reshape(2, -1, 6)
  for task in rows:   # no image drawn twice within a task
    assert len({r.tobytes() for r in task}) == n * (k + v)


# -- the runner's flags (in-process, flagsaver) ---------------------------------------------
@pytest.fixture(scope="module")
def runner_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for split, num_classes in (("train", 6), ("val", 4), ("test", 4)):
    keys = [embedding_keys.make_key(f"{split}{c}", i) for c in range(num_classes) for i in range(8)]
    embeddings.write_split(str(root / "tiny" / "center" / f"{split}_embeddings.pkl"),
                           keys, rng.standard_normal((len(keys), 8)))
  return str(root)


def call_runner(args):
  """runner.main in-process: (exit code, stderr text)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import runner  # pylint: disable=import-outside-toplevel
  stderr = io.StringIO()
  with flagsaver.flagsaver(), contextlib.redirect_stderr(stderr):
    runner.FLAGS(["runner.py", *args])
    try:
      runner.main(["runner.py"])
      code = 0
    except SystemExit as exc:
      code = exc.code
  return code, stderr.getvalue()


@pytest.mark.slow
@settings(max_examples=12, **SETTINGS)
@example(model="leo", n=3, k=1, v=2, batch=2, lr=1e-3, preset="", baselines="ncm", eval_query=0)
@example(model="r2d2", n=4, k=2, v=6, batch=1, lr=1e-3, preset="mini_1shot", baselines="",
         eval_query=3)
@example(model="maml", n=5, k=1, v=2, batch=2, lr=1e-3, preset="", baselines="ncm",
         eval_query=0)   # only 4 validation classes: a clear error
@given(model=st.sampled_from(["leo", "maml", "r2d2", "imaml", "l2f"]),
       n=st.integers(-1, 7), k=st.integers(0, 9), v=st.integers(0, 9),
       batch=st.integers(0, 2), lr=st.sampled_from([-1.0, 0.0, 1e-3]),
       preset=st.sampled_from(["", "mini_1shot", "bogus"]),
       baselines=st.sampled_from(["ncm", "nope", ""]), eval_query=st.integers(-1, 8))
def test_runner_flags_give_a_clear_error_or_train(runner_data, model, n, k, v, batch, lr,
                                                  preset, baselines, eval_query):
  valid_values = (n >= 1 and k >= 1 and v >= 1 and batch >= 1 and lr > 0 and eval_query >= 0
                  and preset != "bogus" and baselines != "nope")
  # Feasible with the data: 6 train / 4 val classes of 8 images each.
  eval_v = eval_query or 8 - k
  feasible = n <= 4 and k + v <= 8 and eval_v >= 1 and k + eval_v <= 8
  with tempfile.TemporaryDirectory() as run_dir:
    code, stderr = call_runner([
        f"--data_path={runner_data}", "--dataset_name=tiny", f"--model={model}",
        f"--num_classes={n}", f"--num_tr_examples_per_class={k}",
        f"--num_val_examples_per_class={v}", f"--metatrain_batch_size={batch}",
        f"--outer_lr={lr}", f"--preset={preset}", f"--baselines={baselines}",
        f"--eval_num_query={eval_query}", "--num_steps_limit=2", "--checkpoint_steps=2",
        "--metavalid_batch_size=4", "--num_val_batches=1", "--jit_compile=false",
        *(["--num_latents=4"] if model == "leo" else []), f"--checkpoint_path={run_dir}"])
    if valid_values and feasible:
      assert code == 0, stderr
      assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-2")
    else:
      assert code == 2, stderr
      lines = stderr.strip().splitlines()
      assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr


@pytest.mark.slow
def test_cli_flag_errors_are_one_line_without_traceback(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  for args in (["--num_classes=abc"], ["--model=nope"],
               ["--outer_lr=-1", f"--checkpoint_path={tmp_path}/r"]):
    proc = scripts_run.run([sys.executable, os.path.join(REPO, "runner.py"), *args],
                           capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
                           check=False)
    assert proc.returncode != 0, args
    assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    assert not os.path.exists(tmp_path / "r" / "checkpoint")
