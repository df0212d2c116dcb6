"""leo_suite.report.markdown_table, the one table writer, and the Omniglot
pipeline's results table written with it (README's tables, byte for byte)."""

from leo_suite import report
from leo_suite.pipelines import omniglot
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
          {"method": "snail (runner.py)", "setting": "5w1s", "status": "skipped: slow",
           "model": "snail"}]
  assert omniglot.results_table(rows, ((5, 1), (20, 1))).splitlines() == [
      "| method | 5-way 1-shot | 20-way 1-shot |",
      "|---|---|---|",
      "| ncm_cosine (Conv-4 embeddings) | 97.13 ± 0.31 | - |",
      "| leo (runner.py) | 96.00 ± 0.20 (val 95.50 @ 20) | 88.00 ± 0.50 (no best checkpoint) |",
      "| snail (runner.py) | skipped: slow | - |"]


def test_pipeline_recipe_is_pretrain_config_with_its_overrides():
  """The pipeline's defaults: PretrainConfig's, except 30 epochs of affine augmentation."""
  defaults = pretrain_config.PretrainConfig()
  assert omniglot.RECIPE_OVERRIDES == {"epochs": 30, "augment": "affine"}
  options = omniglot.Options()
  assert (options.epochs, options.augment, options.crop) == (30, "affine", "warps")
  for name in ("backbone", "max_shift", "head", "batch_size", "learning_rate", "seed",
               "distill_alpha", "distill_temperature"):
    assert getattr(options, name) == getattr(defaults, name), name
