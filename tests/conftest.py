"""Shared pytest fixtures."""

import os

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT_ENV = "LEO_SUITE_OMNIGLOT_DIR"
# The processes the tests start (scripts/*.py, runner.py, helpers) import this
# checkout's leo_suite, installed or not: the repository leads their PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                   if p and os.path.abspath(p) != REPO_ROOT])


# The longest files (seconds summed over their tests in a --durations=0 run),
# handed out first under pytest-xdist (scripts/test.sh passes
# --no-loadscope-reorder, so this order holds) so no long file starts last and
# runs alone.
LONGEST_FILES = ("test_runner.py", "test_faults.py", "test_distribute.py", "test_contract.py",
                 "test_run_safety.py", "test_serving.py", "test_evaluation.py", "test_xla.py",
                 "test_pretrain_distribute.py", "test_meta_lstm.py", "test_hostile_inputs.py",
                 "test_snail.py", "test_entry_points.py", "test_predict.py",
                 "test_pretrain_extract.py", "test_extract_shards.py", "test_fuzz.py",
                 "test_imaml.py", "test_loader_hardening.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Under xdist (--dist loadgroup): a file's tests stay on one worker (its
  module fixtures are built once), except the real-data pipeline runs, each
  a group of its own that may run beside its file; those go first, then the
  longest files. The tests that go on in one reduced pipeline run
  (`omniglot_work`) share a group, so one worker builds it. Each file's own
  order is kept."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  for item in items:
    alone = item.get_closest_marker("integration") and item.get_closest_marker("slow")
    group = item.nodeid if alone else item.path.name
    if "omniglot_work" in getattr(item, "fixturenames", ()):
      group = "omniglot_work"  # one worker builds that module fixture, once
    item.add_marker(pytest.mark.xdist_group(group))
  items.sort(key=lambda item: (
      not (item.get_closest_marker("integration") and item.get_closest_marker("slow")),
      rank.get(item.path.name, len(LONGEST_FILES))))


def omniglot_dir():
  """Where the real Omniglot archives are: $LEO_SUITE_OMNIGLOT_DIR or ../shared."""
  return os.environ.get(
      OMNIGLOT_ENV, os.path.join(REPO_ROOT, "..", "shared", "data", "omniglot"))


@pytest.fixture(scope="session")
def omniglot_archives():
  directory = omniglot_dir()
  archives = [os.path.join(directory, name) for name in
              ("images_background_small1.zip", "images_background_small2.zip")]
  missing = [a for a in archives if not os.path.exists(a)]
  if missing:
    pytest.skip(f"Omniglot archives not found ({missing}); set {OMNIGLOT_ENV}")
  return archives


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """A tiny LEO-format dataset 'tiny' (D=12; 6/4/4 classes of 8+ images, unequal)."""
  from leo_suite.data import embedding_keys  # pylint: disable=g-import-not-at-top
  from leo_suite.data import embeddings  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for split, num_classes in (("train", 6), ("val", 4), ("test", 4)):
    keys, rows = [], []
    for c in range(num_classes):
      center = rng.standard_normal(12)
      for i in range(8 + c):
        keys.append(embedding_keys.make_key(f"{split}{c}", i))
        rows.append(center + 0.5 * rng.standard_normal(12))
    embeddings.write_split(str(root / "tiny" / "center" / f"{split}_embeddings.pkl"),
                           keys, np.asarray(rows))
  return str(root)
