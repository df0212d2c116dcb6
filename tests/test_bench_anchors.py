"""Issue 32's ratios against the anchors (leo_suite/bench/anchors.py,
experiments/speed_rounds.py): the anchors' lines parsed, one round's ratios
and the rounds' medians, and bad input refused in one line."""

import os
import sys

import pytest

from leo_suite import errors
from leo_suite.bench import anchors
from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines as leo_release_speed.py and maml_peer_higher.py print them (stop 42's sitting 1).
RELEASE_OUTPUT = """WARNING:tensorflow: something the TF1 graph says
release LEO K=1: 17.83 steps/s = 214 tasks/s (windows 23.0, 17.8, 16.5, 15.8, 18.1); loss 94.5627
release LEO K=5: 9.39 steps/s = 113 tasks/s (windows 11.3, 11.2, 9.4, 8.9, 8.0); loss 22.8380
"""
PEER_1 = "peer higher MAML 5-way 1-shot mb12 steps5: 40.4 steps/s, 485 tasks/s\n"
PEER_5 = "peer higher MAML 5-way 5-shot mb12 steps5: 42.6 steps/s, 511 tasks/s\n"


def train_rows(leo_plain, leo_xla, maml_plain, maml_xla):
  row = lambda plain, xla: {"1": {"batched": plain, "xla": xla},
                            "5": {"batched": plain / 2, "xla": xla / 2}}
  return {"leo": row(leo_plain, leo_xla), "maml": row(maml_plain, maml_xla)}


def test_the_anchors_lines_are_read():
  assert anchors.release_tasks_per_s(RELEASE_OUTPUT) == {1: 214.0, 5: 113.0}
  assert anchors.peer_tasks_per_s(PEER_1) == {1: 485.0}
  assert anchors.peer_tasks_per_s(PEER_1 + PEER_5) == {1: 485.0, 5: 511.0}


@pytest.mark.parametrize("reader", [anchors.release_tasks_per_s, anchors.peer_tasks_per_s])
def test_output_without_a_figure_is_refused_with_its_end(reader):
  with pytest.raises(errors.DataError, match="Traceback.*ImportError: no torch"):
    reader("Traceback (most recent call last):\nImportError: no torch\n")


def test_a_round_divides_the_faster_step_by_the_anchor():
  """tasks/s = 12 x the faster of plain and XLA steps/s; ratio = that / the anchor's."""
  rows = train_rows(leo_plain=50.0, leo_xla=100.0, maml_plain=400.0, maml_xla=300.0)
  ratios = anchors.round_ratios(rows, {1: 200.0, 5: 100.0}, {1: 480.0, 5: 600.0})
  assert ratios[1] == {"leo": 1200.0, "release": 200.0, "leo_ratio": 6.0,
                       "maml": 4800.0, "peer": 480.0, "maml_ratio": 10.0}
  assert ratios[5]["leo_ratio"] == 6.0 and ratios[5]["maml_ratio"] == 4.0
  rows["leo"]["5"]["xla"] = None  # a failed XLA row: the plain one counts
  assert anchors.round_ratios(rows, {1: 200.0, 5: 100.0}, {1: 480.0, 5: 600.0})[5]["leo"] == 300.0


def test_a_round_without_a_figure_is_refused():
  rows = train_rows(50.0, 100.0, 400.0, 300.0)
  with pytest.raises(errors.DataError, match="5-shot: the round has no release or peer"):
    anchors.round_ratios(rows, {1: 200.0}, {1: 480.0, 5: 600.0})
  del rows["maml"]["1"]
  with pytest.raises(errors.DataError, match="no steps/s for maml 1-shot"):
    anchors.round_ratios(rows, {1: 200.0, 5: 100.0}, {1: 480.0, 5: 600.0})


def test_the_summary_is_the_median_and_range_of_the_rounds():
  """Stop 42's three rounds at 1-shot: LEO 5.38x, 4.03x, 4.15x -> median 4.15x."""
  rounds = [{1: {"leo_ratio": r, "maml_ratio": m}} for r, m in
            ((5.38, 6.94), (4.03, 4.66), (4.15, 7.84))]
  summary = anchors.summary(rounds)[1]
  assert summary["leo_ratio"] == {"median": 4.15, "low": 4.03, "high": 5.38}
  assert summary["maml_ratio"] == {"median": 6.94, "low": 4.66, "high": 7.84}
  with pytest.raises(ValueError, match="no rounds"):
    anchors.summary([])


def test_speed_rounds_refuses_a_missing_release_in_one_line(tmp_path):
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO, "experiments", "speed_rounds.py"),
       f"--release_dir={tmp_path}", f"--peer_python={sys.executable}",
       f"--out_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --") and "is not a file" in last, last
  assert not (tmp_path / "out").exists()
