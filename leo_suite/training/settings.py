"""Every run setting, defined once: name, type, default, check, help, and
whether a later command may change it.

config.py turns `SETTINGS` into absl flags, `trainer.TrainConfig` takes its
defaults from `DEFAULTS`, and a run directory's config.json stores what
`default_settings` / config.settings() resolve (leo_suite/training/run.py).
A learner's own settings come from its Config dataclass (`--<prefix><field>`)
and the outer loop's defaults from its spec's outer_defaults: the few functions
marked "learner registry" below are the only ones that read the registry.
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from leo_suite import errors
from leo_suite import safeio
from leo_suite.models import base
from leo_suite.models import registry
from leo_suite.training import optim

RELEASE = "leo_suite: 1. LEO release flags"
RUNNER = "leo_suite: 2. runner"
# The release's tuned hyper-parameters (LEO README), and the demo's.
PRESETS = {
    "demo": dict(dataset_name="synthetic", num_steps_limit=1500, checkpoint_steps=500,
                 outer_lr=1e-3, num_val_batches=2, metavalid_batch_size=100,
                 num_test_tasks=1000, metatest_batch_size=100, log_steps=100),
    "mini_1shot": dict(dataset_name="miniImageNet", num_tr_examples_per_class=1,
                       outer_lr=2.739e-4, l2_penalty_weight=3.623e-10,
                       orthogonality_penalty_weight=0.188103, dropout_rate=0.307651,
                       kl_weight=0.756143, encoder_penalty_weight=5.757e-6),
    "mini_5shot": dict(dataset_name="miniImageNet", num_tr_examples_per_class=5,
                       outer_lr=4.102e-4, l2_penalty_weight=8.540e-9,
                       orthogonality_penalty_weight=1.523e-3, dropout_rate=0.300299,
                       kl_weight=0.466387, encoder_penalty_weight=2.661e-7),
    "tiered_1shot": dict(dataset_name="tieredImageNet", num_tr_examples_per_class=1,
                         outer_lr=8.659e-4, l2_penalty_weight=4.148e-10,
                         orthogonality_penalty_weight=5.451e-3, dropout_rate=0.475126,
                         kl_weight=2.034e-3, encoder_penalty_weight=8.302e-5),
    "tiered_5shot": dict(dataset_name="tieredImageNet", num_tr_examples_per_class=5,
                         outer_lr=6.110e-4, l2_penalty_weight=1.690e-10,
                         orthogonality_penalty_weight=2.481e-2, dropout_rate=0.415158,
                         kl_weight=1.622811, encoder_penalty_weight=2.672e-5),
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting. `free`: may differ between the commands of a run (resume,
  evaluation); `eval_override`: evaluation may override it (recorded);
  `stored`: False for where a command runs, not what the run is (never in
  config.json); `outer`: its optim.OuterConfig field; `minimum`: checked."""
  name: str
  type: type
  default: object
  help: str
  group: str = RUNNER
  choices: Optional[Tuple[str, ...]] = None
  minimum: Optional[int] = None
  free: bool = False
  eval_override: bool = False
  stored: bool = True
  outer: Optional[str] = None


def _release(*args, **kwargs):
  return Setting(*args, group=RELEASE, **kwargs)


