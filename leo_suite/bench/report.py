"""The benchmark's setting, issue 14's targets and its tables, from the results alone.

leo_suite/bench/benchmark.py measures; this module states what is measured
(shapes, learners, shots), what each figure must reach (`target_checks`) and
prints the tables (`print_table`, `markdown` for docs/benchmarks.md).
"""

import json

from leo_suite import errors
from leo_suite import report
from leo_suite import safeio
from leo_suite.models import registry

MODELS = tuple(registry.LEARNERS)
NUM_WAYS, DIM, BATCH, TRAIN_QUERIES, IMAGES_PER_CLASS = 5, 640, 12, 15, 600
SHOTS = (1, 5)
MEMORY_INNER_STEPS = (1, 5, 10, 20)
# Learner settings the targets are stated for (others: the learner's defaults).
LEARNER_CONFIGS = {"maml": dict(hidden_sizes="", inner_steps=5, first_order=False,
                                meta_sgd=False)}  # linear head, 5 second-order steps

# Issue 14's targets (short label for the tables, what it means).
XLA_MIN, BATCHED_MIN, EVAL_TASKS_MIN, LIMIT_FRACTION_MIN = 1.0, 3.0, 1000.0, 0.5
TRAIN_TASKS_MIN = {("leo", 1): 1500.0, ("leo", 5): 700.0, ("maml", 1): 6000.0}
LEO_EVAL_TASKS, LEO_EVAL_SECONDS = 10000, 5.0
TARGET_LABELS = {
    "xla_not_slower": ("XLA", "XLA/plain >= 1.0"),
    "batched_vs_map_fn": ("3x", "batched step >= 3x its per-task map_fn form"),
    "train_tasks_per_s": ("tasks/s", "meta-training tasks/s (faster of plain and XLA) >= "
                                     "LEO 1,500 at 1-shot, 700 at 5-shot; MAML 6,000 at "
                                     "1-shot"),
    "eval_tasks_per_s": ("eval", "evaluation >= 1,000 test tasks/s"),
    "eval_or_limit": ("limit", "evaluation >= 1,000 test tasks/s or >= 0.5 of its "
                                    "arithmetic limit (issue 32)"),
    "leo_eval_10000_tasks_seconds": ("10k", "LEO's 10,000 1-shot test tasks at V = 600 - K "
                                            "in <= 5 s"),
}


# -- the report: targets and tables (from the results alone) -------------------------
def read_results(path):
  """A benchmark JSON written by --output (a regular file under the size cap),
  or a one-line DataError naming the file."""
  try:
    results = json.loads(safeio.read_bytes(path, what=f"benchmark JSON {path}"))
  except ValueError as exc:
    raise errors.DataError(f"{path}: not JSON ({safeio.one_line(str(exc), 200)}); "
                           "write one with scripts/benchmark.py --output") from None
  if not isinstance(results, dict) or not isinstance(results.get("machine"), dict):
    raise errors.DataError(f"{path}: not a benchmark JSON (no 'machine' record); write "
                           "one with scripts/benchmark.py --output")
  return results


def fmt(value, spec=".1f"):
  return "-" if value is None else format(value, spec)


def mega(value):
  return None if value is None else value / 1e6


def ratio(numerator, denominator):
  return numerator / denominator if numerator and denominator else None


def check(name, model, shots, value, threshold, at_most=False, **details):
  """One target: holds is None when not measured (a relative 1e-9 absorbs rounding)."""
  holds = None
  if value is not None:
    holds = (value <= threshold * (1 + 1e-9) if at_most
             else value >= threshold * (1 - 1e-9))
  return dict(name=name, learner=model, shots=shots, value=value, threshold=threshold,
              holds=holds, **details)


