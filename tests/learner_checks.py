"""Checks shared by the learners' tests, and each learner's smallest config."""

from leo_suite.models import base
from tests import test_maml as common

# Small learners (fast steps) for the tests that run every registered learner
# (tests/test_contract.py, tests/test_serving.py); every field is one the
# learner's Config has.
SMALL_CONFIGS = {
    "leo": dict(num_latents=4, inner_unroll_length=2, finetuning_unroll_length=2),
    "maml": dict(inner_steps=2, eval_inner_steps=3),
    "imaml": dict(inner_steps=3),
    "r2d2": dict(),
    "l2f": dict(hidden_sizes="8", inner_steps=2, eval_inner_steps=3),
    "hallucination": dict(num_hallucinated=2, noise_dim=4, hidden_sizes="8"),
    "snail": dict(input_dim=8, key_sizes="8,8", value_sizes="4,4", tc_filters=8,
                  sequence_length=7),
    "protonet": dict(map_dim=8),
    "matching": dict(fce=True, map_dim=8),
    "relation": dict(map_dim=8, module_hidden_sizes="8,4"),
    "reptile": dict(hidden_sizes="8", inner_steps=2, eval_inner_steps=3),
    "meta_lstm": dict(hidden_sizes="8", inner_steps=2, lstm_units=3)}


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
