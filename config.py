"""Command-line flags: the release's names and defaults, plus the suite's.

Groups (as `--helpfull` lists them): LEO's release flags (data, episodes,
outer loop and checkpoints: same names and defaults), the runner's, and one
group per learner generated from that learner's `Config` dataclass
(`--<prefix><field>`, help in the paper's notation). The outer-loop flags
default to the chosen learner's reference values (its spec's outer_defaults; LEO's
are the release's). The library never reads flags: `settings()` turns them
into the plain dict a run directory stores (leo_suite/training/run.py).
"""

import os

from absl import flags

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import registry
from leo_suite.training import optim
from leo_suite.training import run as run_lib

_D = run_lib.DEFAULTS
RELEASE = "leo_suite: 1. LEO release flags"
RUNNER = "leo_suite: 2. runner"

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_PATH = os.path.join(REPO_ROOT, "embeddings")

def _flag(define, name, help_text, *args, group=RUNNER, default=None):
  """Defines --name (default from run.DEFAULTS, else `default`) in `group`.

  `args` come between the default and the help (DEFINE_enum's values).
  """
  define(name, _D.get(name, default), *args, help_text, module_name=group)


def _release(define, name, help_text, *args, default=None):
  _flag(define, name, help_text, *args, group=RELEASE, default=default)


# -- LEO's release flags: data ------------------------------------------------------
_release(flags.DEFINE_string, "data_path",
         "Root of the embeddings: <data_path>/<dataset_name>/<embedding_crop>/"
         "<split>_embeddings.pkl (or .npz). An existing run uses the path it was trained "
         "with unless given (then the files' sha256 must match).", default=DEFAULT_DATA_PATH)
_release(flags.DEFINE_string, "dataset_name",
         "miniImageNet, tieredImageNet (LEO's release), 'synthetic' (the embedded default, "
         "generated on first use) or any dataset directory under data_path.")
_release(flags.DEFINE_enum, "embedding_crop",
         "Which embeddings: center crop or multiview (miniImageNet only in the release); "
         "warps: the center view averaged with 15 fixed affine warps (this suite's "
         "extraction, for characters; leo_suite/pretrain/extract.py).",
         ["center", "multiview", "warps"])
_release(flags.DEFINE_boolean, "train_on_val",
         "Meta-train on train + val classes (as the paper's final runs); validation still "
         "runs on val but is not held out, so no best/ checkpoint is kept.")
# -- LEO's release flags: episodes --------------------------------------------------
_release(flags.DEFINE_integer, "num_classes", "N: classes per task (N-way).")
_release(flags.DEFINE_integer, "num_tr_examples_per_class", "K: support examples per class.")
_release(flags.DEFINE_integer, "num_val_examples_per_class",
         "V: query examples per class in meta-training.")
_release(flags.DEFINE_integer, "metatrain_batch_size", "Tasks per meta-training step.")
_release(flags.DEFINE_integer, "metavalid_batch_size", "Tasks per meta-validation batch.")
_release(flags.DEFINE_integer, "metatest_batch_size", "Tasks per meta-test batch.")
# -- LEO's release flags: outer loop and checkpoints -----------------------------------
_release(flags.DEFINE_integer, "num_steps_limit", "Meta-training steps.")
_release(flags.DEFINE_float, "outer_lr",
         "Learning rate of the outer loop (default: the learner's; LEO 1e-4 as the release).")
_release(flags.DEFINE_float, "gradient_threshold",
         "Clip each meta-gradient element to +-this, 0 = off (default: the learner's; LEO 0.1).")
_release(flags.DEFINE_float, "gradient_norm_threshold",
         "Then clip each meta-gradient tensor to this norm, 0 = off (default: the learner's; "
         "LEO 0.1).")
_release(flags.DEFINE_string, "checkpoint_path",
         "Run directory: config.json (the run's settings), checkpoints, best/, results.",
         default="/tmp/leo")
_release(flags.DEFINE_integer, "checkpoint_steps", "Validate and checkpoint every this many steps.")
_release(flags.DEFINE_boolean, "evaluation_mode",
         "Evaluate the best (else latest) checkpoint of --checkpoint_path on the test split, "
         "with the settings the run was trained with.", default=False)

# -- the runner's flags ---------------------------------------------------------------
_flag(flags.DEFINE_enum, "model", "Which meta-learner.", sorted(registry.LEARNERS),
      default="leo")
_flag(flags.DEFINE_string, "preset", "Named hyper-parameters, overridden by explicit flags: " +
      ", ".join(["demo", "mini_1shot", "mini_5shot", "tiered_1shot", "tiered_5shot"]) + ".")
_flag(flags.DEFINE_integer, "seed", "Seed of initialisation, training episodes, dropout and "
      "sampling.")
_flag(flags.DEFINE_integer, "eval_seed", "Seed of the fixed validation/test episode sets.")
_flag(flags.DEFINE_integer, "num_val_batches", "Validation = mean over this many metavalid "
      "batches.")
_flag(flags.DEFINE_integer, "num_test_tasks", "Test tasks in evaluation mode.")
_flag(flags.DEFINE_integer, "eval_num_query",
      "V at validation/test; 0 = all remaining images of each class (the release: "
      "images_per_class - K, using the smallest class of the split).")
_flag(flags.DEFINE_enum, "dtype", "Floating-point type of the model.", ["float32", "float64"])
_flag(flags.DEFINE_boolean, "deterministic",
      "Enable TF op determinism: same seed, same result, bit for bit (slower).")
