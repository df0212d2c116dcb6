"""Checks shared by the tests of the hallucination and SNAIL learners."""

from leo_suite.models import base
from tests import test_maml as common


def check_config_fields_have_help(config_cls):
  for name, default, help_text in base.config_fields(config_cls):
    assert len(help_text) > 20, name
    assert isinstance(default, (int, float, bool, str)), name


def check_meta_training_reaches_ncm(learner, tmp_path, name, steps, outer_lr, margin):
  """Trains `steps` Trainer steps on test_maml's 5-way 1-shot problem (NCM
  ~99% there: a check that the learner learns, not that it beats NCM) and
  checks it then comes within `margin` of the nearest-class-mean baseline."""
  accuracy, ncm, at_init = common.meta_train_and_score(learner, tmp_path, steps=steps,
                                                       outer_lr=outer_lr)
  print(f"{name} 5-way 1-shot: {at_init:.3f} at init, {accuracy:.3f} after {steps} "
        f"steps, NCM {ncm:.3f}")
  assert ncm > 0.5  # the problem is learnable, chance is 0.2
  assert accuracy >= ncm - margin, (accuracy, ncm, at_init)