SETTINGS: Tuple[Setting, ...] = (
    # -- LEO's release flags: data --------------------------------------------------
    _release("data_path", str, None,  # default: config.DEFAULT_DATA_PATH
             "Root of the embeddings: <data_path>/<dataset_name>/<embedding_crop>/"
             "<split>_embeddings.pkl (or .npz). An existing run uses the path it was trained "
             "with unless given (then the files' sha256 must match).", stored=False),
    _release("dataset_name", str, "miniImageNet",
             "miniImageNet, tieredImageNet (LEO's release), 'synthetic' (the embedded default, "
             "generated on first use) or any dataset directory under data_path."),
    _release("embedding_crop", str, "center",
             "Which embeddings: center crop or multiview (miniImageNet only in the release); "
             "warps: the center view averaged with 15 fixed affine warps (this suite's "
             "extraction, for characters; leo_suite/pretrain/extract.py).",
             choices=("center", "multiview", "warps")),
    _release("train_on_val", bool, False,
             "Meta-train on train + val classes (as the paper's final runs); validation still "
             "runs on val but is not held out, so no best/ checkpoint is kept."),
    Setting("metatrain_views", int, 0,
            "Meta-train on fresh views: each training image appears in each task as the "
            "mean of this many of its stored views, drawn per task (needs "
            "<split>_views.npz beside train's file: extraction's --view_splits=train). "
            "0 = the averaged rows. Validation and test always use the averaged rows.",
            minimum=0),
    # -- LEO's release flags: episodes ----------------------------------------------
    _release("num_classes", int, 5, "N: classes per task (N-way).", minimum=1),
    _release("num_tr_examples_per_class", int, 1, "K: support examples per class.", minimum=1),
    _release("num_val_examples_per_class", int, 15,
             "V: query examples per class in meta-training.", minimum=1),
    _release("metatrain_batch_size", int, 12, "Tasks per meta-training step.", minimum=1),
    _release("metavalid_batch_size", int, 200, "Tasks per meta-validation batch.", minimum=1),
    _release("metatest_batch_size", int, 200, "Tasks per meta-test batch.", minimum=1,
             free=True),
    # -- LEO's release flags: outer loop and checkpoints -------------------------------
    _release("num_steps_limit", int, 100000, "Meta-training steps.", minimum=1, free=True),
    _release("outer_lr", float, None,
             "Learning rate of the outer loop (default: the learner's; LEO 1e-4 as the "
             "release).", outer="learning_rate"),
    _release("gradient_threshold", float, None,
             "Clip each meta-gradient element to +-this, 0 = off (default: the learner's; "
             "LEO 0.1).", outer="clip_value"),
    _release("gradient_norm_threshold", float, None,
             "Then clip each meta-gradient tensor to this norm, 0 = off (default: the "
             "learner's; LEO 0.1).", outer="clip_norm"),
    _release("checkpoint_path", str, "/tmp/leo",
             "Run directory: config.json (the run's settings), checkpoints, best/, results.",
             stored=False),
    _release("checkpoint_steps", int, 1000, "Validate and checkpoint every this many steps.",
             minimum=1),
    _release("evaluation_mode", bool, False,
             "Evaluate the best (else latest) checkpoint of --checkpoint_path on the test "
             "split, with the settings the run was trained with.", stored=False),
    # -- the runner's flags -------------------------------------------------------------
    Setting("evaluate_after_training", bool, False,
            "When training ends at --num_steps_limit, go on as --evaluation_mode does, in "
            "the same process (one start-up instead of two).", stored=False),
    Setting("model", str, "leo", "Which meta-learner.",
            choices=tuple(sorted(registry.LEARNERS))),  # learner registry
    Setting("preset", str, "", "Named hyper-parameters, overridden by explicit flags: " +
            ", ".join(PRESETS) + "."),
    Setting("seed", int, 0, "Seed of initialisation, training episodes, dropout and "
            "sampling."),
    Setting("eval_seed", int, 1, "Seed of the fixed validation/test episode sets.",
            eval_override=True),
    Setting("num_val_batches", int, 10, "Validation = mean over this many metavalid "
            "batches.", minimum=1),
    Setting("num_test_tasks", int, 10000, "Test tasks in evaluation mode.", minimum=1,
            free=True),
    Setting("eval_num_query", int, 0,
            "V at validation/test; 0 = all remaining images of each class (the release: "
            "images_per_class - K, using the smallest class of the split).", minimum=0,
            eval_override=True),
    Setting("dtype", str, "float32", "Floating-point type of the model.",
            choices=("float32", "float64")),
    Setting("deterministic", bool, False,
            "Enable TF op determinism: same seed, same result, bit for bit (slower).",
            free=True),
    Setting("jit_compile", str, "auto",
            "Compile the meta-training step (and evaluation's adaptation) with XLA: 'auto' "
            "does for the learners whose XLA step measured faster at 1 and 5 shots "
            "(their spec's xla_default, from scripts/benchmark.py: leo, maml, imaml, l2f, "
            "protonet, meta_lstm, hallucination, snail); a graph XLA cannot compile falls "
            "back to plain TF with one log line.", choices=("auto", "true", "false"), free=True),
    Setting("evaluation_method", str, "auto",
            "How validation/test tasks are scored (same accuracies): 'table' reads only the "
            "support sets per task and scores each class's images once per group of tasks; "
            "'gather' copies every task's query set; 'auto' takes the table when the queries "
            "are at least half of an average class (e.g. V = all remaining) and one replica "
            "scores.", choices=("auto", "table", "gather"), free=True),
    Setting("distribution_strategy", str, "default",
            "default: one device; mirrored: all local GPUs (or --devices, or "
            "--num_cpu_devices logical CPUs); multi_worker: MultiWorkerMirroredStrategy from "
            "TF_CONFIG. The meta-batch is split over replicas (must divide evenly).",
            choices=("default", "mirrored", "multi_worker"), stored=False),
    Setting("devices", str, "",
            "With --distribution_strategy=mirrored: comma list of devices, e.g. "
            "/gpu:0,/gpu:1 or /cpu:0,/cpu:1 ('' = all local GPUs, else CPUs).", stored=False),
    Setting("num_cpu_devices", int, 0,
            "Split the CPU into this many logical devices /cpu:0.. (0 = leave as is); for "
            "testing mirrored on a machine without GPUs.", stored=False),
    Setting("baselines", str, "ncm",
            "Comma list of non-learned baselines scored on the same test episodes in "
            "evaluation mode: ncm (nearest class mean, cosine), logreg (per-episode logistic "
            "regression); empty for none.", free=True),
    Setting("log_steps", int, 100, "Log and write summaries every this many steps.",
            minimum=1, free=True),
    Setting("profile_steps", str, "",
            "A,B: record a TensorBoard profile (tf.profiler) of meta-training steps A to B "
            "into <checkpoint_path>/profile/; empty = off. May change between commands of a "
            "run.", free=True),
    Setting("outer_optimizer", str, None,
            "Outer optimizer (default: the learner's; adam for all five).",
            choices=tuple(optim.OPTIMIZERS), outer="optimizer"),
    Setting("adam_epsilon", float, None,
            "Adam's epsilon (default: the learner's reference: 1e-8, iMAML's imaml_dev 1e-3).",
            outer="adam_epsilon"),
    Setting("nan_guard", str, "skip",
            "A step whose loss or gradient is not finite: 'skip' leaves every variable and "
            "optimizer slot unchanged (counted in the log and TensorBoard); 'release' feeds "
            "the variables to clipping and Adam as LEO's release does.",
            choices=tuple(optim.NAN_GUARDS), outer="nan_guard"),
    Setting("allow_data_change", bool, False,
            "Accept embeddings whose sha256 differ from those the run was trained with "
            "(recorded in results).", stored=False),
)
BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}
# Where to run, not what the run is: never stored in config.json.
RUNTIME = tuple(s.name for s in SETTINGS if not s.stored)
# Settings that never change what a run is: they may differ between the
# command that created a run and a later one (resume, evaluation).
FREE_SETTINGS = tuple(s.name for s in SETTINGS if s.free)
# Settings evaluation may override (recorded as overrides in the result);
# each learner adds its spec's eval_fields (prefixed flag names).
EVAL_SETTINGS = tuple(s.name for s in SETTINGS if s.eval_override)
# Outer-loop settings: flag name -> optim.OuterConfig field.
OUTER_FLAGS = {s.name: s.outer for s in SETTINGS if s.outer}
# Every setting but the learner's own and the outer loop's, at its default
# (LEO's release defaults where the release has the flag).
DEFAULTS = {s.name: s.default for s in SETTINGS
            if s.stored and not s.outer and s.name != "model"}


