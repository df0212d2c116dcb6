"""runner.py end to end on a tiny LEO-format dataset (subprocesses, as a user runs it)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import scripts_run

from leo_suite.data import embedding_keys

from leo_suite.data import embeddings
from leo_suite.training import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--dataset_name=tiny", "--deterministic", "--num_latents=4", "--num_classes=3",
              "--metatrain_batch_size=4", "--metavalid_batch_size=10", "--num_val_batches=1",
              "--num_test_tasks=20", "--metatest_batch_size=10", "--log_steps=5",
              "--num_val_examples_per_class=4", "--outer_lr=1e-2", "--baselines=ncm",
              # The run-directory logic is the point here: the plain step traces in
              # half the time of XLA's compile (tests/test_xla.py checks XLA's
              # step, the Trainer's compiled LEO step included).
              "--jit_compile=false"]


def run(*args, check=True, fresh=False):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = scripts_run.run([sys.executable, os.path.join(REPO, "runner.py"), *args],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
                         fresh=fresh)
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
  assert len(result["data"]["sha256"]["test"]) == 64
  assert result["run_config"]["data"]["sha256"]["test"] == result["data"]["sha256"]["test"]
  assert "ncm" in result["baselines"]
  best = json.loads((tmp_path / "straight" / "best" / "best.json").read_text())
  assert result["best_step"] == best["step"] and best["step"] in (0, 10, 20)
  assert result["chosen_initialisation"] == (best["step"] == 0)
  assert ("chosen checkpoint is step 0" in first.stdout) == (best["step"] == 0)
  second = run(*common, f"--checkpoint_path={tmp_path}/straight", "--evaluation_mode")
  assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]  # fixed episodes

  proc = run(*common, f"--checkpoint_path={tmp_path}/straight", "--num_steps_limit=30",
             "--num_latents=5", check=False)
  assert proc.returncode == 2 and "--num_latents: saved 4, given 5" in proc.stderr


# -- the run directory is the record of the run ------------------------------------------
def tree_state(path):
  """{relative path: (size, mtime_ns)} of everything under path."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      stat = os.lstat(full)
      out[os.path.relpath(full, path)] = (stat.st_size, stat.st_mtime_ns)
  return out


def result_of(run_dir):
  with open(os.path.join(run_dir, "result_test.json")) as handle:
    return json.load(handle)


MAML_FLAGS = [f for f in TINY_FLAGS if not f.startswith("--num_latents")] + [
    "--model=maml", "--maml_inner_lr=1.0", "--maml_eval_inner_steps=10",
    "--num_steps_limit=10", "--checkpoint_steps=5"]


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory, tiny_data):
  """A trained MAML run, scored in the same command (--evaluate_after_training):
  that first result is kept beside it as after_training.json."""
  run_dir = str(tmp_path_factory.mktemp("runs") / "maml")
  proc = run(f"--data_path={tiny_data}", *MAML_FLAGS, f"--checkpoint_path={run_dir}",
             "--evaluate_after_training")
  assert "maml test accuracy" in proc.stdout
  shutil.copy(os.path.join(run_dir, "result_test.json"),
              os.path.join(os.path.dirname(run_dir), "after_training.json"))
  return run_dir


