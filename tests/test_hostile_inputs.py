"""Issue 30: hostile inputs reach the tools only through leo_suite's safety layer.

Each case checks the wiring, not the layer itself (tests/test_safeio.py and
tests/test_runlock.py test that): a run's lock is leo_suite/runlock.py's, names
from flags and manifests are checked before anything is read or written, data
files are read only if regular and under the cap, images and archives are
checked before they are decompressed. Each refusal is one `error:` line.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- 1. the run's lock ---------------------------------------------------------------

# A process taking `Run.lock` through the tools' error path (console.run): waits
# for the test's go, holds the run for `hold` seconds, exits 0; refused, exit 2.
LOCK_TAKER = r"""
import os, sys, time
from leo_suite import console
console.import_tensorflow()
from leo_suite.training import run as run_lib
directory, ready, go, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def main(argv):
  open(ready + str(os.getpid()), "w").close()
  while not os.path.exists(go):
    time.sleep(0.002)
  with run_lib.Run.lock(directory, create=True):
    time.sleep(hold)

console.run(main)
"""
NUM_TAKERS = 4


@pytest.mark.parametrize("start", ["new_path", "empty_dir", "garbage_lock"])
def test_run_lock_processes_starting_together_exactly_one_holds(tmp_path, start):
  directory = tmp_path / "runs" / "run"
  if start != "new_path":
    directory.mkdir(parents=True)
  if start == "garbage_lock":
    (directory / ".lock").write_bytes(b"\xff\0{not json")
  ready, go = tmp_path / "ready-", tmp_path / "go"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen([sys.executable, "-c", LOCK_TAKER, str(directory), str(ready),
                             str(go), "2.0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(NUM_TAKERS)]
  try:
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < NUM_TAKERS:
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
          p.communicate() for p in procs if p.poll() is not None]
      time.sleep(0.01)
    go.write_text("")
    results = [(p.pid, p.wait(timeout=120), p.communicate()[1]) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  winners = [pid for pid, code, _ in results if code == 0]
  assert len(winners) == 1, results
  for pid, code, stderr in results:
    if pid != winners[0]:
      assert code == 2 and stderr.count("\n") == 1, stderr
      assert stderr.startswith(f"error: {directory} is in use by process {winners[0]} on "
                               f"{socket.gethostname()} (since "), stderr
  assert not (directory / ".lock").exists()   # released by its holder
