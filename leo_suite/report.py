"""Markdown tables of results (the docs' tables and the tools' reports)."""

from typing import Optional, Sequence

UNTRAINED = "untrained"   # the mark of a learner whose chosen checkpoint is step 0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   rule: str = " --- ") -> str:
  """A GitHub markdown table, one line per row, no final newline.

  Cells are strings, padded by one space ("| a | b |"; an empty cell is "| |");
  `rule` is each cell of the line under the header (" --- " or "---").
  """
  def line(cells):
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"
  return "\n".join([line(header), "|" + "|".join([rule] * len(header)) + "|"]
                   + [line(row) for row in rows])


def untrained(best_step: Optional[int]) -> bool:
  """The chosen checkpoint is the initialisation: meta-training never beat it
  on validation (so the learner's figure is its starting classifier's)."""
  return best_step is not None and int(best_step) == 0


def best_cell(val_accuracy: float, best_step: int) -> str:
  """'97.38 @ 0, untrained' or '97.54 @ 50': best validation accuracy (%) @ its step."""
  return f"{val_accuracy:.2f} @ {best_step}" + (f", {UNTRAINED}" if untrained(best_step)
                                                 else "")


def separated(accuracy, ci95, other, other_ci95) -> int:
  """+1 if `accuracy` is above `other` by more than both 95% intervals, -1 if
  below by more than both, 0 otherwise (the intervals overlap that gap)."""
  gap = accuracy - other
  if gap > ci95 + other_ci95:
    return 1
  if -gap > ci95 + other_ci95:
    return -1
  return 0
