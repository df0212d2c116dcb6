"""Command-line flags: the release's names and defaults, plus the suite's.

Groups (as `--helpfull` lists them): LEO's release flags (data, episodes,
outer loop and checkpoints: same names and defaults), the runner's, and one
group per learner generated from that learner's `Config` dataclass
(`--<prefix><field>`, help in the paper's notation). The outer-loop flags
default to the chosen learner's reference values (its spec's outer_defaults; LEO's
are the release's). The library never reads flags: `settings()` turns them
into the plain dict a run directory stores (leo_suite/training/run.py). Every
setting (name, type, default, help) is defined in leo_suite/training/settings.py.
"""

import os

from absl import flags

from leo_suite import errors
from leo_suite.training import settings as settings_lib

RELEASE, RUNNER = settings_lib.RELEASE, settings_lib.RUNNER

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_PATH = os.path.join(REPO_ROOT, "embeddings")

_FLAG_TYPES = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
               bool: flags.DEFINE_boolean, str: flags.DEFINE_string}


def _define_flags():
  """One flag per setting of leo_suite/training/settings.py, in its group."""
  for s in settings_lib.SETTINGS:
    default = DEFAULT_DATA_PATH if s.name == "data_path" else s.default
    if s.choices:
      flags.DEFINE_enum(s.name, default, list(s.choices), s.help, module_name=s.group)
    else:
      _FLAG_TYPES[s.type](s.name, default, s.help, module_name=s.group)


_define_flags()


def _learner_group(name):
  return f"leo_suite: 3. learner {name}"


def _define_learner_flags():
  """One flag per learner Config field, named <flag_prefix><field>."""
  for name in settings_lib.learner_names():  # learner registry
    for flag, default, help_text in settings_lib.learner_flags(name):
      _FLAG_TYPES[type(default)](flag, default, help_text, module_name=_learner_group(name))


_define_learner_flags()
FLAGS = flags.FLAGS
GROUPS = [RELEASE, RUNNER] + [_learner_group(n) for n in settings_lib.learner_names()]


def apply_preset(model=None):
  """Sets the preset's values on flags the user did not give; returns their names.

  `model`: the run's learner (a saved run's, not --model's default), whose
  outer optimizer decides whether the preset's outer_lr applies.
  """
  if not FLAGS.preset:
    return []
  if FLAGS.preset not in settings_lib.PRESETS:
    raise errors.ConfigError(
        f"--preset={FLAGS.preset!r} is unknown; choose one of {sorted(settings_lib.PRESETS)}")
  applied = []
  # The presets' outer_lr values are Adam step sizes: an SGD outer loop keeps
  # its learner's rate (Reptile's is its epsilon; 1e-3 would freeze it).
  optimizer = (FLAGS.outer_optimizer or
               settings_lib.outer_defaults(model or FLAGS.model)["outer_optimizer"])
  for key, value in settings_lib.PRESETS[FLAGS.preset].items():
    if key == "outer_lr" and optimizer != "adam":
      continue
    if key in FLAGS and not FLAGS[key].present:
      FLAGS[key].value = value
      applied.append(key)
  return applied


def all_learner_flags():
  """Flag name -> the model it belongs to, for every learner."""
  return {flag: name for name in settings_lib.learner_names()
          for flag in settings_lib.learner_flag_names(name)}


def flag_names():
  """Every flag this module defines."""
  return [name for name in sorted(FLAGS) if FLAGS.find_module_defining_flag(name) in GROUPS]


def explicit_flags(preset_applied=()):
  """Names of the flags set on the command line or by the preset."""
  return sorted({n for n in flag_names() if FLAGS[n].present} | set(preset_applied))


def settings(model):
  """What the flags say a run of `model` is: flag name -> value.

  The other learners' flags and the runtime flags are left out; outer-loop
  flags left unset take the learner's defaults.
  """
  others = all_learner_flags()
  values = {n: FLAGS[n].value for n in flag_names()
            if n not in settings_lib.RUNTIME and n not in others and n != "model"
            and FLAGS[n].value is not None}
  values.update({n: FLAGS[n].value for n in settings_lib.learner_flag_names(model)})
  return settings_lib.default_settings(model, **values)
