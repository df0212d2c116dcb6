"""Markdown tables of results (the docs' tables and the tools' reports)."""

from typing import Sequence


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
