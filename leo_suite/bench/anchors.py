"""Ratios against the anchors (`../shared/tools/anchors/`: DeepMind's LEO
release and a PyTorch + higher MAML peer), read from their printed lines and
the benchmark's training rows, one round at a time.

A round times leo-suite's rows, the release and the peer back to back, so
each ratio compares measurements about a minute apart; the rounds' median is
the figure (`experiments/speed_rounds.py` runs them). On stop 42's machine
two sittings an hour apart put MAML at 9.8x and 4.5x the peer at 1-shot:
one sitting's ratio says little near a threshold.
"""

import re
import statistics

from leo_suite import errors
from leo_suite.bench.report import BATCH

RELEASE_LINE = re.compile(r"^release LEO K=(\d+): .*= (\d+(?:\.\d+)?) tasks/s", re.MULTILINE)
PEER_LINE = re.compile(r"^peer higher MAML \d+-way (\d+)-shot .*?(\d+(?:\.\d+)?) tasks/s",
                       re.MULTILINE)


def tasks_per_s(pattern, text, what, line):
  """{shots: tasks/s} from an anchor's printed `text`; DataError quoting its
  end when no `line` (pattern: shots, tasks/s) is in it."""
  found = {int(k): float(v) for k, v in pattern.findall(text)}
  if not found:
    raise errors.DataError(f"{what}: no '{line}' line; its end: {text.strip()[-300:]!r}")
  return found


def release_tasks_per_s(text, what="the release's output"):
  """{shots: tasks/s} from leo_release_speed.py's lines."""
  return tasks_per_s(RELEASE_LINE, text, what, "release LEO K=...: ... tasks/s")


def peer_tasks_per_s(text, what="the peer's output"):
  """{shots: tasks/s} from maml_peer_higher.py's line(s)."""
  return tasks_per_s(PEER_LINE, text, what, "peer higher MAML ... tasks/s")


def suite_tasks_per_s(train_rows, model, shots):
  """Meta-training tasks/s of a benchmark JSON's `train` section: the
  faster of the plain and XLA steps/s, times the meta-batch."""
  row = train_rows.get(model, {}).get(str(shots))
  rates = [row.get(name) for name in ("batched", "xla")] if row else []
  rates = [r for r in rates if isinstance(r, (int, float)) and r > 0]
  if not rates:
    raise errors.DataError(f"the benchmark's training rows hold no steps/s for {model} "
                           f"{shots}-shot")
  return BATCH * max(rates)


def round_ratios(train_rows, release, peer, shots=(1, 5)):
  """One round: {shots: {leo, release, leo_ratio, maml, peer, maml_ratio}}."""
  ratios = {}
  for k in shots:
    if k not in release or k not in peer:
      raise errors.DataError(f"{k}-shot: the round has no release or peer figure")
    leo, maml = suite_tasks_per_s(train_rows, "leo", k), suite_tasks_per_s(train_rows, "maml", k)
    ratios[k] = {"leo": leo, "release": release[k], "leo_ratio": leo / release[k],
                 "maml": maml, "peer": peer[k], "maml_ratio": maml / peer[k]}
  return ratios


def summary(rounds):
  """{shots: {leo_ratio, maml_ratio: {median, low, high}}} over rounds."""
  if not rounds:
    raise ValueError("no rounds")
  out = {}
  for k in rounds[0]:
    out[k] = {}
    for key in ("leo_ratio", "maml_ratio"):
      values = [r[k][key] for r in rounds]
      out[k][key] = {"median": statistics.median(values), "low": min(values),
                     "high": max(values)}
  return out
