"""The LEO-format loader: release quirks, validation errors, safe unpickling."""

import io
import os
import pickle

import numpy as np
import pytest

from leo_suite import errors
from leo_suite.data import embeddings


def write_pickle(path, payload, protocol=2):
  with open(path, "wb") as handle:
    pickle.dump(payload, handle, protocol=protocol)
  return str(path)


def sample_dict(num_classes=3, per_class=(4, 5, 6), dim=8, bytes_keys=False, seed=0):
  rng = np.random.default_rng(seed)
  keys = []
  for c in range(num_classes):
    keys += [f"x-n0{c}-n0{c}_{i}.JPEG" for i in range(per_class[c])]
  if bytes_keys:
    keys = [k.encode("latin1") for k in keys]
  return {"keys": np.asarray(keys, dtype=object),
          "embeddings": rng.standard_normal((len(keys), dim)).astype(np.float32)}


def test_loads_str_and_bytes_keys_and_groups_unequal_classes(tmp_path):
  for bytes_keys in (False, True):  # center keys load as str, multiview as bytes
    data = sample_dict(bytes_keys=bytes_keys)
    split = embeddings.load_split(write_pickle(tmp_path / f"s{bytes_keys}.pkl", data))
    assert split.class_names == ["n00", "n01", "n02"]
    np.testing.assert_array_equal(split.class_count, [4, 5, 6])
    np.testing.assert_array_equal(split.class_start, [0, 4, 9])
    assert split.dim == 8
    np.testing.assert_array_equal(split.embeddings, data["embeddings"])


def test_rows_are_regrouped_by_class(tmp_path):
  data = sample_dict()
  order = np.random.default_rng(1).permutation(len(data["keys"]))
  shuffled = {"keys": data["keys"][order], "embeddings": data["embeddings"][order]}
  split = embeddings.load_split(write_pickle(tmp_path / "s.pkl", shuffled))
  for name, start, count in zip(split.class_names, split.class_start, split.class_count):
    rows = [i for i, k in enumerate(data["keys"]) if k.split("-")[1] == name]
    np.testing.assert_array_equal(
        np.sort(split.embeddings[start:start + count], axis=0),
        np.sort(data["embeddings"][rows], axis=0))


def test_python2_style_pickle_with_latin1_strings(tmp_path):
  # Python 2 str objects come back through latin1; protocol 0/2 both load.
  data = sample_dict()
  for protocol in (0, 2):
    split = embeddings.load_split(write_pickle(tmp_path / f"p{protocol}.pkl", data, protocol))
    assert split.num_classes == 3


def test_npz_round_trip(tmp_path):
  data = sample_dict()
  keys = list(data["keys"])
  embeddings.write_split(str(tmp_path / "train_embeddings.npz"), keys, data["embeddings"])
  split = embeddings.load_split(str(tmp_path / "train_embeddings.npz"))
  assert split.class_names == ["n00", "n01", "n02"]


BAD_CASES = {
    "truncated": (lambda p: open(p, "wb").write(pickle.dumps(sample_dict(), 2)[:50]),
                  "truncated"),
    "not_a_pickle": (lambda p: open(p, "wb").write(b"hello world, not a pickle"), "pickle"),
    "not_a_dict": (lambda p: write_pickle(p, [1, 2, 3]), "expected a dict"),
    "missing_keys": (lambda p: write_pickle(p, {"embeddings": np.zeros((2, 3), np.float32)}),
                     "'keys'"),
    "length_mismatch": (lambda p: write_pickle(p, dict(sample_dict(), keys=sample_dict()["keys"][:-1])),
                        "14 keys but 15"),
    "malformed_key": (lambda p: write_pickle(p, dict(sample_dict(), keys=np.asarray(
        ["bad_key"] + list(sample_dict()["keys"][1:]), dtype=object))), "malformed"),
    "class_mismatch": (lambda p: write_pickle(p, dict(sample_dict(), keys=np.asarray(
        ["x-n00-n01_0.JPEG"] + list(sample_dict()["keys"][1:]), dtype=object))),
                       "should start with its class"),
    "nan": (lambda p: write_pickle(p, dict(sample_dict(), embeddings=np.where(
        np.arange(15 * 8).reshape(15, 8) == 17, np.nan, sample_dict()["embeddings"]))), "NaN"),
    "inf": (lambda p: write_pickle(p, dict(sample_dict(), embeddings=np.full((15, 8), np.inf))),
            "NaN or inf"),
    "object_embeddings": (lambda p: write_pickle(p, dict(sample_dict(), embeddings=np.asarray(
        [np.zeros(3)] * 15, dtype=object))), "dtype"),
    "one_dim_embeddings": (lambda p: write_pickle(p, dict(sample_dict(), embeddings=np.zeros(15))),
                           "shape"),
    "duplicate_keys": (lambda p: write_pickle(p, dict(sample_dict(), keys=np.asarray(
        [sample_dict()["keys"][0]] * 2 + list(sample_dict()["keys"][2:]), dtype=object))),
                       "duplicate"),
    "empty": (lambda p: write_pickle(p, {"keys": np.asarray([], dtype=object),
                                         "embeddings": np.zeros((0, 8), np.float32)}), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_give_clear_errors_naming_the_file(tmp_path, case):
  make, fragment = BAD_CASES[case]
  path = str(tmp_path / "train_embeddings.pkl")
  make(path)
  with pytest.raises(errors.DataError) as info:
    embeddings.load_split(path)
  assert path in str(info.value)
  assert fragment in str(info.value)


def test_missing_file_says_where_and_how(tmp_path):
  with pytest.raises(errors.DataError) as info:
    embeddings.load_dataset_split(str(tmp_path), "miniImageNet", "center", "train",
                                  "run scripts/download_embeddings.py")
  message = str(info.value)
  assert os.path.join(str(tmp_path), "miniImageNet", "center", "train_embeddings.pkl") in message
  assert "download_embeddings" in message


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_before_running(tmp_path):
  marker = tmp_path / "pwned"
  path = write_pickle(tmp_path / "evil.pkl",
                      {"keys": ["x-a-a_1"], "embeddings": _Payload(marker)})
  with pytest.raises(errors.DataError, match="disallowed object .*system"):
    embeddings.load_split(path)
  assert not marker.exists()


def test_merge_and_compatibility_checks(tmp_path):
  a = embeddings.load_split(write_pickle(tmp_path / "a.pkl", sample_dict()))
  other = sample_dict(dim=9)
  other["keys"] = np.asarray([k.replace("n0", "m0") for k in other["keys"]], dtype=object)
  b = embeddings.load_split(write_pickle(tmp_path / "b.pkl", other))
  with pytest.raises(errors.DataError, match="widths"):
    embeddings.check_compatible([a, b])
  with pytest.raises(errors.DataError, match="share classes"):
    embeddings.check_compatible([a, a])
  other = sample_dict()
  other["keys"] = np.asarray([k.replace("n0", "m0") for k in other["keys"]], dtype=object)
  c = embeddings.load_split(write_pickle(tmp_path / "c.pkl", other))
  merged = embeddings.merge_splits([a, c])
  assert merged.num_classes == 6 and merged.embeddings.shape == (30, 8)
