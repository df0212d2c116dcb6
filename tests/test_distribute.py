"""tf.distribute: mirrored (2 and 4 logical CPUs) and multi-worker (2 processes
on 127.0.0.1) meta-training match one device for every learner.

The multi-device work runs in subprocesses (tests/distribute_helper.py):
logical devices must be configured before TensorFlow initialises, and
MultiWorkerMirroredStrategy needs one process per worker.
"""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import distribute
from leo_suite import errors
from leo_suite.models import registry
from leo_suite.training import settings as settings_lib
from tests import distribute_helper
from tests import workers

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "distribute_helper.py")
MODELS = tuple(registry.LEARNERS)
TOLERANCE = 1e-5


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  env.pop("TF_CONFIG", None)
  return env


def variables(path):
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith(("learner/", "optimizer/", "step/")) and "OBJECT_GRAPH" not in name}


def without_zero_gradient_variables(model, values):
  """Drops R2D2's adjust_bias and its Adam slots: its meta-gradient is exactly
  zero (softmax is shift-invariant, see r2d2.py), so what Adam applies is
  normalised float rounding, +-lr whatever the order of summation."""
  if model != "r2d2":
    return values
  # Its Adam moments are the optimizer's only float scalars that stay ~0.
  dead = {k for k, v in values.items() if k.startswith("optimizer/") and v.shape == ()
          and v.dtype.kind == "f" and abs(float(v)) < 1e-7}
  assert len(dead) == 2, dead  # m and v of exactly one variable
  return {k: v for k, v in values.items() if "adjust_bias" not in k and k not in dead}


def max_difference(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0
             for k in a)


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("mirrored")
  # A hang guard only: ~170 s alone on 2 cores, several times that on a shared machine.
  proc = scripts_run.run([sys.executable, HELPER, "mirrored", str(out)], capture_output=True,
                         text=True, env=_env(), timeout=1800, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "report.json") as handle:
    return out, json.load(handle)


@pytest.mark.slow  # subprocesses with several logical devices / workers
@pytest.mark.parametrize("model,replicas", [(m, "mirrored2") for m in MODELS] + [
    (m, "mirrored4") for m in distribute_helper.FOUR_REPLICA_MODELS])
def test_mirrored_training_matches_one_device(mirrored_run, model, replicas):
  out, report = mirrored_run
  assert report["num_replicas"][replicas] == int(replicas[-1])
  single = variables(str(out / "default" / model / "ckpt-2"))
  mirrored = variables(str(out / replicas / model / "ckpt-2"))
  if model == "r2d2":
    single = without_zero_gradient_variables(model, single)
    mirrored = {k: v for k, v in mirrored.items() if k in single}
  assert max_difference(single, mirrored) < TOLERANCE  # variables and Adam's m, v, step
  # Two real steps with non-zero gradients (Adam's first moments), so the
  # comparison is not vacuous.
  assert int(single["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 2
  # Adam's moments moved (float optimizer slots of the variables' shapes);
  # an SGD chain (Reptile) has none.
  slots = [np.abs(v).max() for k, v in single.items()
           if k.startswith("optimizer/") and v.dtype.kind == "f" and v.size > 1]
  if settings_lib.outer_defaults(model)["outer_optimizer"] == "adam":
    assert max(slots) > 1e-4


@pytest.mark.slow  # subprocesses with several logical devices / workers
@pytest.mark.parametrize("model", ["maml"])
def test_clipping_per_replica_would_differ(mirrored_run, model):
  """Control: clipping each replica's gradient before the sum changes Adam's
  moments by far more than the tolerance, so the tests above can tell."""
  out, _ = mirrored_run
  single = variables(str(out / "default" / model / "ckpt-2"))
  wrong = variables(str(out / "per_replica_clip" / model / "ckpt-2"))
  assert max_difference(single, wrong) > 100 * TOLERANCE


@pytest.mark.slow  # subprocesses with several logical devices / workers
def test_uneven_meta_batch_is_a_config_error(mirrored_run):
  _, report = mirrored_run
  assert report["uneven_error"].startswith("ConfigError")
  assert "6 tasks cannot be split evenly over 4 replicas" in report["uneven_error"]


@pytest.mark.slow  # subprocesses with several logical devices / workers
@pytest.mark.parametrize("model", MODELS)
def test_evaluation_under_strategy_gives_same_accuracies(mirrored_run, model):
  _, report = mirrored_run
  results = report["evaluation"][model]
  assert len(results["default"]) == 13  # batches of 6: a partial batch of 1 on 2/4 replicas
  assert set(results) == {"default", "mirrored2"} | ({"mirrored4"} if model == "maml" else set())
  for name in set(results) - {"default"}:
    np.testing.assert_allclose(results[name], results["default"], atol=1e-6)


@pytest.mark.slow  # subprocesses with several logical devices / workers
@pytest.mark.parametrize("model", MODELS)
def test_checkpoints_restore_across_strategies(mirrored_run, model):
  _, report = mirrored_run
  to_none = report["restore"][f"mirrored->none/{model}"]
  to_mirrored = report["restore"][f"default->mirrored/{model}"]
  assert to_none["exact"] and to_none["step"] == 2 and to_none["num_stored"] > 3
  assert to_mirrored["exact"] and to_mirrored["step"] == 2
  assert to_mirrored["num_copies"] == 2 and to_mirrored["copies_agree"]


@pytest.mark.slow  # subprocesses with several logical devices / workers
def test_multi_worker_matches_one_device(mirrored_run, tmp_path):
  out, _ = mirrored_run
  ports = ",".join(map(str, workers.free_ports(2)))
  results = workers.run_workers(
      [[sys.executable, HELPER, "multi_worker", str(tmp_path), str(i), ports] for i in range(2)],
      [_env()] * 2, cwd=REPO)
  for returncode, _, stderr in results:
    assert returncode == 0, stderr[-4000:]
  infos = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
  assert [i["num_replicas"] for i in infos] == [2, 2]
  assert [i["worker_info"] for i in infos] == [[True, 0, 2], [False, 1, 2]]
  assert distribute_helper.MULTI_WORKER_MODELS == ("leo", "maml", "protonet")
  for model in distribute_helper.MULTI_WORKER_MODELS:
    single = without_zero_gradient_variables(
        model, variables(str(out / "default" / model / "ckpt-2")))
    multi = variables(str(tmp_path / "multi_worker" / model / "ckpt-2"))
    multi = {k: v for k, v in multi.items() if k in single}
    assert max_difference(single, multi) < TOLERANCE, model
    # Only the chief keeps checkpoints; the other worker's scratch is gone.
    assert not os.path.exists(tmp_path / "multi_worker" / model / ".worker-1")


def test_bad_strategy_settings_are_config_errors(monkeypatch):
  with pytest.raises(errors.ConfigError, match="choose one of"):
    distribute.make_strategy("ring")
  with pytest.raises(errors.ConfigError, match="needs --distribution_strategy=mirrored"):
    distribute.make_strategy("default", ["/cpu:0"])
  with pytest.raises(errors.ConfigError, match="not a device of this machine"):
    distribute.make_strategy("mirrored", ["/gpu:7"])
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(errors.ConfigError, match="TF_CONFIG"):
    distribute.make_strategy("multi_worker")
  monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"index": 3}}')
  with pytest.raises(errors.ConfigError, match="task.index=3"):
    distribute.make_strategy("multi_worker")
  assert distribute.parse_devices(" /cpu:0, /cpu:1 ,") == ["/cpu:0", "/cpu:1"]
  assert distribute.parse_devices("") is None
