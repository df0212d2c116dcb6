"""Train and evaluate several learners through runner.py on identical episodes.

Each learner runs in its own process (runner.py --evaluate_after_training:
train, then score the test split as --evaluation_mode does) with the same data,
episode shape, seeds and fixed test tasks, so the numbers compare like for
like. Reported per run: test accuracy and 95% CI (the run's test result),
meta-training steps/s and the peak resident memory of training (the run's
TensorBoard summaries; that memory is the process's high-water mark when
training ended, before the test split is scored).
"""

import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from leo_suite import report
from leo_suite.training import layout
from leo_suite.training import run as run_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(REPO_ROOT, "runner.py")


# TensorFlow's thread pools, sized by the environment before it starts.
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def thread_settings(threads=None) -> Dict[str, str]:
  """The THREAD_VARIABLES a child run gets for `threads` (None: none, TF's
  default of one thread per core); a variable the environment already sets wins."""
  if not threads:
    return {}
  return {name: os.environ.get(name, str(int(threads))) for name in THREAD_VARIABLES}


def _run(cmd, timeout_s, threads=None):
  """Runs cmd; returns (returncode, stderr tail, peak RSS in MiB).

  threads: the child's TensorFlow intra- and inter-op pool sizes (see
  `thread_settings`).
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
             **thread_settings(threads))
  with open(os.devnull, "w") as devnull, subprocess.Popen(
      cmd, cwd=REPO_ROOT, env=env, stdout=devnull, stderr=subprocess.PIPE, text=True) as proc:
    deadline = time.time() + timeout_s
    stderr_lines = []
    for line in proc.stderr:  # drain to avoid blocking; keep a tail
      stderr_lines = (stderr_lines + [line.rstrip()])[-40:]
      if time.time() > deadline:
        proc.kill()
        break
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, stderr_lines, usage.ru_maxrss / 1024.0


def scalars(run_dir, tag) -> List[Tuple[int, float]]:
  """(step, value) of every `tag` scalar the trainer logged, in step order."""
  values = []
  for path in layout.RunDirectory(run_dir).summary_files():
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values.append((int(event.step), float(tf.make_ndarray(value.tensor))))
  return sorted(values)


def mean_steps_per_second(run_dir):
  """Mean of the train/steps_per_second scalars logged by the trainer."""
  values = [v for _, v in scalars(run_dir, "train/steps_per_second")]
  # The first window includes tracing/compilation: drop it when there are more.
  return float(np.mean(values[1:] if len(values) > 1 else values)) if values else float("nan")


def train_val_gap(run_dir, best_step: Optional[int]) -> Dict:
  """Accuracy (%) on meta-train episodes (the training batches, mean over the first
  logging window and over the window ending at or before the chosen step) beside
  meta-val accuracy at step 0 and at the chosen step: what meta-training met
  against what it was chosen on."""
  train = scalars(run_dir, "train/accuracy")
  val = dict(scalars(run_dir, "valid/accuracy"))
  if not train or not val:
    return {}
  chosen = max(0, best_step or 0)
  at_best = [v for s, v in train if s <= chosen] or [train[0][1]]
  return {"train_accuracy_first": 100 * train[0][1], "train_accuracy_chosen": 100 * at_best[-1],
          "val_accuracy_step0": 100 * val.get(0, float("nan")),
          "val_accuracy_chosen": 100 * val.get(chosen, float("nan"))}


def best_checkpoint(run: run_lib.Run) -> Dict:
  """{val_accuracy (%), best_step} of the run's best checkpoint, or {} without one."""
  best = run.best_record()
  if not best:
    return {}
  return {"val_accuracy": 100 * best["val_accuracy"], "best_step": int(best["step"])}


def run_learner(model: str, run_dir: str, flags: Sequence[str], timeout_s: float = 3600,
                log: Callable[[str], None] = print, threads: Optional[int] = None) -> Dict:
  """Trains then evaluates `model`; returns accuracy/ci95 (percent), speed, memory.

  threads: TensorFlow threads of each runner process (see `_run`); several
  runs at once on a few cores go faster with one pool each than with every
  process sizing its pools to all the cores.
  """
  command = [sys.executable, RUNNER, f"--model={model}", f"--checkpoint_path={run_dir}",
             *flags, "--evaluate_after_training"]
  started = time.time()
  code, tail, rss = _run(command, timeout_s, threads)
  # Training's own peak, logged when it ended (none: it did not end).
  peaks = [v for _, v in scalars(run_dir, "train/peak_rss_mib")] if os.path.isdir(run_dir) else []
  if code != 0:
    phase = "evaluate" if peaks else "train"
    last = next((l for l in reversed(tail) if l.strip()), "(no output)")[:240]
    log(f"{model}: {phase} failed (exit {code}): {last}")
    return {"model": model, "status": f"failed in {phase} (exit {code}): {last}"}
  peak = max(peaks or [rss])
  run = run_lib.Run.open(run_dir)
  result = run.read_result("test")
  best = best_checkpoint(run)
  return {**best, "gap": train_val_gap(run_dir, best.get("best_step")), "model": model, "accuracy": 100 * result["accuracy"], "ci95": 100 * result["ci95"],
          "num_tasks": result["num_tasks"], "steps_per_second": mean_steps_per_second(run_dir),
          "peak_rss_mib": peak, "seconds": time.time() - started,
          "baselines": {k: {"accuracy": 100 * v["accuracy"], "ci95": 100 * v["ci95"]}
                        for k, v in result.get("baselines", {}).items()}}


def _best_cell(row) -> str:
  if "val_accuracy" not in row:
    return "none (no validation)"
  return report.best_cell(row["val_accuracy"], row["best_step"])


def markdown_table(rows: List[Dict], title: Optional[str] = None) -> str:
  header = ["method", "test accuracy (%)", "95% CI", "meta-train steps/s", "peak RSS (MiB)",
            "best validation (%) @ step"]
  cells = []
  for row in rows:
    if "status" in row:
      cells.append([row["model"], row["status"], "", "", "", ""])
    else:
      cells.append([row["model"], f"{row['accuracy']:.2f}", f"{row['ci95']:.2f}",
                    f"{row['steps_per_second']:.1f}", f"{row['peak_rss_mib']:.0f}",
                    _best_cell(row)])
  baselines = {}
  for row in rows:
    baselines.update(row.get("baselines", {}))
  for name, value in baselines.items():  # identical episodes for every run
    cells.append([f"{name} (no meta-learning)", f"{value['accuracy']:.2f}",
                  f"{value['ci95']:.2f}", "-", "-", "-"])
  heading = f"**{title}**\n\n" if title else ""
  return heading + report.markdown_table(header, cells) + "\n"
