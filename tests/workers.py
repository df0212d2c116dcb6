"""Worker processes on 127.0.0.1 for the multi_worker tests (free ports, run, wait)."""

import json
import socket
import subprocess

from tests import scripts_run


def free_ports(count):
  """`count` TCP ports on 127.0.0.1 that were free a moment ago."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def tf_config(ports, index):
  """TF_CONFIG of worker `index` of a cluster of workers on 127.0.0.1:`ports`."""
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def run_workers(commands, envs, cwd, timeout=600):
  """Starts every command at once (worker i with envs[i]), waits for all;
  [(returncode, stdout, stderr)]. Workers still running at an error are killed."""
  workers = [scripts_run.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=cwd)
             for command, env in zip(commands, envs)]
  try:
    outputs = [w.communicate(timeout=timeout) for w in workers]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  return [(w.returncode, out, err) for w, (out, err) in zip(workers, outputs)]
