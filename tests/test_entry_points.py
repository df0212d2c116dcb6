"""Every command-line entry point (runner.py, scripts/*.py, experiments/*.py): --helpfull
exits 0 with the tool's own usage and not one TensorFlow C++ start-up line;
none edits sys.path; scripts are thin (flags and a call into leo_suite)."""

import concurrent.futures
import glob
import os
import re
import subprocess
import sys

import pytest

from leo_suite import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "runner.py")
SCRIPTS = [RUNNER] + sorted(glob.glob(os.path.join(REPO, "scripts", "*.py")))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
ENTRY_POINTS = SCRIPTS + EXPERIMENTS
# What TF 2.21's C++ start-up writes to descriptor 2 (oneDNN, cudart, cuInit,
# CPU features, absl's pre-InitializeLog lines with their I0000/W0000/E0000 prefix).
TF_LINES = re.compile(r"oneDNN|cuda|cuInit|TensorFlow binary is optimized|InitializeLog|"
                      r"[IWE]0000")
MAX_SCRIPT_LINES = 150
MAX_RUNNER_LINES = 200


def relative(path):
  return os.path.relpath(path, REPO)


def run_helpfull(paths):
  """{path: CompletedProcess of `python path --helpfull`}, started a few at a time
  (each imports TensorFlow), with TF's own log level and ours unset."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", console.ENV_VAR)}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

  def run(path):
    return subprocess.run([sys.executable, path, "--helpfull"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO, check=False)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(paths, pool.map(run, paths)))


@pytest.fixture(scope="module")
def scripts_helpfull():
  return run_helpfull(SCRIPTS)


@pytest.fixture(scope="module")
def experiments_helpfull():
  return run_helpfull(EXPERIMENTS)


def check_helpfull(proc, path):
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not TF_LINES.findall(proc.stderr), proc.stderr[-2000:]
  assert not proc.stderr.strip(), proc.stderr[-2000:]
  with open(path) as handle:
    summary = handle.read().split('"""')[1].strip().splitlines()[0]
  assert summary in proc.stdout      # the tool's own usage (its docstring)
  assert "--[no]helpfull" in proc.stdout


def test_every_entry_point_is_found():
  names = {relative(p) for p in ENTRY_POINTS}
  assert {"runner.py", "scripts/benchmark.py", "scripts/omniglot_pipeline.py",
          "experiments/speed_probes.py", "experiments/leo_xla_probe.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=relative)
def test_script_helpfull_exits_0_without_tensorflow_lines(scripts_helpfull, path):
  check_helpfull(scripts_helpfull[path], path)


@pytest.mark.slow   # six more TensorFlow imports; the experiments are not user tools
@pytest.mark.parametrize("path", EXPERIMENTS, ids=relative)
def test_experiment_helpfull_exits_0_without_tensorflow_lines(experiments_helpfull, path):
  check_helpfull(experiments_helpfull[path], path)


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=relative)
def test_no_entry_point_edits_sys_path(path):
  with open(path) as handle:
    assert "sys.path" not in handle.read()


@pytest.mark.parametrize("path", SCRIPTS, ids=relative)
def test_scripts_are_thin(path):
  limit = MAX_RUNNER_LINES if path == RUNNER else MAX_SCRIPT_LINES
  with open(path) as handle:
    assert len(handle.read().splitlines()) <= limit


def test_no_argparse_anywhere():
  """absl flags everywhere: one flag syntax, --helpfull on every tool."""
  paths = ENTRY_POINTS + [os.path.join(REPO, "config.py")] + glob.glob(
      os.path.join(REPO, "leo_suite", "**", "*.py"), recursive=True)
  for path in paths:
    with open(path) as handle:
      assert "argparse" not in handle.read(), relative(path)


def test_help_is_recognised_only_before_double_dash():
  assert console.asks_for_help(["x", "--helpfull"])
  assert console.asks_for_help(["x", "--a=1", "-?"])
  assert console.asks_for_help(["x", "--help=true"])
  assert not console.asks_for_help(["x", "--helper", "--", "--help"])
  assert not console.asks_for_help(["x", "help"])


def test_every_library_folder_is_a_package():
  """pyproject.toml installs the packages under leo_suite: a folder of modules
  without __init__.py would be left out of the wheel."""
  for root, dirs, files in os.walk(os.path.join(REPO, "leo_suite")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    if any(f.endswith(".py") for f in files):
      assert "__init__.py" in files, relative(root)