_flag(flags.DEFINE_enum, "jit_compile",
      "Compile the meta-training step (and evaluation's adaptation) with XLA: 'auto' "
      "does for the learners whose XLA step measured faster at 1 and 5 shots "
      "(scripts/benchmark.py: leo, maml, imaml, l2f, protonet, meta_lstm, hallucination, "
      "snail); a graph XLA cannot compile falls back to plain "
      "TF with one log line.", ["auto", "true", "false"])
_flag(flags.DEFINE_enum, "evaluation_method",
      "How validation/test tasks are scored (same accuracies): 'table' reads only the "
      "support sets per task and scores each class's images once per group of tasks; "
      "'gather' copies every task's query set; 'auto' takes the table when the queries "
      "are at least half of an average class (e.g. V = all remaining) and one replica "
      "scores.", ["auto", "table", "gather"])
_flag(flags.DEFINE_enum, "distribution_strategy",
      "default: one device; mirrored: all local GPUs (or --devices, or --num_cpu_devices "
      "logical CPUs); multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG. The "
      "meta-batch is split over replicas (must divide evenly).",
      ["default", "mirrored", "multi_worker"], default="default")
_flag(flags.DEFINE_string, "devices",
      "With --distribution_strategy=mirrored: comma list of devices, e.g. /gpu:0,/gpu:1 or "
      "/cpu:0,/cpu:1 ('' = all local GPUs, else CPUs).", default="")
_flag(flags.DEFINE_integer, "num_cpu_devices",
      "Split the CPU into this many logical devices /cpu:0.. (0 = leave as is); for "
      "testing mirrored on a machine without GPUs.", default=0)
_flag(flags.DEFINE_string, "baselines",
      "Comma list of non-learned baselines scored on the same test episodes in evaluation "
      "mode: ncm (nearest class mean, cosine), logreg (per-episode logistic regression); "
      "empty for none.")
_flag(flags.DEFINE_integer, "log_steps", "Log and write summaries every this many steps.")
_flag(flags.DEFINE_string, "profile_steps",
      "A,B: record a TensorBoard profile (tf.profiler) of meta-training steps A to B into "
      "<checkpoint_path>/profile/; empty = off. May change between commands of a run.")
_flag(flags.DEFINE_enum, "outer_optimizer",
      "Outer optimizer (default: the learner's; adam for all five).", list(optim.OPTIMIZERS))
_flag(flags.DEFINE_float, "adam_epsilon",
      "Adam's epsilon (default: the learner's reference: 1e-8, iMAML's imaml_dev 1e-3).")
_flag(flags.DEFINE_enum, "nan_guard",
      "A step whose loss or gradient is not finite: 'skip' leaves every variable and "
      "optimizer slot unchanged (counted in the log and TensorBoard); 'release' feeds the "
      "variables to clipping and Adam as LEO's release does.", list(optim.NAN_GUARDS),
      default="skip")
_flag(flags.DEFINE_boolean, "allow_data_change",
      "Accept embeddings whose sha256 differ from those the run was trained with "
      "(recorded in results).", default=False)

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

_FLAG_TYPES = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
               bool: flags.DEFINE_boolean, str: flags.DEFINE_string}


def _learner_group(name):
  return f"leo_suite: 3. learner {name}"


def _define_learner_flags():
  """One flag per learner Config field, named <flag_prefix><field>."""
  for name in registry.available():
    spec = registry.spec(name)
    for field, default, help_text in base.config_fields(spec.config_class):
      _FLAG_TYPES[type(default)](spec.flag_prefix + field, default, help_text or field,
                                 module_name=_learner_group(name))


_define_learner_flags()
FLAGS = flags.FLAGS
GROUPS = [RELEASE, RUNNER] + [_learner_group(n) for n in registry.available()]
# Where to run, not what the run is: never stored in config.json.
RUNTIME_FLAGS = ("checkpoint_path", "evaluation_mode", "data_path", "allow_data_change",
                 "distribution_strategy", "devices", "num_cpu_devices")


def apply_preset(model=None):
  """Sets the preset's values on flags the user did not give; returns their names.

  `model`: the run's learner (a saved run's, not --model's default), whose
  outer optimizer decides whether the preset's outer_lr applies.
  """
  if not FLAGS.preset:
    return []
  if FLAGS.preset not in PRESETS:
    raise errors.ConfigError(f"--preset={FLAGS.preset!r} is unknown; choose one of {sorted(PRESETS)}")
  applied = []
  # The presets' outer_lr values are Adam step sizes: an SGD outer loop keeps
  # its learner's rate (Reptile's is its epsilon; 1e-3 would freeze it).
  optimizer = (FLAGS.outer_optimizer or
               run_lib.outer_defaults(model or FLAGS.model)["outer_optimizer"])
  for key, value in PRESETS[FLAGS.preset].items():
    if key == "outer_lr" and optimizer != "adam":
      continue
    if key in FLAGS and not FLAGS[key].present:
      FLAGS[key].value = value
      applied.append(key)
  return applied


def all_learner_flags():
  """Flag name -> the model it belongs to, for every learner."""
  return {flag: name for name in registry.available()
          for flag in run_lib.learner_flag_names(name)}


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
            if n not in RUNTIME_FLAGS and n not in others and n != "model"
            and FLAGS[n].value is not None}
  values.update({n: FLAGS[n].value for n in run_lib.learner_flag_names(model)})
  return run_lib.default_settings(model, **values)