def test_evaluation_rebuilds_the_run_from_its_directory(maml_run, tiny_data):
  with open(os.path.join(os.path.dirname(maml_run), "after_training.json")) as handle:
    full = json.load(handle)       # scored by the training command itself
  assert full["overrides"] == {} and full["checkpoint"].startswith(maml_run)
  # Training's memory high-water mark, logged once when it ended (step 10).
  (step, peak), = compare.scalars(maml_run, "train/peak_rss_mib")
  assert step == 10 and 100 < peak < 1e5
  alone = run(f"--checkpoint_path={maml_run}", "--evaluation_mode", fresh=True)
  assert "cuInit" not in alone.stderr and "oneDNN" not in alone.stderr  # quiet start-up
  result = result_of(maml_run)
  assert result["accuracy"] == full["accuracy"] and result["num_tasks"] == 20
  assert result["overrides"] == {}
  assert result["settings"]["maml_inner_lr"] == 1.0
  assert result["run_config"]["settings"]["model"] == "maml"
  # The case: evaluation-time flags that change the model are refused...
  before = tree_state(maml_run)
  proc = run(f"--checkpoint_path={maml_run}", "--evaluation_mode", "--maml_inner_lr=0.001",
             "--maml_eval_inner_steps=0", "--model=leo", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "--maml_inner_lr: saved 1.0, given 0.001" in proc.stderr
  assert "--model: saved 'maml', given 'leo'" in proc.stderr
  assert tree_state(maml_run) == before
  # ... while evaluation-only ones are applied and recorded as overrides.
  run(f"--checkpoint_path={maml_run}", "--evaluation_mode", "--maml_eval_inner_steps=0",
      "--num_test_tasks=10")
  result = result_of(maml_run)
  assert result["overrides"] == {"maml_eval_inner_steps": {"saved": 10, "used": 0},
                                 "num_test_tasks": {"saved": 20, "used": 10}}
  assert result["num_tasks"] == 10


def test_conflicting_model_or_preset_is_refused_before_any_write(maml_run, tiny_data):
  before = tree_state(maml_run)
  for extra in (["--model=leo"], ["--preset=tiered_5shot"], ["--outer_lr=0.5"]):
    proc = run(f"--data_path={tiny_data}", f"--checkpoint_path={maml_run}",
               "--num_steps_limit=20", *extra, check=False)
    assert proc.returncode == 2 and "disagrees with the flags given" in proc.stderr, extra
    assert "Traceback" not in proc.stderr
    assert tree_state(maml_run) == before, extra
  proc = run(f"--checkpoint_path={maml_run}", "--evaluation_mode", "--preset=tiered_5shot",
             check=False)
  assert proc.returncode == 2 and "--dataset_name: saved 'tiny', given 'tieredImageNet'" in (
      proc.stderr)
  assert tree_state(maml_run) == before


def test_checkpoints_without_config_and_failed_new_runs_leave_nothing(tmp_path, tiny_data,
                                                                     maml_run):
  orphan = tmp_path / "orphan"
  shutil.copytree(maml_run, orphan)
  os.remove(orphan / "config.json")
  before = tree_state(orphan)
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, f"--checkpoint_path={orphan}",
             check=False)
  assert proc.returncode == 2 and "no config.json" in proc.stderr
  assert tree_state(orphan) == before
  fresh = tmp_path / "fresh"
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, "--num_classes=9",
             f"--checkpoint_path={fresh}", check=False)
  assert proc.returncode == 2 and not fresh.exists()
  as_file = tmp_path / "file"
  as_file.write_text("x")
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, f"--checkpoint_path={as_file}",
             check=False)
  assert proc.returncode == 2 and "is a file, not a run directory" in proc.stderr
  assert "rerun" not in proc.stderr


def test_moved_data_evaluates_and_changed_data_is_refused(tmp_path, tiny_data, maml_run):
  run(f"--checkpoint_path={maml_run}", "--evaluation_mode")
  reference = result_of(maml_run)["accuracy"]
  moved = tmp_path / "moved"
  shutil.copytree(tiny_data, moved)
  run(f"--checkpoint_path={maml_run}", "--evaluation_mode", f"--data_path={moved}")
  result = result_of(maml_run)
  assert result["accuracy"] == reference and result["data"]["moved"]
  test_file = moved / "tiny" / "center" / "test_embeddings.pkl"
  split = embeddings.load_split(str(test_file))
  keys = [embedding_keys.make_key(name, i) for name, count in
          zip(split.class_names, split.class_count) for i in range(count)]
  embeddings.write_split(str(test_file), keys, split.embeddings * 2.0)
  proc = run(f"--checkpoint_path={maml_run}", "--evaluation_mode", f"--data_path={moved}",
             check=False)
  assert proc.returncode == 2 and "--allow_data_change" in proc.stderr
  assert "test: trained with sha256" in proc.stderr
  run(f"--checkpoint_path={maml_run}", "--evaluation_mode", f"--data_path={moved}",
      "--allow_data_change")
  assert result_of(maml_run)["data"]["changed_splits"] == ["test"]


def test_train_on_val_trains_and_evaluates(tmp_path, tiny_data):
  run_dir = tmp_path / "tov"
  proc = run(f"--data_path={tiny_data}", *TINY_FLAGS, "--train_on_val",
             "--num_steps_limit=4", "--checkpoint_steps=2", f"--checkpoint_path={run_dir}",
             "--evaluate_after_training")
  assert "--train_on_val: meta-training on train + val (10 classes)" in proc.stderr
  assert not (run_dir / "best").exists()  # validation is not held out: no best/
  result = result_of(run_dir)  # scored in the same command, from the last checkpoint
  assert result["checkpoint"].endswith("ckpt-4") and result["settings"]["train_on_val"]
  assert "evaluate_after_training" not in json.loads((run_dir / "config.json").read_text())[
      "settings"]  # how a command runs, not what the run is


def test_helpfull_groups_flags_by_release_runner_and_learner():
  text = run("--helpfull", check=False).stdout
  groups = [line.strip() for line in text.splitlines() if line.startswith("leo_suite:")]
  assert groups[:2] == ["leo_suite: 1. LEO release flags:", "leo_suite: 2. runner:"]
  assert {"leo_suite: 3. learner maml:", "leo_suite: 3. learner leo:"} <= set(groups)
  release = text.split("leo_suite: 1. LEO release flags:")[1].split("leo_suite: 2. runner:")[0]
  assert "--outer_lr" in release and "--num_tr_examples_per_class" in release
  assert "--maml_inner_lr" not in release


