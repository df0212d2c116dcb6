"""The Omniglot pipeline's results table and its verdict against the baseline."""

from leo_suite import report
from leo_suite.pretrain import pipeline


def results_table(rows, settings=pipeline.SETTINGS) -> str:
  """One row per method, one column per setting: 'acc ± ci' or the status."""
  columns = [f"{w}w{s}s" for w, s in settings]
  methods = list(dict.fromkeys(row["method"] for row in rows))
  cells = []
  for method in methods:
    line = [method]
    for column in columns:
      match = [r for r in rows if r["method"] == method and r["setting"] == column]
      if not match:
        line.append("-")
      elif "accuracy" in match[0]:
        cell = f"{match[0]['accuracy']:.2f} ± {match[0]['ci95']:.2f}"
        if "best_step" in match[0]:  # learners: best validation accuracy @ its step
          cell += f" (val {report.best_cell(match[0]['val_accuracy'], match[0]['best_step'])})"
        elif "model" in match[0]:
          cell += " (no best checkpoint)"
        line.append(cell)
      else:
        line.append(match[0]["status"])
    cells.append(line)
  header = ["method"] + [f"{w}-way {s}-shot" for w, s in settings]
  return report.markdown_table(header, cells, rule="---")


def against_baseline(rows, baseline_method, settings=pipeline.SETTINGS) -> str:
  """One line: per setting, how many learners beat `baseline_method` by more
  than both 95% intervals, how many fall below it by more than both, and how
  many chose their initialisation (best validation at step 0)."""
  parts = []
  for ways, shots in settings:
    column = f"{ways}w{shots}s"
    base = [r for r in rows if r["method"] == baseline_method and r["setting"] == column
            and "accuracy" in r]
    learners = [r for r in rows if "model" in r and r["setting"] == column and "accuracy" in r]
    if not base or not learners:
      continue
    signs = [report.separated(r["accuracy"], r["ci95"], base[0]["accuracy"], base[0]["ci95"])
             for r in learners]
    untrained = sum(report.untrained(r.get("best_step")) for r in learners)
    parts.append(f"{column} {signs.count(1)} above, {signs.count(-1)} below, "
                 f"{untrained} {report.UNTRAINED} of {len(learners)}")
  return (f"Learners against {baseline_method}, by more than both 95% intervals: "
          + "; ".join(parts) + ".") if parts else ""


def metatrain_note(options, num_metatrain_classes: int, manifest: dict) -> str:
  """What the learners meta-train on, when it is not the pretraining classes
  (the pipeline's --metatrain_holdout, --metatrain_rotations, --metatrain_views)."""
  o = options
  return ((f" (the learners meta-train on the other {num_metatrain_classes}: "
           f"--metatrain_holdout={o.metatrain_holdout})" if o.metatrain_holdout else "")
          + (f"; meta-train episodes also draw those characters turned by 90, 180 and 270 "
             f"degrees as classes of their own (--metatrain_rotations: "
             f"{manifest['splits']['train']['num_classes']} classes)"
             if o.metatrain_rotations else "")
          + (f"; each meta-train image is shown as the mean of {o.metatrain_views} of its "
             f"{manifest['views']['train']['num_views']} views, drawn per episode "
             f"(--metatrain_views)" if o.metatrain_views else ""))