# -- the learner's and the outer loop's settings (learner registry) --------------------
def learner_names():
  return registry.available()  # learner registry


def learner_flag_names(model: str) -> Dict[str, str]:
  """Flag name -> Config field of `model`'s learner flags."""
  spec = registry.spec(model)  # learner registry
  return {spec.flag_prefix + f.name: f.name for f in dataclasses.fields(spec.config_class)}


def learner_flags(model: str):
  """(flag name, default, help) of `model`'s learner flags."""
  spec = registry.spec(model)  # learner registry
  return [(spec.flag_prefix + field, default, help_text or field)
          for field, default, help_text in base.config_fields(spec.config_class)]


def learner_config(model: str, settings: dict):
  """`model`'s Config from the settings' learner flags."""
  return registry.spec(model).config_class(**{  # learner registry
      field: settings[flag] for flag, field in learner_flag_names(model).items()})


def with_earlier_defaults(settings: dict) -> dict:
  """A saved run's settings with the learner fields added since it was saved
  filled in with the values it trained with (the spec's earlier_defaults)."""
  model = settings.get("model")
  if model not in registry.LEARNERS:  # learner registry
    return settings
  flags = {field: flag for flag, field in learner_flag_names(model).items()}
  missing = {flags[field]: value for field, value in
             registry.spec(model).earlier_defaults.items() if flags[field] not in settings}
  return dict(settings, **missing) if missing else settings


def eval_overridable(model: str):
  """Settings evaluation may override for `model`."""
  spec = registry.spec(model)  # learner registry
  return set(EVAL_SETTINGS) | {spec.flag_prefix + f for f in spec.eval_fields}


def outer_defaults(model: str) -> dict:
  """The learner's outer-loop defaults as flag name -> value."""
  config = optim.OuterConfig(**registry.spec(model).outer_defaults)  # registry
  return {flag: getattr(config, field) for flag, field in OUTER_FLAGS.items()}


def outer_config(settings: dict) -> optim.OuterConfig:
  return optim.OuterConfig(**{field: settings[flag] for flag, field in OUTER_FLAGS.items()})


