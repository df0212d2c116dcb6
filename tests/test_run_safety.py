"""One writer per run directory, SIGTERM/SIGINT saves, best/ that is not the run's own."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--dataset_name=tiny", "--num_latents=4", "--num_classes=3",
         "--metatrain_batch_size=4", "--metavalid_batch_size=10", "--num_val_batches=1",
         "--num_val_examples_per_class=4", "--outer_lr=1e-2", "--log_steps=1000",
         "--num_test_tasks=10", "--metatest_batch_size=10",
         "--jit_compile=false"]  # plain steps: XLA's compile is not the point here


def runner_cmd(data, run_dir, *extra):
  return [sys.executable, os.path.join(REPO, "runner.py"), f"--data_path={data}", *FLAGS,
          f"--checkpoint_path={run_dir}", *extra]


def run(cmd):
  return scripts_run.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         check=False)


def start_long_training(data, run_dir):
  """A runner that trains for a long time; returns once it is past its first step."""
  proc = scripts_run.Popen(runner_cmd(data, run_dir, "--num_steps_limit=1000000",
                                      "--checkpoint_steps=1000000"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  deadline = time.time() + 240
  while not os.path.exists(os.path.join(run_dir, "config.json")):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline
    time.sleep(0.2)
  time.sleep(3)  # into the training loop
  return proc


def latest_step(run_dir):
  with open(os.path.join(run_dir, "checkpoint")) as handle:
    first = handle.readline()
  return int(first.split("ckpt-")[1].strip().strip('"'))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_writer_and_a_signal_saves_then_exits(tiny_data, tmp_path, sig):
  run_dir = str(tmp_path / "run")
  first = start_long_training(tiny_data, run_dir)
  try:
    # A second runner on the same directory is refused, naming the holder; so
    # is an evaluation, and nothing of the first run changes (checked once:
    # the refusal does not depend on the signal that ends the run later).
    with open(os.path.join(run_dir, ".lock")) as handle:
      holder = json.load(handle)
    assert holder["pid"] == first.pid
    for extra in ([], ["--evaluation_mode"]) if sig == signal.SIGTERM else ():
      proc = run(runner_cmd(tiny_data, run_dir, "--num_steps_limit=5", *extra))
      assert proc.returncode == 2 and "Traceback" not in proc.stderr
      assert f"in use by process {first.pid}" in proc.stderr, proc.stderr[-500:]
  finally:
    first.send_signal(sig)
    _, stderr = first.communicate(timeout=120)
  assert first.returncode == 128 + sig, stderr[-2000:]
  last = [l for l in stderr.splitlines() if l.strip()][-1]
  step = latest_step(run_dir)
  assert last == (f"stopped by {signal.Signals(sig).name}: checkpoint of step {step} saved in "
                  f"{run_dir}; rerun the same command to resume")
  assert step > 0 and not os.path.exists(os.path.join(run_dir, ".lock"))
  # The saved step is where a rerun resumes.
  proc = run(runner_cmd(tiny_data, run_dir, f"--num_steps_limit={step + 2}"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"at step {step}" in proc.stderr and latest_step(run_dir) == step + 2


def test_stale_lock_is_taken_over_and_foreign_hosts_are_respected(tiny_data, tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket  # pylint: disable=import-outside-toplevel
  (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "then", "command": "runner.py"}))
  proc = run(runner_cmd(tiny_data, run_dir, "--num_steps_limit=2", "--checkpoint_steps=2"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"taking over a stale lock of process {dead.pid}" in proc.stderr
  assert not (run_dir / ".lock").exists()
  (run_dir / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now",
                                             "command": "runner.py"}))
  proc = run(runner_cmd(tiny_data, run_dir, "--evaluation_mode"))
  assert proc.returncode == 2 and "in use by process 1 on elsewhere" in proc.stderr


def test_best_dir_that_is_a_symlink_or_file_is_refused(tiny_data, tmp_path):
  run_dir = tmp_path / "run"
  proc = run(runner_cmd(tiny_data, run_dir, "--num_steps_limit=2", "--checkpoint_steps=2"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep.txt").write_text("mine")
  os.rename(run_dir / "best", tmp_path / "best_moved")
  os.symlink(outside, run_dir / "best")
  for extra in (["--num_steps_limit=4"], ["--evaluation_mode"]):
    proc = run(runner_cmd(tiny_data, run_dir, *extra))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "best is a symbolic link" in proc.stderr and "move it away" in proc.stderr
  assert sorted(os.listdir(outside)) == ["keep.txt"]
  os.remove(run_dir / "best")
  (run_dir / "best").write_text("not a directory")
  proc = run(runner_cmd(tiny_data, run_dir, "--num_steps_limit=4"))
  assert proc.returncode == 2 and "best is a file" in proc.stderr
