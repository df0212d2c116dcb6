"""The Omniglot pipeline's learner presets (leo_suite/pretrain/omniglot_presets.py):
every flag they pass is one of the runner's, belongs to that learner (or to the
runner), and parses; setting and backbone entries override as documented."""

import config  # the runner's flags  # pylint: disable=unused-import
from absl import flags
import pytest

from leo_suite.models import registry
from leo_suite.models import backbones
from leo_suite.pretrain import omniglot_presets as presets

SETTINGS = ((5, 1), (5, 5), (20, 1))


def _split(flag):
  name, _, value = flag[2:].partition("=")
  return name, value


@pytest.mark.parametrize("backbone", sorted(set(presets.BACKBONE_PRESETS) | {"conv4"}))
def test_every_preset_flag_is_a_runner_flag_of_its_learner_and_parses(backbone):
  assert backbone in backbones.BACKBONES
  learner_flags = config.all_learner_flags()
  for model in registry.LEARNERS:
    for ways, shots in SETTINGS:
      preset = presets.learner_preset(model, ways, shots, backbone)
      assert preset["steps"] > 0 and 0 < preset["every"] <= preset["steps"], preset
      names = [_split(f)[0] for f in preset["flags"]]
      assert len(names) == len(set(names)), (model, ways, shots, preset["flags"])
      for flag in preset["flags"]:
        name, value = _split(flag)
        assert name in flags.FLAGS, f"{model} {ways}w{shots}s: unknown runner flag {flag}"
        assert learner_flags.get(name, model) == model, f"{flag} belongs to {learner_flags[name]}"
        flags.FLAGS[name].parser.parse(value)          # raises on a bad value


def test_setting_and_backbone_entries_replace_the_same_flag_only():
  every = presets.learner_preset("leo", 5, 1)
  five_shot = presets.learner_preset("leo", 5, 5)
  # 5w5s replaces outer_lr and keeps the every-setting fine-tuning rate.
  assert "--outer_lr=3e-4" in five_shot["flags"] and "--outer_lr=3e-3" not in five_shot["flags"]
  for preset in (every, five_shot):
    assert "--finetuning_lr_init=3.0" in preset["flags"]
  assert (five_shot["steps"], five_shot["every"]) == (200, 25)
  assert five_shot["flags"][:2] == ["--checkpoint_steps=25", "--log_steps=25"]
  # A backbone entry overrides the Conv-4 preset of that learner only.
  assert presets.learner_preset("l2f", 5, 1, "conv4_wide")["flags"].count(
      "--l2f_hidden_sizes=512") == 1
  assert "--l2f_hidden_sizes=" in presets.learner_preset("l2f", 5, 1)["flags"]
  # ... and the wide backbone keeps its own L2F (512 units, 5 steps, zero head at 5w5s).
  wide_five_shot = presets.learner_preset("l2f", 5, 5, "conv4_wide")["flags"]
  for flag in ("--l2f_hidden_sizes=512", "--l2f_eval_inner_steps=5", "--l2f_head_init=zeros",
               "--l2f_inner_lr=0.5"):
    assert flag in wide_five_shot
  assert "--l2f_head_init=proto" not in wide_five_shot
  assert presets.learner_preset("protonet", 20, 1, "conv4_wide") == presets.learner_preset(
      "protonet", 20, 1)
  assert presets.learner_preset("protonet", 5, 1) == {
      "steps": 60, "every": 10, "flags": ["--checkpoint_steps=10", "--log_steps=10"]}
