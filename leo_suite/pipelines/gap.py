"""How hard meta-training's tasks are next to the tasks a learner is chosen and
tested on (issue 31): nearest class mean on meta-train, meta-val and meta-test
episodes of the same embeddings, and each learner's accuracy on its training
batches beside its validation accuracy.

A backbone pretrained on the meta-train classes has fitted their embeddings, so
nearest class mean can be near perfect on meta-train episodes while it is not on
the unseen classes of meta-val: the meta-gradient then carries little about the
regime the test episodes come from.
"""

from typing import Dict, Sequence

from leo_suite import report
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.pretrain import pipeline

SPLITS = ("train", "val", "test")
SPLIT_LABELS = {"train": "meta-train", "val": "meta-val", "test": "meta-test"}


def tagged(rows: Sequence[dict], split: str) -> list:
  """pipeline.evaluate_baselines rows of one split as ncm_by_split rows."""
  return [{"split": split, **{k: v for k, v in row.items() if k != "method"}} for row in rows]


def ncm_by_split(splits: Dict[str, embeddings_lib.EmbeddingSplit], settings,
                 num_episodes: int, seed: int) -> list:
  """Rows {split, setting, accuracy, ci95, num_tasks}: cosine nearest class mean on
  `num_episodes` seeded episodes of each split (15 queries per class)."""
  rows = []
  for name in SPLITS:
    if name in splits:
      rows += tagged(pipeline.evaluate_baselines(
          splits[name], SPLIT_LABELS[name], settings, num_episodes=num_episodes, seed=seed,
          methods=("ncm_cosine",)), name)
  return rows


def ncm_table(rows: Sequence[dict], settings) -> str:
  """One line per split, one column per setting."""
  columns = [f"{w}w{s}s" for w, s in settings]
  cells = []
  for name in SPLITS:
    line = [f"ncm_cosine, {SPLIT_LABELS[name]} episodes"]
    for column in columns:
      match = [r for r in rows if r["split"] == name and r["setting"] == column]
      line.append(f"{match[0]['accuracy']:.2f} ± {match[0]['ci95']:.2f}" if match else "-")
    if any(cell != "-" for cell in line[1:]):
      cells.append(line)
  return report.markdown_table(["episodes from"] + [f"{w}-way {s}-shot" for w, s in settings],
                               cells, rule="---")


def learner_table(rows: Sequence[dict]) -> str:
  """Per learner and setting: accuracy on its meta-train batches (first logging
  window, window at the chosen step) beside meta-val accuracy (step 0, chosen)."""
  cells = []
  for row in rows:
    gap = row.get("gap") or {}
    if not gap:
      continue
    cells.append([row["model"], row["setting"],
                  f"{gap['train_accuracy_first']:.2f}", f"{gap['train_accuracy_chosen']:.2f}",
                  f"{gap['val_accuracy_step0']:.2f}", f"{gap['val_accuracy_chosen']:.2f}",
                  str(row.get("best_step", "-"))])
  if not cells:
    return ""
  return report.markdown_table(
      ["learner", "setting", "meta-train acc, first window", "meta-train acc, at chosen step",
       "meta-val acc, step 0", "meta-val acc, chosen", "chosen step"], cells, rule="---")
