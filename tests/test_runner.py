"""runner.py end to end on a tiny LEO-format dataset (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data import embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--dataset_name=tiny", "--deterministic", "--num_latents=4", "--num_classes=3",
              "--metatrain_batch_size=4", "--metavalid_batch_size=10", "--num_val_batches=1",
              "--num_test_tasks=20", "--metatest_batch_size=10", "--log_steps=5",
              "--num_val_examples_per_class=4", "--outer_lr=1e-2", "--baselines=ncm"]


def run(*args, check=True):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "runner.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  if check and proc.returncode != 0:
    raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def variables(path):
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if "learner" in name or "optimizer" in name}


def test_released_dataset_without_data_gives_clear_error(tmp_path):
  proc = run(f"--data_path={tmp_path}", "--dataset_name=miniImageNet",
             f"--checkpoint_path={tmp_path}/run", check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert os.path.join(str(tmp_path), "miniImageNet", "center", "train_embeddings.pkl") in proc.stderr
  assert "download_embeddings.py" in proc.stderr
  assert not os.path.exists(tmp_path / "run" / "ckpt-1.index")


def test_tiered_multiview_and_bad_flags_are_refused(tmp_path, tiny_data):
  proc = run("--dataset_name=tieredImageNet", "--embedding_crop=multiview", check=False)
  assert proc.returncode == 2 and "only the center crop" in proc.stderr
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, "--num_classes=9",
             f"--checkpoint_path={tmp_path}/r", check=False)
  assert proc.returncode == 2 and "only 6" in proc.stderr and "Traceback" not in proc.stderr
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, "--num_tr_examples_per_class=0",
             f"--checkpoint_path={tmp_path}/r", check=False)
  assert proc.returncode == 2 and "at least 1" in proc.stderr
  proc = run(f"--data_path={tiny_data}", "--dataset_name=nope", f"--checkpoint_path={tmp_path}/r",
             check=False)
  assert proc.returncode == 2 and "tiny" in proc.stderr  # lists what is there


def test_resume_replays_the_uninterrupted_run_and_evaluates(tmp_path, tiny_data):
  common = [f"--data_path={tiny_data}", *TINY_FLAGS, "--checkpoint_steps=10"]
  run(*common, f"--checkpoint_path={tmp_path}/straight", "--num_steps_limit=20")
  run(*common, f"--checkpoint_path={tmp_path}/split", "--num_steps_limit=10")
  resumed = run(*common, f"--checkpoint_path={tmp_path}/split", "--num_steps_limit=20")
  assert "Resumed from" in resumed.stderr
  a = variables(str(tmp_path / "straight" / "ckpt-20"))
  b = variables(str(tmp_path / "split" / "ckpt-20"))
  assert a.keys() == b.keys() and len(a) > 8
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert os.path.exists(tmp_path / "straight" / "best" / "ckpt.index")
  assert os.path.exists(tmp_path / "straight" / "summaries")

  first = run(*common, f"--checkpoint_path={tmp_path}/straight", "--evaluation_mode")
  result = json.loads((tmp_path / "straight" / "result_test.json").read_text())
  assert result["num_tasks"] == 20 and 0 <= result["accuracy"] <= 1
  assert result["ci95"] == pytest.approx(1.96 * result["std"] / np.sqrt(20))
  assert result["num_queries"] == 8 - 1   # all remaining images of the smallest class
  assert any(p.endswith("test_embeddings.pkl") for p in result["data_sha256"])
  assert "ncm" in result["baselines"]
  second = run(*common, f"--checkpoint_path={tmp_path}/straight", "--evaluation_mode")
  assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]  # fixed episodes

  proc = run(*common, f"--checkpoint_path={tmp_path}/straight", "--num_steps_limit=30",
             "--num_latents=5", check=False)
  assert proc.returncode == 2 and "different setup" in proc.stderr
