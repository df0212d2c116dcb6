"""Runs the repository's scripts as a user does (`python runner.py --flags`), fast.

Every script imports TensorFlow first, which costs about 6 s of CPU before any
work, and the suite starts a few hundred of them. So each test process keeps one
"zygote": a Python process that has imported TensorFlow, Sonnet and the library,
run no TensorFlow op (no thread pool, no device yet) and defined no flag; each
command is a `fork()` of it that runs the script as `__main__` with its own
argv, environment, working directory and descriptors 0-2, exactly as
`python script args` would from there on: its own pid (signals reach it),
its own exit status (-N when killed by signal N), its own stdout and stderr.

What a fork cannot show is the interpreter's start-up: that TensorFlow's C++
start-up lines stay off descriptor 2, that a script checks its flags before the
import. Tests of start-up pass `fresh=True` (or set LEO_TESTS_FRESH=1 to run
every command in a new interpreter, as the suite did before).

    proc = scripts_run.run([path_to_script, "--flag"], capture_output=True, text=True)
    proc = scripts_run.Popen([path_to_script, ...], stdout=subprocess.PIPE)

Only `python <script> args` commands go through the zygote; anything else (a
`-c` snippet, another program) runs through `subprocess` unchanged.
"""

import array
import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

FRESH_ENV = "LEO_TESTS_FRESH"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the scripts import before their work starts (no module that defines an
# absl flag: those stay the script's own, as in a fresh interpreter).
PRELOAD = ("sonnet", "leo_suite.training.run", "leo_suite.training.trainer",
           "leo_suite.training.evaluation", "leo_suite.models.registry",
           "leo_suite.serving.export", "leo_suite.pretrain.train",
           "leo_suite.pretrain.extract", "leo_suite.pipelines.omniglot")


# -- the zygote (runs as `python tests/scripts_run.py SOCKET`) --------------------
def _serve(path):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import importlib  # pylint: disable=import-outside-toplevel
  from leo_suite import console  # pylint: disable=import-outside-toplevel
  # What every tool does first: import TensorFlow and find the devices (the
  # cuInit / cudart lines; no thread, no runtime yet) with descriptor 2 silenced.
  console.import_tensorflow([])
  for name in PRELOAD:
    try:
      importlib.import_module(name)
    except ImportError:
      pass  # a module renamed: the child imports what its script needs
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(64)
  parent = os.getppid()
  children = {}                             # pid -> the connection that asked for it
  while True:
    readable, _, _ = select.select([listener], [], [], 0.05)
    if readable:
      conn, _ = listener.accept()
      try:
        message, fds = _receive(conn)
      except (OSError, ValueError):
        conn.close()
        continue
      pid = os.fork()
      if pid == 0:
        listener.close()
        for other in children.values():
          other.close()
        conn.close()
        _child(message, fds)                # never returns
      for fd in fds:
        os.close(fd)
      try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
      except OSError:                       # the asker is gone: so is its command
        os.kill(pid, signal.SIGKILL)
      children[pid] = conn
    while children:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      conn = children.pop(pid, None)
      if conn is not None:
        try:
          conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode()
                       + b"\n")
        except OSError:
          pass
        conn.close()
    if os.getppid() != parent:              # the test process is gone
      for pid in children:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      return


def _receive(conn):
  fds = array.array("i")
  data = b""
  while not data.endswith(b"\n"):
    chunk, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
    if not chunk:
      raise ValueError("connection closed")
    data += chunk
    for level, kind, payload in ancillary:
      if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
  return json.loads(data), list(fds)


