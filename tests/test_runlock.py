"""leo_suite.runlock: one holder per run directory under any interleaving."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from leo_suite import errors
from leo_suite import runlock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_WORKERS = 8

# A worker: waits until the test says go, takes the lock, records when it held
# it, holds it for a while. Pauses at the lock's race points widen the windows.
WORKER = r"""
import json, os, sys, time
from leo_suite import errors, runlock
directory, go_path, events_path, hold, pauses, turns = (
    sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5]),
    sys.argv[6] == "turns")
runlock._pause = lambda point: time.sleep(pauses.get(point, 0))

def record(event):
  fd = os.open(events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  os.write(fd, f"{event} {os.getpid()} {time.time()!r}\n".encode())
  os.close(fd)

record("ready")
while not os.path.exists(go_path):
  time.sleep(0.001)
while True:
  try:
    with runlock.RunLock(directory, log=lambda m: print("LOG", m, flush=True)):
      record("enter")
      time.sleep(hold)
      record("exit")
    break
  except errors.UserError as exc:
    if not (turns and "in use" in str(exc)):
      print(f"error: {exc}", file=sys.stderr)
      sys.exit(2)
    time.sleep(0.002)  # taking turns: try again until this worker held the run once
"""

PAUSES = {"directory": 0.05, "opened": 0.05, "locked": 0.3, "release": 0.05}


def start_workers(directory, tmp_path, count, hold, pauses=None, turns=False):
  events = tmp_path / "events"
  go = tmp_path / "go"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(directory), str(go), str(events), str(hold),
       json.dumps(pauses or {}), "turns" if turns else "once"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for _ in range(count)]
  deadline = time.monotonic() + 60
  while sum(l.startswith("ready") for l in read_events(events)) < count:
    assert time.monotonic() < deadline, "workers did not start"
    time.sleep(0.01)
  go.write_text("")
  return procs, events


def read_events(path):
  return path.read_text().splitlines() if path.exists() else []


def assert_one_holder_at_a_time(events):
  """The recorded holding intervals never overlap."""
  timeline = sorted((float(t), kind) for kind, _, t in (l.split() for l in events)
                    if kind in ("enter", "exit"))
  holders = 0
  for _, kind in timeline:
    holders += 1 if kind == "enter" else -1
    assert holders in (0, 1), timeline


def kill_a_holder(directory, tmp_path):
  """A worker that took the lock, killed: its .lock stays, naming a dead pid."""
  procs, _ = start_workers(directory, tmp_path / "killed", 1, hold=60)
  lock = directory / ".lock"
  deadline = time.monotonic() + 30
  while not (lock.exists() and lock.read_text()):
    assert time.monotonic() < deadline
    time.sleep(0.01)
  procs[0].send_signal(signal.SIGKILL)
  procs[0].communicate()
  assert json.loads(lock.read_text())["pid"] == procs[0].pid
  return procs[0].pid


@pytest.mark.parametrize("start", ["new_path", "empty_dir", "garbage_lock", "stale_lock"])
def test_workers_starting_together_one_holds_the_rest_are_refused(tmp_path, start):
  directory = tmp_path / "runs" / "run"
  dead_pid = None
  if start != "new_path":
    directory.mkdir(parents=True)
  if start == "garbage_lock":
    (directory / ".lock").write_bytes(b"\0\xffnot json")
  if start == "stale_lock":
    (tmp_path / "killed").mkdir()
    dead_pid = kill_a_holder(directory, tmp_path)
  procs, events = start_workers(directory, tmp_path, NUM_WORKERS, hold=1.0, pauses=PAUSES)
  results = [(p.pid, p.wait(timeout=60), *p.communicate()) for p in procs]
  winners = [r for r in results if r[1] == 0]
  assert len(winners) == 1, results
  winner = winners[0][0]
  for pid, code, _, stderr in results:
    if pid != winner:
      assert code == 2 and "Traceback" not in stderr, stderr
      assert stderr.startswith(f"error: {directory} is in use by process {winner} on "
                               f"{socket.gethostname()} (since "), stderr
  assert_one_holder_at_a_time(read_events(events))
  log = winners[0][2]
  if dead_pid is not None:
    assert (f"taking over a stale lock of process {dead_pid} on {socket.gethostname()}, "
            "which is gone") in log
  if start == "garbage_lock":
    assert "replacing an unreadable lock file" in log
  assert not (directory / ".lock").exists()
  if start == "new_path":  # made by the winner (removed) or by a refused worker (kept, empty)
    assert not directory.exists() or os.listdir(directory) == []
  else:
    assert os.listdir(directory) == []


def test_workers_taking_turns_never_overlap(tmp_path):
  """Workers retrying while others release: the release window is raced too."""
  directory = tmp_path / "run"
  procs, events = start_workers(directory, tmp_path, NUM_WORKERS, hold=0.3,
                                pauses=dict(PAUSES, locked=0.01), turns=True)
  results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
  assert all(code == 0 for code, _, _ in results), results
  lines = read_events(events)
  assert sum(l.startswith("enter") for l in lines) == NUM_WORKERS
  assert_one_holder_at_a_time(lines)
  assert not directory.exists() or os.listdir(directory) == []


def test_holder_details_and_cleanup(tmp_path):
  messages = []
  run_dir = tmp_path / "a" / "run"
  with runlock.RunLock(str(run_dir), log=messages.append) as lock:
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert lock.held
  assert not run_dir.exists() and (tmp_path / "a").is_dir()  # made here, nothing written
  with runlock.RunLock(str(run_dir)):
    (run_dir / "checkpoint").write_text("x")
  assert os.listdir(run_dir) == ["checkpoint"]  # kept, without its lock
  with runlock.RunLock(str(run_dir), create=False):
    pass
  assert os.listdir(run_dir) == ["checkpoint"] and messages == []


def test_refusals_keep_their_messages(tmp_path):
  with pytest.raises(errors.UserError) as caught:
    runlock.RunLock(str(tmp_path / "missing"), create=False).acquire()
  assert str(caught.value) == (f"{tmp_path}/missing: no such run directory (pass the "
                               "--checkpoint_path of a `python runner.py` training run)")
  assert not (tmp_path / "missing").exists()
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.ConfigError, match="is a file, not a run directory"):
    runlock.RunLock(str(tmp_path / "file")).acquire()
  run_dir = tmp_path / "run"
  with runlock.RunLock(str(run_dir)):
    with pytest.raises(errors.ConfigError) as caught:  # a second lock in the same process
      runlock.RunLock(str(run_dir)).acquire()
    assert f"in use by process {os.getpid()} on {socket.gethostname()}" in str(caught.value)
    assert str(caught.value).endswith(f"If that process is gone, delete {run_dir}/.lock")


def test_foreign_host_is_respected_and_odd_lock_files_refused(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  foreign = json.dumps({"pid": 1, "host": "elsewhere", "started": "now", "command": "runner.py"})
  (run_dir / ".lock").write_text(foreign)
  with pytest.raises(errors.ConfigError, match="in use by process 1 on elsewhere"):
    runlock.RunLock(str(run_dir)).acquire()
  assert (run_dir / ".lock").read_text() == foreign
  os.remove(run_dir / ".lock")
  os.symlink(tmp_path / "elsewhere", run_dir / ".lock")
  with pytest.raises(errors.ConfigError, match="is a symbolic link; remove it"):
    runlock.RunLock(str(run_dir)).acquire()
  assert not (tmp_path / "elsewhere").exists()
  os.remove(run_dir / ".lock")
  os.mkfifo(run_dir / ".lock")
  start = time.monotonic()
  with pytest.raises(errors.ConfigError, match="is not a regular file"):
    runlock.RunLock(str(run_dir)).acquire()
  assert time.monotonic() - start < 1


def test_without_fcntl_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(runlock, "fcntl", None)
  with pytest.raises(errors.ConfigError, match="no fcntl.flock"):
    runlock.RunLock(str(tmp_path)).acquire()


def paused_thread(monkeypatch, point, target):
  """`target` run in a thread that stops once at `point` until released."""
  reached, go = threading.Event(), threading.Event()
  outcome = {}
  def pause(name):
    if name == point and threading.current_thread() is thread and not reached.is_set():
      reached.set()
      assert go.wait(10)
  def run():
    try:
      outcome["value"] = target()
    except errors.UserError as exc:
      outcome["error"] = exc
  monkeypatch.setattr(runlock, "_pause", pause)
  thread = threading.Thread(target=run)
  thread.start()
  assert reached.wait(10)
  return go, thread, outcome


def test_a_lock_file_removed_between_open_and_flock_is_not_trusted(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  first = runlock.RunLock(str(run_dir)).acquire()  # makes the directory
  def take():
    with runlock.RunLock(str(run_dir)) as second:
      return (os.fstat(second._fd).st_ino, os.stat(second.path).st_ino, os.listdir(run_dir))
  go, thread, outcome = paused_thread(monkeypatch, "opened", take)
  first.release()  # removes .lock and the directory the second has opened a file in
  assert not run_dir.exists()
  go.set()
  thread.join(10)
  held_ino, path_ino, listing = outcome["value"]
  assert held_ino == path_ino and listing == [".lock"]  # retried: made and locked anew
  assert not run_dir.exists()


def test_refused_process_never_removes_a_directory_in_use(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  go, thread, outcome = paused_thread(
      monkeypatch, "directory", lambda: runlock.RunLock(str(run_dir)).acquire())
  assert run_dir.is_dir()  # made by the paused thread, which is now refused below
  monkeypatch.setattr(runlock, "_pause", lambda name: None)
  with runlock.RunLock(str(run_dir)) as holder:
    go.set()
    thread.join(10)
    assert "in use by process" in str(outcome["error"])
    assert run_dir.is_dir() and holder.held and os.listdir(run_dir) == [".lock"]