def default_settings(model: str, learner_config=None, **values) -> dict:
  """A complete settings dict without flags (for scripts and tests).

  `learner_config` (default: the learner's Config()) gives the learner's
  settings, the learner spec's outer_defaults the outer loop's; `values` override
  any of them by flag name.
  """
  learner_config = learner_config or registry.spec(model).config_class()  # registry
  settings = dict(DEFAULTS, model=model, **outer_defaults(model))
  settings.update({flag: getattr(learner_config, field)
                   for flag, field in learner_flag_names(model).items()})
  unknown = sorted(set(values) - set(settings))
  if unknown:
    raise errors.ConfigError(f"unknown settings {unknown} for --model={model}")
  settings.update(values)
  return settings


# -- checks ----------------------------------------------------------------------------
def parse_profile_steps(text: str) -> Optional[Tuple[int, int]]:
  """--profile_steps 'A,B' -> (A, B) (1 <= A <= B); '' -> None (off)."""
  if not text:
    return None
  try:
    first, last = [int(part) for part in text.split(",")]
  except ValueError:  # not two integers
    first, last = 0, -1
  if not 1 <= first <= last:
    raise errors.ConfigError(
        f"--profile_steps={text!r}: expected A,B with integers 1 <= A <= B (profile "
        "steps A to B, e.g. --profile_steps=10,15); empty = off")
  return first, last


def check(settings: dict, baselines: Sequence[str]):
  """ConfigError for a value out of its range; `baselines`: the known names.

  --dataset_name and --embedding_crop become folder names: each must be one
  path component (safeio.check_name), checked before anything is read.
  """
  for name in ("dataset_name", "embedding_crop"):
    safeio.check_name(settings[name], f"--{name}", errors.ConfigError)
  for s in SETTINGS:
    if s.minimum is not None and settings[s.name] < s.minimum:
      bound = "at least 1" if s.minimum == 1 else f">= {s.minimum}"
      raise errors.ConfigError(f"--{s.name}={settings[s.name]}: must be {bound}")
  parse_profile_steps(settings.get("profile_steps", ""))  # ConfigError if bad
  unknown = [b for b in baseline_names(settings) if b not in baselines]
  if unknown:
    raise errors.ConfigError(f"--baselines: unknown {unknown}; choose from {sorted(baselines)}")


def baseline_names(settings: dict):
  return [b for b in settings["baselines"].split(",") if b]


def shorten(value, limit=200):
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "...'"


def resolve(saved: Optional[dict], given: dict, explicit: Sequence[str],
            evaluation: bool) -> Tuple[dict, dict]:
  """The settings a command runs with, and the overrides it applies.

  saved: the run's settings (None for a new run); given: every setting as
  the command's flags have it (defaults included); explicit: the names the
  user set (on the command line or through a preset). A new run takes
  `given`. An existing run takes its saved settings; an explicit value that
  differs is applied when the setting is free (or, in evaluation, one
  evaluation may override) and recorded as an override; any other is
  refused, naming every conflicting flag with its saved and given values.
  """
  if saved is None:
    return dict(given), {}
  model = saved["model"]
  overridable = set(FREE_SETTINGS) | (eval_overridable(model) if evaluation else set())
  settings, overrides, conflicts = dict(saved), {}, []
  for name in explicit:
    if name not in given or given[name] == saved.get(name):
      continue
    if name in overridable:
      settings[name] = given[name]
      overrides[name] = {"saved": saved.get(name), "used": given[name]}
    elif name in saved or name == "model":
      conflicts.append(f"--{name}: saved {shorten(saved.get(name))}, given "
                       f"{shorten(given[name])}")
    else:
      conflicts.append(f"--{name} does not apply to this run (--model={model})")
  if conflicts:
    mode = "evaluate" if evaluation else "resume"
    raise errors.ConfigError(
        f"the run's config.json disagrees with the flags given: {'; '.join(conflicts)}. "
        f"To {mode} this run pass only --checkpoint_path (and flags that may change: "
        f"{', '.join(sorted(overridable))}); to train something else use a new "
        "--checkpoint_path")
  return settings, overrides


def check_learner_flags(model: str, explicit: Sequence[str], all_learner_flags: Dict[str, str]):
  """Refuses explicit flags of another learner (they would silently do nothing)."""
  own = learner_flag_names(model)
  foreign = [n for n in explicit if n in all_learner_flags and n not in own]
  if foreign:
    raise errors.ConfigError(
        f"{', '.join('--' + n for n in foreign)} "
        f"appl{'ies' if len(foreign) == 1 else 'y'} to --model="
        f"{all_learner_flags[foreign[0]]}, not to --model={model}; remove "
        f"{'it' if len(foreign) == 1 else 'them'}")