def _child(message, fds):
  """In the forked child: become `python script args` and exit with its status."""
  code = 1
  try:
    for target, fd in enumerate(fds):
      os.dup2(fd, target)
    for fd in fds:
      if fd > 2:
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    script = message["argv"][0]
    sys.argv = list(message["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    # The PYTHONPATH entries a fresh interpreter would put after the script's folder.
    for entry in reversed([p for p in message["env"].get("PYTHONPATH", "").split(os.pathsep)
                           if p]):
      if entry not in sys.path:
        sys.path.insert(1, entry)
    import runpy  # pylint: disable=import-outside-toplevel
    try:
      runpy.run_path(script, run_name="__main__")
      code = 0
    except SystemExit as exit_:
      if exit_.code is None:
        code = 0
      elif isinstance(exit_.code, int):
        code = exit_.code
      else:
        print(exit_.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exc()
      code = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    except Exception:  # pylint: disable=broad-except
      pass
    os._exit(code)  # pylint: disable=protected-access


# -- the client (in the test process) ---------------------------------------
_zygote = {}
_lock = threading.Lock()


def _zygote_path():
  with _lock:
    proc = _zygote.get("proc")
    if proc is not None and proc.poll() is None:
      return _zygote["path"]
    folder = tempfile.mkdtemp(prefix="zygote-")
    path = os.path.join(folder, "socket")
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while not os.path.exists(path):
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError("the test zygote did not start; run with LEO_TESTS_FRESH=1")
      time.sleep(0.05)
    _zygote.update(proc=proc, path=path)

    def stop():
      proc.kill()
      proc.wait()
    atexit.register(stop)
    return path


def _is_script(command):
  return (isinstance(command, (list, tuple)) and len(command) >= 2
          and command[0] == sys.executable and str(command[1]).endswith(".py")
          and not str(command[1]).startswith("-"))


def _use_fork(command, fresh):
  return not fresh and not os.environ.get(FRESH_ENV) and _is_script(command)


class ForkedProcess:
  """The part of subprocess.Popen the tests use, for a command the zygote forked."""

  def __init__(self, command, stdin=None, stdout=None, stderr=None, env=None, cwd=None,
               text=False):
    self.args = command
    self.returncode = None
    self._text = text
    ours, theirs = [], []
    self.stdin = None
    if stdin is None or stdin == subprocess.DEVNULL:
      theirs.append(os.open(os.devnull, os.O_RDONLY))
      ours.append(theirs[-1])
    else:
      raise ValueError("scripts_run: stdin pipes are not supported")
    self.stdout = self.stderr = None
    for kind, name, fallback in ((stdout, "stdout", 1), (stderr, "stderr", 2)):
      if kind == subprocess.PIPE:
        read, write = os.pipe()
        setattr(self, name, open(read, "r" if text else "rb", closefd=True))
        theirs.append(write)
        ours.append(write)
      elif kind == subprocess.DEVNULL:
        theirs.append(os.open(os.devnull, os.O_WRONLY))
        ours.append(theirs[-1])
      elif kind == subprocess.STDOUT:
        theirs.append(theirs[1])
      elif kind is None:
        theirs.append(fallback)
      elif hasattr(kind, "fileno"):
        theirs.append(kind.fileno())
      else:
        theirs.append(kind)
    message = {"argv": [str(a) for a in command[1:]],
               "env": dict(os.environ if env is None else env),
               "cwd": os.path.abspath(cwd or os.getcwd())}
    self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._conn.connect(_zygote_path())
    self._conn.sendmsg([json.dumps(message).encode() + b"\n"],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))])
    for fd in set(ours):
      os.close(fd)
    self._buffer = b""
    self.pid = self._read_message(None)["pid"]

  def _read_message(self, timeout):
    deadline = None if timeout is None else time.time() + timeout
    while b"\n" not in self._buffer:
      left = None if deadline is None else max(0.0, deadline - time.time())
      ready, _, _ = select.select([self._conn], [], [], left)
      if not ready:
        return None
      chunk = self._conn.recv(4096)
      if not chunk:
        raise RuntimeError("the test zygote died")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return json.loads(line)

  def poll(self):
    if self.returncode is None:
      message = self._read_message(0)
      if message is not None:
        self.returncode = message["returncode"]
        self._conn.close()
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      message = self._read_message(timeout)
      if message is None:
        raise subprocess.TimeoutExpired(self.args, timeout)
      self.returncode = message["returncode"]
      self._conn.close()
    return self.returncode

  def send_signal(self, number):
    if self.returncode is None:
      try:
        os.kill(self.pid, number)
      except ProcessLookupError:
        pass

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def communicate(self, timeout=None):
    results = {}

    def drain(name):
      stream = getattr(self, name)
      if stream is not None:
        results[name] = stream.read()
        stream.close()
    readers = [threading.Thread(target=drain, args=(n,), daemon=True)
               for n in ("stdout", "stderr")]
    for reader in readers:
      reader.start()
    deadline = None if timeout is None else time.time() + timeout
    for reader in readers:
      reader.join(None if deadline is None else max(0.0, deadline - time.time()))
      if reader.is_alive():
        raise subprocess.TimeoutExpired(self.args, timeout)
    self.wait(None if deadline is None else max(0.0, deadline - time.time()))
    return results.get("stdout"), results.get("stderr")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for stream in (self.stdout, self.stderr):
      if stream is not None:
        stream.close()
    self.wait()


def Popen(command, *, fresh=False, **kwargs):  # pylint: disable=invalid-name
  """subprocess.Popen, or the zygote's fork for a `python script` command."""
  if not _use_fork(command, fresh):
    return subprocess.Popen(command, **kwargs)
  return ForkedProcess(command, **kwargs)


def run(command, *, fresh=False, capture_output=False, timeout=None, check=False,
        **kwargs):
  """subprocess.run, or the zygote's fork for a `python script` command."""
  if not _use_fork(command, fresh):
    return subprocess.run(command, capture_output=capture_output, timeout=timeout,
                          check=check, **kwargs)
  if capture_output:
    kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc = ForkedProcess(command, **kwargs)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
  if check:
    result.check_returncode()
  return result


if __name__ == "__main__":
  _serve(sys.argv[1])