def target_checks(results):
  """Issue 14's targets for every learner and shot measured in `results`."""
  batch = results.get("settings", {}).get("meta_batch", BATCH)
  configs = results.get("settings", {}).get("learner_configs", {})
  checks = []
  for model, per_model in results.get("train", {}).items():
    for shots, row in per_model.items():
      k = int(shots)
      checks.append(check("xla_not_slower", model, k,
                          ratio(row.get("xla"), row.get("batched")), XLA_MIN))
      checks.append(check("batched_vs_map_fn", model, k,
                          ratio(row.get("batched"), row.get("map_fn")), BATCHED_MIN))
      if (model, k) in TRAIN_TASKS_MIN:
        variants = {v: row[v] for v in ("batched", "xla") if row.get(v)}
        best = max(variants, key=variants.get) if variants else None
        details = {"variant": {"batched": "plain", "xla": "xla"}.get(best),
                   "meta_batch": batch}
        if model in configs:
          details["config"] = configs[model]
        checks.append(check("train_tasks_per_s", model, k,
                            variants[best] * batch if best else None,
                            TRAIN_TASKS_MIN[(model, k)], **details))
  for model, per_model in results.get("eval", {}).items():
    for shots, row in per_model.items():
      rate = row.get("tasks_per_s")
      checks.append(check("eval_tasks_per_s", model, int(shots), rate, EVAL_TASKS_MIN))
      near = check("eval_or_limit", model, int(shots), row.get("limit_fraction"),
                   LIMIT_FRACTION_MIN, tasks_per_s=rate)
      if rate is not None and rate >= EVAL_TASKS_MIN:
        near["holds"] = True
      checks.append(near)
      if model == "leo" and int(shots) == 1:
        checks.append(check(
            "leo_eval_10000_tasks_seconds", model, 1,
            LEO_EVAL_TASKS / rate if rate else None, LEO_EVAL_SECONDS, at_most=True,
            tasks_measured=row.get("tasks"), queries_per_class=row.get("queries_per_class")))
  return checks


def mark(holds):
  return {True: "\u2713", False: "\u2717", None: "?"}[holds]


def table(results):
  """(header, rows): one row per learner and shot, every cell a string."""
  header = ["learner", "K", "steps/s", "tasks/s", "XLA steps/s", "map_fn steps/s",
            "batched / map_fn", "XLA / plain", "data wait", "eval tasks/s",
            "eval MFLOP/task", "eval / limit", "peak MB", "targets"]
  batch = results.get("settings", {}).get("meta_batch", BATCH)
  checks = target_checks(results)
  models = [m for m in MODELS if m in results.get("train", {}) or m in results.get("eval", {})]
  rows = []
  for model in models:
    for k in SHOTS:
      train = results.get("train", {}).get(model, {}).get(str(k), {})
      evaluation_row = results.get("eval", {}).get(model, {}).get(str(k), {})
      memory = results.get("memory", {}).get(f"{model} {k}-shot default", {})
      if not (train or evaluation_row):
        continue
      plain = train.get("batched")
      wait = (f"{train['data_wait_ms']:.1f} ms ({100 * train['data_wait_fraction']:.0f}%)"
              if train.get("data_wait_ms") is not None else "-")
      marks = " ".join(f"{TARGET_LABELS[c['name']][0]} {mark(c['holds'])}"
                       for c in checks if c["learner"] == model and c["shots"] == k)
      rows.append([model, str(k), fmt(plain), fmt(plain * batch if plain else None, ",.0f"),
                   fmt(train.get("xla")), fmt(train.get("map_fn"), ".2f"),
                   fmt(ratio(plain, train.get("map_fn")), ".2f"),
                   fmt(ratio(train.get("xla"), plain), ".2f"), wait,
                   fmt(evaluation_row.get("tasks_per_s"), ",.0f"),
                   fmt(mega(evaluation_row.get("flops_per_task")), ",.1f"),
                   fmt(evaluation_row.get("limit_fraction"), ".3f"),
                   fmt(memory.get("peak_rss_increase_mb")), marks or "-"])
  return header, rows


