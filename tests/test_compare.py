"""scripts/compare.py's library: summary parsing and the table."""

import os
import sys

import pytest
import tensorflow as tf

from leo_suite.training import compare


def test_mean_steps_per_second_skips_the_compile_window(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path / "summaries"))
  with writer.as_default():
    for step, value in enumerate([1.0, 10.0, 20.0], start=1):
      tf.summary.scalar("train/steps_per_second", value, step=step)
      tf.summary.scalar("train/loss", 99.0, step=step)
  writer.flush()
  assert compare.mean_steps_per_second(str(tmp_path)) == pytest.approx(15.0)


def test_markdown_table_rows_and_failures():
  rows = [{"model": "leo", "accuracy": 91.456, "ci95": 0.3, "steps_per_second": 12.34,
           "peak_rss_mib": 900.2, "baselines": {"ncm": {"accuracy": 49.7, "ci95": 0.4}}},
          {"model": "maml", "status": "failed in train (exit 2): error: x"}]
  table = compare.markdown_table(rows, "t")
  assert "| leo | 91.46 | 0.30 | 12.3 | 900 |" in table
  assert "| maml | failed in train (exit 2): error: x |" in table
  assert "| ncm (no meta-learning) | 49.70 | 0.40 | - | - |" in table


def test_run_learner_reports_a_clear_failure(tmp_path):
  row = compare.run_learner("leo", str(tmp_path / "run"),
                            [f"--data_path={tmp_path}", "--dataset_name=missing"], timeout_s=300,
                            log=lambda _: None)
  assert row["status"].startswith("failed in train (exit 2): error:")
  assert "missing" in row["status"]


@pytest.mark.parametrize("threads, preset, expected", [
    (1, None, "1 1"), (3, None, "3 3"), (None, None, "unset unset"),
    (1, "2", "2 1")])  # a variable the caller already set wins
def test_runs_get_the_requested_tensorflow_threads(monkeypatch, threads, preset, expected):
  for name in compare.THREAD_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  if preset is not None:
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", preset)
  show = ("import os, sys; sys.stderr.write(' '.join(os.environ.get(n, 'unset') "
          f"for n in {compare.THREAD_VARIABLES!r}))")
  code, tail, _ = compare._run([sys.executable, "-c", show], 60, threads)
  assert (code, tail) == (0, [expected])