def test_the_initialisation_is_a_best_checkpoint_candidate(tmp_path, tiny_data):
  """Validation runs at step 0 too: when meta-training only lowers validation
  accuracy (here a ruinous outer rate), best/ keeps the initial variables and
  evaluation scores them."""
  run_dir = str(tmp_path / "ruined")
  flags = [f"--data_path={tiny_data}", *MAML_FLAGS, f"--checkpoint_path={run_dir}",
           "--outer_lr=1000", "--num_steps_limit=4", "--checkpoint_steps=2"]
  proc = run(*flags)
  assert "step 0  validation accuracy" in proc.stderr
  with open(os.path.join(run_dir, "best", "best.json")) as handle:
    best = json.load(handle)
  assert best["step"] == 0, best
  initial, last = variables(os.path.join(run_dir, "best", "ckpt")), variables(run_dir)
  learner_names = [n for n in initial if n.startswith("learner")]
  assert any(not np.array_equal(initial[n], last[n]) for n in learner_names)
  # The initial MAML head is zero (class-symmetric): best/ holds exactly that.
  output_layer = [initial[n] for n in learner_names
                  if "OPTIMIZER" not in n and initial[n].ndim == 2 and initial[n].shape[-1] == 3]
  assert output_layer and not any(np.any(w) for w in output_layer)
  run(*flags, "--evaluation_mode")
  result = result_of(run_dir)
  assert result["checkpoint"].endswith(os.path.join("best", "ckpt")), result["checkpoint"]


def summary_scalars(directory, tag):
  """{step: value} of a TensorBoard scalar written with tf.summary under `directory`."""
  values = {}
  for path in tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_profile_steps_writes_a_profile_and_bad_values_are_one_line(tmp_path, tiny_data):
  run_dir = tmp_path / "profiled"
  common = [f"--data_path={tiny_data}", *TINY_FLAGS, "--num_steps_limit=4",
            "--checkpoint_steps=4"]  # plain steps, as above: the profiler is the point
  proc = run(*common, "--profile_steps=2,3", f"--checkpoint_path={run_dir}")
  assert "profiling steps 2 to 3" in proc.stderr
  profiles = list((run_dir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(profiles) == 1 and profiles[0].stat().st_size > 0, proc.stderr[-2000:]
  # The log line and TensorBoard carry the share of time spent waiting for data.
  assert "data wait" in proc.stderr
  fraction = summary_scalars(str(run_dir / "summaries"), "train/data_wait_fraction")
  assert list(fraction) == [4] and 0.0 <= fraction[4] < 1.0
  # A free setting: evaluating with another value is not refused.
  run(f"--checkpoint_path={run_dir}", "--evaluation_mode", "--profile_steps=1,1")
  for bad in ("3,2", "2.5,3"):
    proc = run(*common, f"--profile_steps={bad}", f"--checkpoint_path={tmp_path}/bad",
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --profile_steps='{bad}': expected A,B with integers 1 <= A <= B (profile "
        "steps A to B, e.g. --profile_steps=10,15); empty = off"]
    assert not (tmp_path / "bad").exists()


def test_a_preset_given_again_applies_to_the_saved_learner_not_the_default_model(tmp_path):
  """Reptile's outer loop is SGD, so --preset=demo leaves its outer_lr alone;
  evaluating with the same preset (and no --model) must judge by the saved
  learner, not by --model's default (LEO, Adam), or outer_lr would conflict."""
  flags = ["--preset=demo", f"--data_path={tmp_path / 'data'}",
           f"--checkpoint_path={tmp_path / 'run'}", "--num_test_tasks=10",
           "--metatest_batch_size=10", "--num_val_batches=1", "--metavalid_batch_size=10",
           "--checkpoint_steps=2"]
  run("--model=reptile", "--num_steps_limit=2", *flags)
  proc = run("--evaluation_mode", *flags, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert result_of(tmp_path / "run")["settings"]["outer_lr"] == 1.0  # Reptile's epsilon


def test_both_evaluation_methods_give_the_same_figures(maml_run):
  """--evaluation_method=table (the default here: V = all remaining images of
  unequal classes) and =gather score the same tasks identically, learner and
  baselines alike, and the result says which path ran."""
  results = {}
  for method in ("table", "gather"):
    run(f"--checkpoint_path={maml_run}", "--evaluation_mode", f"--evaluation_method={method}",
        "--baselines=ncm,logreg")
    results[method] = result_of(maml_run)
    assert results[method]["evaluation_method"] == method
  for key in ("accuracy", "ci95", "num_tasks"):
    assert results["table"][key] == results["gather"][key]
  assert results["table"]["baselines"] == results["gather"]["baselines"]
  assert sorted(results["table"]["baselines"]) == ["logreg", "ncm"]
