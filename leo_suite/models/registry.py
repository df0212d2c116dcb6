"""Name -> learner. Adding a learner is one file (ending in its
`SPEC = base.LearnerSpec(...)`) plus one line here.

Modules are imported on first use, so a learner that builds another
(hallucination's base learner) can look it up here.
"""

import importlib

from leo_suite.models import base

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


def spec(name) -> base.LearnerSpec:
  """The `LearnerSpec` of learner `name` (KeyError naming the choices)."""
  if name not in LEARNERS:
    raise KeyError(f"unknown model {name!r}; choose one of {sorted(LEARNERS)}")
  return importlib.import_module(LEARNERS[name]).SPEC


def available():
  """Names whose module can be imported (all, once every learner exists)."""
  names = []
  for name in LEARNERS:
    try:
      spec(name)
    except ModuleNotFoundError:
      continue
    names.append(name)
  return names


def build(name, config, num_ways, embedding_dim, dtype="float32"):
  """Validates `config` (ConfigError naming the flag) and builds the learner."""
  config.validate()
  return spec(name).build(config, num_ways, embedding_dim, dtype)
