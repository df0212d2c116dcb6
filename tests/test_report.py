"""leo_suite.report.markdown_table, the one table writer, the Omniglot
pipeline's results table written with it (README's tables, byte for byte),
and the marks every table gives an untrained learner (best checkpoint at step 0)."""

from leo_suite import report
from leo_suite.pipelines import omniglot
from leo_suite.pipelines import results
from leo_suite.pretrain import pretrain_config


def test_markdown_table_cells_rule_and_empty_cells():
  assert report.markdown_table(["a", "b c"], [["1", ""], ["x", "y"]]) == (
      "| a | b c |\n| --- | --- |\n| 1 | |\n| x | y |")
  assert report.markdown_table(["m", "5-way 1-shot"], [], rule="---") == (
      "| m | 5-way 1-shot |\n|---|---|")


def test_omniglot_results_table():
  rows = [{"method": "ncm_cosine (Conv-4 embeddings)", "setting": "5w1s", "accuracy": 97.126,
           "ci95": 0.314},
          {"method": "leo (runner.py)", "setting": "5w1s", "accuracy": 96.0, "ci95": 0.2,
           "best_step": 20, "val_accuracy": 95.5, "model": "leo"},
          {"method": "leo (runner.py)", "setting": "20w1s", "accuracy": 88.0, "ci95": 0.5,
           "model": "leo"},
          {"method": "maml (runner.py)", "setting": "5w1s", "accuracy": 97.1, "ci95": 0.3,
           "best_step": 0, "val_accuracy": 97.38, "model": "maml"},
          {"method": "snail (runner.py)", "setting": "5w1s", "status": "skipped: slow",
           "model": "snail"}]
  assert results.results_table(rows, ((5, 1), (20, 1))).splitlines() == [
      "| method | 5-way 1-shot | 20-way 1-shot |",
      "|---|---|---|",
      "| ncm_cosine (Conv-4 embeddings) | 97.13 ± 0.31 | - |",
      "| leo (runner.py) | 96.00 ± 0.20 (val 95.50 @ 20) | 88.00 ± 0.50 (no best checkpoint) |",
      "| maml (runner.py) | 97.10 ± 0.30 (val 97.38 @ 0, untrained) | - |",
      "| snail (runner.py) | skipped: slow | - |"]
  # 96.00 is below 97.13 by 1.13 > 0.20 + 0.31; 97.10 is within 0.03 < 0.61 of it.
  assert results.against_baseline(rows, "ncm_cosine (Conv-4 embeddings)", ((5, 1), (20, 1))) == (
      "Learners against ncm_cosine (Conv-4 embeddings), by more than both 95% intervals: "
      "5w1s 0 above, 1 below, 1 untrained of 2.")


def test_separated_needs_a_gap_larger_than_both_intervals():
  assert report.separated(98.0, 0.3, 97.0, 0.3) == 1       # gap 1.0 > 0.6
  assert report.separated(97.5, 0.3, 97.0, 0.3) == 0       # gap 0.5 < 0.6
  assert report.separated(97.0, 0.3, 97.61, 0.3) == -1     # gap 0.61 > 0.6
  assert report.separated(97.0, 0.3, 97.6, 0.3001) == 0    # gap 0.6 < 0.6001


def test_untrained_is_step_zero_only():
  assert report.untrained(0) and not report.untrained(10) and not report.untrained(None)
  assert report.best_cell(97.384, 0) == "97.38 @ 0, untrained"
  assert report.best_cell(97.5, 250) == "97.50 @ 250"


def test_pipeline_recipe_is_pretrain_config_with_its_overrides():
  """The pipeline's defaults: PretrainConfig's, except 30 epochs of affine augmentation."""
  defaults = pretrain_config.PretrainConfig()
  assert omniglot.RECIPE_OVERRIDES == {"epochs": 30, "augment": "affine"}
  options = omniglot.Options()
  assert (options.epochs, options.augment, options.crop) == (30, "affine", "warps")
  for name in ("backbone", "max_shift", "head", "batch_size", "learning_rate", "seed",
               "distill_alpha", "distill_temperature"):
    assert getattr(options, name) == getattr(defaults, name), name