def markdown(results):
  """The speed table of docs/benchmarks.md, its legend and where it was measured."""
  lines = [report.markdown_table(*table(results))]
  legend = "; ".join(f"{label} = {meaning}" for label, meaning in TARGET_LABELS.values())
  lines += ["", f"Targets: {legend}; {mark(True)} holds, {mark(False)} does not, ? not "
                "measured."]
  machine, settings = results.get("machine", {}), results.get("settings", {})
  if machine:
    load = ", ".join(f"{x:.1f}" for x in machine.get("load_average", []))
    lines.append(f"Measured on {machine.get('cpus')} CPUs, {machine.get('gpus', 0)} GPUs, "
                 f"TensorFlow {machine.get('tf')}, load average {load}"
                 + (f", float32 matmul {machine['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s"
                    if machine.get("matmul_flops_per_s") else "")
                 + (" (--quick)" if settings.get("quick") else "") + ".")
  return "\n".join(lines)


def print_table(results):
  header, rows = table(results)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  print(f"\n== meta-training (5-way, meta-batch {BATCH}, D={DIM}, V={TRAIN_QUERIES}; "
        f"tasks/s = {BATCH}x steps/s), evaluation, memory ==")
  for row in [header] + rows:
    print("  ".join(cell.rjust(w) if i > 0 else cell.ljust(w)
                    for i, (cell, w) in enumerate(zip(row, widths))))
  if results.get("targets"):
    print("\n== targets (issue 14) ==")
    for c in results["targets"]:
      print(f"{mark(c['holds'])} {c['name']:30s} {c['learner']:13s} K={c['shots']}  "
            f"{fmt(c['value'], ',.2f'):>10s} {'<=' if c['name'].endswith('seconds') else '>='} "
            f"{c['threshold']:,g}")
  counted = [(model, shots, row) for model, per_model in results.get("train", {}).items()
             for shots, row in per_model.items() if row.get("train_flops_per_task")]
  if counted:
    print("\n== meta-training arithmetic (loss and gradients per task; limit = matmul "
          "FLOP/s / FLOPs) ==")
    for model, shots, row in counted:
      print(f"{model:13s} K={shots}: {mega(row['train_flops_per_task']):,.1f} MFLOP/task, "
            f"limit {fmt(row.get('train_limit_tasks_per_s'), ',.0f')} tasks/s, "
            f"{fmt(row.get('train_limit_fraction'), '.3f')} of it")
  if results.get("eval"):
    print("\n== evaluation (fixed set via EpisodeSampler, V = 600-K queries/class) ==")
    for model, per_model in results["eval"].items():
      for shots, row in per_model.items():
        if "error" in row:
          print(f"{model:8s} K={shots}: error {row['error']}")
          continue
        passes = row.get("passes_seconds") or [row["seconds"]]
        spread = (f", the median of {len(passes)} passes of {min(passes):.2f}-{max(passes):.2f}"
                  f" s at matmul {row['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s"
                  if len(passes) > 1 and row.get("matmul_flops_per_s") else "")
        print(f"{model:8s} K={shots}: {row['tasks_per_s']:8.1f} tasks/s "
              f"({row['tasks']} tasks in {row['seconds']:.1f} s{spread}, {row.get('method', 'gather')}"
              f" path; gather path {row.get('gather_tasks_per_s', row['tasks_per_s']):.1f}"
              f" tasks/s; queries predicted differently: {row.get('query_flips', '-')}"
              f" of {row.get('queries', '-')}; {fmt(mega(row.get('flops_per_task')), ',.1f')}"
              f" MFLOP/task, {fmt(row.get('limit_fraction'), '.3f')} of the limit"
              f" {fmt(row.get('limit_tasks_per_s'), ',.0f')} tasks/s)")
    for shots, seconds in results.get("sampler_seconds", {}).items():
      print(f"sampler alone K={shots}: {seconds['seconds']:.1f} s for {seconds['tasks']} tasks")
  if results.get("memory"):
    print("\n== peak memory of a meta-training step (RSS high-water increase, MB) ==")
    for key, row in results["memory"].items():
      print(f"{key:24s} {fmt(row.get('peak_rss_increase_mb')):>8s} MB"
            + (f"  error: {row['error']}" if "error" in row else ""))
  for key in ("extraction", "serving"):
    if results.get(key):
      print(f"\n== {key} ==")
      for name, value in results[key].items():
        print(f"{name:32s} {value}")
