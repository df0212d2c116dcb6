"""Name -> learner module. Adding a learner is one file plus one line here.

Each learner module defines:
  FLAG_PREFIX: prefix of its command-line flags ("" for LEO's release names);
  Config: a frozen dataclass whose fields carry `metadata={"help": ...}`;
          config.py turns every field into a flag `--<FLAG_PREFIX><field>`;
          `Config.validate()` raises errors.ConfigError naming the flag;
  OUTER_DEFAULTS: the learner's outer-loop defaults, a dict of fields of
          leo_suite.training.optim.OuterConfig (its reference code's chain);
  EVAL_FIELDS: Config fields that only change evaluation (e.g. the number of
          inner steps at test time), which evaluation may override;
  build(config, num_ways, embedding_dim, dtype) -> base.Learner.
"""

import importlib

LEARNERS = {
    "leo": "leo_suite.models.leo",
    "maml": "leo_suite.models.maml",
    "imaml": "leo_suite.models.imaml",
    "r2d2": "leo_suite.models.r2d2",
    "l2f": "leo_suite.models.l2f",
    "protonet": "leo_suite.models.protonet",
    "matching": "leo_suite.models.matching",
    "relation": "leo_suite.models.relation",
    "reptile": "leo_suite.models.reptile",
    "meta_lstm": "leo_suite.models.meta_lstm",
    "hallucination": "leo_suite.models.hallucination",
    "snail": "leo_suite.models.snail",
}


def learner_module(name):
  if name not in LEARNERS:
    raise KeyError(f"unknown model {name!r}; choose one of {sorted(LEARNERS)}")
  return importlib.import_module(LEARNERS[name])


def available():
  """Names whose module can be imported (all, once every learner exists)."""
  names = []
  for name in LEARNERS:
    try:
      learner_module(name)
    except ModuleNotFoundError:
      continue
    names.append(name)
  return names


def build(name, config, num_ways, embedding_dim, dtype="float32"):
  """Validates `config` (ConfigError naming the flag) and builds the learner."""
  config.validate()
  return learner_module(name).build(config, num_ways, embedding_dim, dtype)
