"""Omniglot-small end to end: pretrain a Conv-4, extract, baselines, learners, table.

  python scripts/omniglot_pipeline.py --work_dir=runs/omniglot_small

1. pretrains a Conv-4 (--backbone, default conv4; conv4_wide: widths 64-96-128-256;
   28x28, inverted, rotations as classes; --epochs=30 of Koch-style affine
   augmentation, cosine schedule, all chosen on meta-val) on the
   meta-train alphabets (Balinese, Korean, Japanese_(katakana), Sanskrit,
   Greek: 177 characters) read straight from the two archives, then trains
   --distill_generations born-again students (default 1: the same recipe,
   0.5 cross-entropy + 0.5 T^2 KL to the previous network at T = 4, chosen
   on meta-val);
2. extracts embeddings (the last network's) of all three splits with --crop (default warps: the
   center view averaged with 15 fixed affine warps, chosen on meta-val) to
   <work_dir>/embeddings/omniglot_small/<crop>/ (runner.py --data_path=
   <work_dir>/embeddings --dataset_name=omniglot_small --embedding_crop=<crop>
   reads them);
3. evaluates nearest-class-mean (cosine) and per-episode logistic regression
   on meta-test (Latin, 26 characters): 5w1s, 5w5s, 20w1s, 15 queries,
   --num_episodes fixed episodes (seed --episode_seed), mean and 95% CI;
4. trains each --learners model with its LEARNER_PRESETS (steps, flags,
   chosen on meta-val) with runner.py, keeping the best-validation checkpoint,
   and evaluates that checkpoint (--parallel_learners runs at a time);
5. writes <work_dir>/results.md (one table; learner cells add the best
   validation accuracy and its step) and results.json.
Each stage prints its wall time ("[stage] ..."). Rerunning after a kill
resumes: pretraining from its last checkpoint, extraction is skipped when the
embeddings come from the same backbone, finished learner runs are reused and
an interrupted one resumes from its checkpoint.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite import fileio  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.models import registry  # pylint: disable=wrong-import-position
from leo_suite.pretrain import backbones  # pylint: disable=wrong-import-position
from leo_suite.pretrain import cli  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract  # pylint: disable=wrong-import-position
from leo_suite.pretrain import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position
from leo_suite.pretrain import train as train_lib  # pylint: disable=wrong-import-position

ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
DATASET = "omniglot_small"
# Pretraining recipe chosen on the meta-val alphabets (README, Omniglot-small).
# Validation NCM (Early_Aramaic + Tagalog, 1,000 episodes, 5w1s / 5w5s / 20w1s):
# shift, 10 epochs 96.10 / 98.80 / 87.08; affine, 30 epochs 97.11 / 99.09 / 89.78.
DEFAULT_EPOCHS = 30
# Backbone (README, Omniglot-small feature table; 1,000 val episodes, NCM 5w1s /
# 5w5s / 20w1s of the born-again student, seed 0): conv4 center 97.30 / 99.01 /
# 90.41, warps 97.68 / 99.08 / 91.56; conv4_wide (widths 64-96-128-256, D = 256)
# center 97.47 / 99.24 / 90.87, warps 97.79 / 99.18 / 91.64. On the warps crop the
# pipeline extracts, the wide network's gain (0.08 to 0.11) is within the seed gap
# (0.1 to 0.2): conv4 stays the default, conv4_wide is an option with its own
# presets. Its pipeline's first invocation ran 53 minutes (runs/omniglot_v6:
# pretraining 8.5 and distillation 8.2 minutes against Conv-4's 4.3 and 4.3 in
# runs/omniglot_v5, measured a session earlier on a faster machine; learners 35.8
# with a validation sweep beside them).
DEFAULT_BACKBONE = "conv4"
# Table labels; a backbone missing here is labelled by its name.
BACKBONE_LABELS = {"conv4": "Conv-4", "conv4_wide": "Conv-4 wide", "conv4_map": "Conv-4 map",
                   "resnet12": "ResNet-12", "wrn28_10": "WRN-28-10"}
DEFAULT_AUGMENT = "affine"
DEFAULT_HEAD = "linear"
# Extraction crop chosen on meta-val (same backbone, cosine NCM 5w1s / 5w5s /
# 20w1s): center 96.91 / 98.92 / 89.78, warps 97.44 / 99.02 / 91.08.
DEFAULT_CROP = "warps"
# Born-again distillation chosen on meta-val (student: same recipe, loss
# 0.5 CE + 0.5 T^2 KL at T = 4 from the finished teacher): see the README's
# feature table.
DEFAULT_DISTILL_GENERATIONS = 1

flags.DEFINE_string("omniglot_dir", None, "Folder with the two Omniglot archives and "
                    "omniglot_small_split.json (default $LEO_SUITE_OMNIGLOT_DIR or "
                    "../shared/data/omniglot).")
flags.DEFINE_string("work_dir", "runs/omniglot_small", "Everything the pipeline writes.")
flags.DEFINE_enum("backbone", DEFAULT_BACKBONE, list(backbones.BACKBONES), "Pretrained "
                  "backbone (leo_suite/pretrain/backbones.py); chosen on the meta-val "
                  "alphabets (README, Omniglot-small).")
flags.DEFINE_integer("epochs", DEFAULT_EPOCHS, "Pretraining epochs (each: 4 x 3,540 images); "
                     "chosen on the meta-val alphabets (README, Omniglot-small).")
flags.DEFINE_string("augment", DEFAULT_AUGMENT, "Pretraining augmentation: none, shift (random "
                    "translation), shift_flip or affine (Koch et al. 2015 affine warp).")
flags.DEFINE_integer("max_shift", 2, "Translation range of the augmentation (pixels at 28x28).")
flags.DEFINE_string("head", DEFAULT_HEAD, "Pretraining classifier head: linear or cosine.")
flags.DEFINE_enum("crop", DEFAULT_CROP, list(extract.CROPS), "Extraction crop of every "
                  "split (leo_suite/pretrain/extract.py); the learners train on it and "
                  "exports of their runs embed images the same way.")
flags.DEFINE_integer("distill_generations", DEFAULT_DISTILL_GENERATIONS, "Born-again "
                     "students after the first network, each distilled from the previous "
                     "one (0: none); the last one's backbone is extracted.")
flags.DEFINE_float("distill_alpha", 0.5, "Weight of the distillation term (students).")
flags.DEFINE_float("distill_temperature", 4.0, "Distillation temperature (students).")
flags.DEFINE_integer("batch_size", 64, "Pretraining batch size.")
flags.DEFINE_float("learning_rate", 0.05, "Pretraining peak SGD learning rate.")
flags.DEFINE_integer("seed", 0, "Pretraining seed.")
flags.DEFINE_integer("val_episodes", 200, "Meta-val NCM 5w1s episodes after each epoch.")
flags.DEFINE_integer("num_episodes", 1000, "Fixed meta-test episodes per setting.")
flags.DEFINE_integer("episode_seed", 0, "Seed of the fixed meta-test episodes.")
flags.DEFINE_boolean("pixel_baseline", True, "Also report NCM on raw pixels.")
flags.DEFINE_list("learners", list(registry.LEARNERS),
                  "runner.py models to train and evaluate ('' for none).")
flags.DEFINE_integer("runner_steps", 0, "Meta-training steps per learner and setting "
                     "(0: each learner's LEARNER_PRESETS steps).")
flags.DEFINE_multi_string("runner_flag", [], "Extra flag passed to every runner.py call.")
flags.DEFINE_list("settings", ["5w1s", "5w5s", "20w1s"], "Episode settings <ways>w<shots>s.")
flags.DEFINE_integer("parallel_learners", 2, "runner.py trainings run at the same time "
                     "(each is mostly process start-up and tracing on a 2-core CPU).")
FLAGS = flags.FLAGS

# Per-learner, per-setting meta-training: steps, validation interval and
# runner.py flags, chosen by the validation sweep in the README (Omniglot-small;
# meta-val alphabets only, never Latin; scripts/omniglot_learner_sweep.py, on
# the center embeddings of the default backbone). Training validates at step 0
# (the initialisation) and every `every` steps on 200 fixed meta-val tasks and
# keeps the best checkpoint (best/), which evaluation uses. Key (model, ways,
# shots), or (model, None, None) for every setting; "skip" gives the measured
# reason a setting is not run.
# Measured at 20w1s on these features: for the learners that start at nearest
# class mean (ProtoNet, Matching, R2D2, MAML/iMAML/Meta-LSTM with a zero linear
# head) the best checkpoint is the first (10-20 steps; Meta-LSTM 88.86 @2,
# 86.67 @10); longer meta-training on meta-train embeddings (classes the
# backbone was trained on) lowers validation accuracy.
LEARNER_DEFAULT = {"steps": 60, "every": 10, "flags": []}
# Validation (200 tasks; NCM 96.57 / 98.76 / 89.49 on the same tasks), best @ step:
#   leo   20w1s outer_lr 1e-4 (default): 81.4 @100 of 100 (10-epoch features); 1e-3:
#         86.20 @200; 3e-3: 87.15 @200 of 300
#   l2f   20w1s hidden 64 (default): 37.32; 512: 74.10 @100; 512 + inner_lr 4: 86.81 @25;
#         1024 + inner_lr 4: 87.57 @10 (its random hidden layer keeps more of the 64-d input)
#   reptile 20w1s epsilon 1.0 (default), hidden 64: 84.81 @10; epsilon 0.1: 88.41 @10;
#         epsilon 0.1, linear head: 89.51 @40
#   relation (defaults: Glorot module, normalised features) 5w1s: 20.74 @60 of 60,
#         92.26 @800 of 1000, 93.66 @3500 of 4000, 93.63 @5000 of 20000 (plateau, 337 s);
#         5w5s: 96.63 @4000 of 4000 (55 s); 20w1s: 82.46 @1750 of 2000 (209 s)
#   meta_lstm 20w1s hidden 64 (default): 53.57 @20 of 60; linear head: 86.67 @10,
#         88.86 @2 of 20 (every 2); 5w1s linear: 96.41 @10
#   hallucination 20w1s: 87.81 @10, 88.54 @30 of 60 (492 s for 60 steps under load)
#   snail outer_lr 1e-4 (the paper's) 5w1s: 20.74 @60, 61.93 @800, 79.65 @4000 of 4000;
#         20w1s: 4.92 @300, 59.16 @3000 of 3000; hence its default 1e-3 (snail.py)
# On the warps embeddings (NCM 97.27 / 98.75 / 90.87 on the same 200 tasks):
#   leo   5w1s outer_lr 3e-3: 95.96 @200 of 200, 96.21 @500 of 800; 1e-3: 95.83 @75;
#         3e-4: 95.94 @200. 5w5s 3e-3: 98.16 @0 (the initialisation); 1e-3: 98.34 @25;
#         3e-4: 98.41 @75 of 200. 20w1s 3e-3: 88.83 @500 of 600
#   snail (1e-3) 5w1s: 91.61 @1750 of 2000, 93.23 @3500 of 5000 (231 s);
#         20w1s: 82.61 @2500 of 3000: a black box that must learn the comparison
#         NCM gets for free needs more steps than this pipeline's budget
#   protonet 5w5s: 98.78 @0 of 60 (the initialisation, NCM up to its metric)
#   maml  20w1s inner_lr 4, 5 inner steps: 90.42 @0; 1 step: 90.87 @0 (one step from the
#         zero head is nearest class mean exactly at 1-shot). 5w5s 1 step: 98.60 @0
#         against 98.72 @0 with 5 (kept)
#   r2d2  5w5s lambda 1000: 98.61 @0 against 98.68 @0 at 50 (kept)
#   l2f   hidden 1024: 96.63 @50 / 98.39 @50 / 88.95 @10 (20-way inner_lr 4); hidden
#         4096: 89.55 @0 at 20w1s (inner_lr 8: 88.01); 4096 with a zero output layer:
#         96.99 @0 / 98.59 @0 / 89.93 @0
#         On the born-again student's features (runs/omniglot_v4, 200 tasks):
#         4096, zero output layer: 97.12 @0 / 98.64 @0 / 89.83 @0; + signed-identity
#         first layer ([I, -I, Glorot rest]): 97.51 @0 / 98.61 @0 / 90.54 @0 (kept: two
#         settings up, 5w5s a tie); hidden 128 + signed identity: 97.41 / 98.63 / 90.30
#   head_init=proto (Proto-MAML: each task starts at its Euclidean prototypes) on the
#         student's features (runs/omniglot_v4, 200 tasks; runs/sweep/learners_v4.jsonl;
#         zero head = the pipeline's values, MAML 5w1s re-measured: 97.41 both times):
#           5w1s  maml 97.41 -> 97.46, imaml 97.43 -> 97.49, reptile 97.52 -> 97.51,
#                 meta_lstm 97.53 -> 97.49 (the two starts coincide at 1-shot: kept)
#           5w5s  maml 98.74 -> 98.80, imaml 98.73 -> 98.83, reptile 98.88 -> 98.89,
#                 meta_lstm 98.71 -> 98.81 (kept for all four)
#           20w1s maml 91.26 -> 91.24, imaml 91.15 -> 91.12, reptile 90.72 -> 90.83,
#                 meta_lstm 91.30 -> 91.35 (1-shot: kept the zero head)
#           l2f   97.51 -> 96.84 / 98.61 -> 98.40 / 90.54 -> 86.05 (gamma scales the
#                 prototypes too: not kept)
#         20w1s, steps toward logistic regression cost at 20 classes x 1 shot:
#           reptile eval_inner_steps 50 -> 5: 90.72 -> 91.35 (1: 91.32 proto; kept 5);
#           5w5s 50 -> 5 with proto: 98.89 -> 98.78 (kept 50)
#           imaml lam 0.05 -> 1.0: 91.15 -> 91.30 (proto, lam 0.2: 91.29, 1.0: 91.32)
#           r2d2 lambda_init 50 -> 1000: 91.14 -> 91.29 (ridge -> class-mean dot)
#         l2f 5w5s inner_lr 1 -> 0.5: 98.61 -> 98.69 (1 inner step: 98.66)
#         snail input dropout (--snail_dropout_rate; it reaches ~99% on the meta-train
#         characters the backbone was trained on): 5w1s at 2,000 steps 93.87 (the
#         pipeline's curve) -> 0.1: 94.58, 0.2: 94.93, 0.3: 94.95, 0.5: 93.88 @1000;
#         0.3 at the presets: 5w1s 94.61 -> 95.11 @2500, 5w5s 97.03 -> 98.02 @2500,
#         20w1s 84.13 -> 86.35 @2250 (kept for every setting)
#   5w5s on the omniglot_v5 student's warps embeddings (200 val tasks, 60 steps,
#         runs/sweep/learners_v5.jsonl; the reduced CI pipeline had R2D2 and MAML below
#         NCM at 5w5s, and omniglot_v5's Latin rows were 98.33 / 98.53 against 98.68):
#         r2d2 lambda 50: 98.61 @0; 0.1: 98.87 @0 (kept; scale_init 10: 98.87). A
#         1,000-episode numpy scan of the closed form (val, bias column): lambda 0.01
#         98.90, 0.03 98.99, 0.1 99.07, 0.3 99.05, 50 98.88, against NCM 99.02: at
#         5-shot the near-interpolating ridge beats the class-sum dot product that
#         lambda >> ||x||^2 reduces to; at 1-shot lambda 0.1 loses (5w1s 97.27 vs 97.52,
#         20w1s 89.17 vs 91.35), so 1-shot keeps 50 / 1000.
#         maml proto, 10 eval steps (inner_lr 1): 98.71 @40; 3 eval steps: 98.75 @60;
#         1: 98.81 @0; 0 (the prototypes plus the learned residual): 98.87 @10;
#         1 step at inner_lr 0.3: 98.85 @10 (kept: within 0.02 of not adapting, and
#         still MAML); inner_lr 3: 98.65 @60; 1 train + 1 eval step: 98.83 @10
#         matching (cosine attention scale s, linear map): s = 1 98.64 @0, 10: 98.70 @10,
#         30: 98.73 @60 (kept); identity map s 10: 98.69 @0, s 30: 98.73 @0. At 1-shot
#         s does not change the argmax (one support point per class), so 5w5s only
# On the conv4_wide student's warps embeddings (runs/omniglot_v6, D = 256; 200 val tasks;
# runs/sweep/learners_v6.jsonl), presets re-chosen where D mattered:
#   matching map_dim 64 (its default, = D on Conv-4: an isometry there, a random
#         projection 256 -> 64 here): 5w1s 96.75 @30; map_dim 0 (= D): 97.65 @0,
#         20w1s 91.46 @0 (kept for every setting)
#   relation (200 tasks, runs/sweep_helper; module hidden 64,8 + linear map before:
#         94.67 @2500 of 5000 / 97.31 @3500 of 5000 / 85.10 @1750 of 2000)
#         5w1s hidden 256,8 (linear map): 94.93 @1250 of 2000 (20 s); 256,8 + identity
#         map: 95.61 @1750 of 2000 (25 s); 1024,8 + identity: 95.50 @1750 (46 s);
#         256,8 + identity, outer_lr 3e-4: 95.61 @4000 of 4000 (46 s); 256,8 + identity,
#         meta-batch 32: 95.73 @2000 of 2000 (46 s, kept)
#         5w5s 256,8 + identity: 97.72 @3000 of 3000 (47 s, kept); outer_lr 3e-4: 97.16
#         @4000 of 4000 (36 s)
#         20w1s 256,8 + identity: 85.67 @500 of 2000, then falls (82.29 @2000; 174 s);
#         outer_lr 3e-4: 87.11 @1500 of 1500 (207 s), 87.58 @2500 of 2500 (233 s, kept)
#   snail (200 tasks, runs/sweep_helper; before: 1e-3, meta-batch 12, T = 6 at every
#         setting: 93.23 @3500 / 94.83 @4000 / 82.61 @2500)
#         5w1s outer_lr 3e-3: 93.07 @3000 of 3000 (88 s); half widths (16,32,64 /
#         8,16,32 / F 16): 93.15 @3000 of 3000 (88 s); paper widths (64,256,512 /
#         32,128,256 / F 128) at 1e-3: 91.19 @1500 of 1500 (109 s; default 90.85 @1500);
#         3e-3, meta-batch 32: 93.16 @2000 of 2000 (76 s), 94.03 @3000 of 5000 (143 s, kept)
#         5w5s sequence_length 26 (TC sized for T = N*K + 1 = 26, as the paper; 6 gives a
#         receptive field of 15 < 26 steps): 95.92 @2500 of 3000 (149 s); + 3e-3,
#         meta-batch 32: 97.06 @3500 of 4000 (273 s, kept)
#         20w1s sequence_length 21: 81.36 @2500 of 3000 (267 s); 3e-3, meta-batch 32:
#         82.50 @1250 of 2500 (329 s), then falls; 1e-3, meta-batch 32: 84.13 @2500 of
#         2500 (349 s, kept); of 4000: 84.24 @2750, 83.59 @4000 (308 s; plateau)
LEARNER_PRESETS = {
    ("leo", None, None): {"steps": 600, "every": 50, "flags": ["--outer_lr=3e-3"]},
    ("leo", 5, 5): {"steps": 200, "every": 25, "flags": ["--outer_lr=3e-4"]},
    ("maml", 5, 5): {"flags": ["--maml_head_init=proto", "--maml_inner_lr=0.3",
                               "--maml_eval_inner_steps=1"]},
    ("maml", 20, 1): {"flags": ["--maml_inner_lr=4.0", "--maml_inner_steps=1",
                                "--maml_eval_inner_steps=1"]},
    ("imaml", 5, 5): {"flags": ["--imaml_head_init=proto"]},
    ("imaml", 20, 1): {"flags": ["--imaml_lam=1.0"]},
    ("r2d2", 5, 5): {"flags": ["--r2d2_lambda_init=0.1"]},
    ("matching", None, None): {"flags": ["--matching_map_dim=0"]},  # = D (64 on conv4)
    ("matching", 5, 5): {"flags": ["--matching_logit_scale=30"]},
    ("r2d2", 20, 1): {"flags": ["--r2d2_lambda_init=1000"]},
    ("l2f", None, None): {"flags": ["--l2f_hidden_sizes=4096", "--l2f_head_init=zeros",
                                    "--l2f_hidden_init=signed_identity"]},
    ("l2f", 5, 5): {"flags": ["--l2f_inner_lr=0.5"]},
    ("l2f", 20, 1): {"flags": ["--l2f_inner_lr=4.0"]},
    ("reptile", None, None): {"flags": ["--outer_lr=0.1", "--reptile_hidden_sizes="]},
    ("reptile", 5, 5): {"flags": ["--reptile_head_init=proto"]},
    ("reptile", 20, 1): {"flags": ["--reptile_eval_inner_steps=5"]},
    ("meta_lstm", None, None): {"flags": ["--meta_lstm_hidden_sizes="]},
    ("meta_lstm", 5, 5): {"flags": ["--meta_lstm_head_init=proto"]},
    ("relation", None, None): {"steps": 3000, "every": 250, "flags": [
        "--relation_module_hidden_sizes=256,8", "--relation_embedding_map=identity"]},
    ("relation", 5, 1): {"steps": 2000, "flags": ["--metatrain_batch_size=32"]},
    ("relation", 20, 1): {"steps": 2500, "flags": ["--outer_lr=3e-4"]},
    ("snail", None, None): {"steps": 5000, "every": 500, "flags": [
        "--outer_lr=3e-3", "--metatrain_batch_size=32", "--snail_dropout_rate=0.3"]},
    ("snail", 5, 5): {"steps": 4000, "flags": ["--snail_sequence_length=26"]},
    ("snail", 20, 1): {"steps": 2500, "every": 250, "flags": ["--outer_lr=1e-3"]},
    ("hallucination", None, None): {"steps": 30},
}


# Presets that replace LEARNER_PRESETS' for another --backbone, chosen on that
# backbone's validation (see the comments above LEARNER_PRESETS).
BACKBONE_PRESETS = {
    "conv4_wide": {
        # 4096 hidden units on D = 256 ran out of memory in evaluation (24 GB);
        # 5w1s: 1024 97.37 @0, 512 (= 2D: just [I, -I]) 97.65 @0.
        ("l2f", None, None): {"flags": ["--l2f_hidden_sizes=512"]},
        # 5w1s 600 steps: 95.43 @600 (the last); 1,200: 95.90 @1000. 20w1s 1,200:
        # 87.73 @800 against 87.72 @400 of 600 (unchanged).
        ("leo", 5, 1): {"steps": 1200, "every": 100},
    },
}


def learner_preset(model, ways, shots, backbone=DEFAULT_BACKBONE):
  """{"steps", "every", "flags", "skip"?} for a learner at a setting."""
  preset = dict(LEARNER_DEFAULT, flags=list(LEARNER_DEFAULT["flags"]))
  overrides = BACKBONE_PRESETS.get(backbone, {})
  for key in ((model, None, None), (model, ways, shots)):
    for field, value in (list(LEARNER_PRESETS.get(key, {}).items()) +
                         list(overrides.get(key, {}).items())):
      if field == "flags":  # a setting's flag replaces the same flag for every setting
        names = {flag.split("=")[0] for flag in value}
        value = [f for f in preset["flags"] if f.split("=")[0] not in names] + list(value)
      preset[field] = value
  preset["flags"] = [f"--checkpoint_steps={preset['every']}",
                     f"--log_steps={preset['every']}"] + preset["flags"]
  return preset


def stage_done(stage, timings, ledger_path=None):
  """Prints the stage's wall time and adds it to <work_dir>/stage_seconds.json.

  The ledger sums each stage over the invocations that built the work dir (a
  resumed run adds what it redid), so results.md reports the whole run's cost.
  """
  print(f"[stage] {stage} done in {timings[stage + '_s']:.0f} s", flush=True)
  if ledger_path:
    ledger = {}
    if os.path.exists(ledger_path):
      with open(ledger_path) as handle:
        ledger = json.load(handle)
    ledger[stage] = ledger.get(stage, 0.0) + timings[stage + "_s"]
    ledger["invocations"] = max(ledger.get("invocations", 0), timings.get("_invocation", 1))
    pipeline.write_json(ledger_path, ledger)


def extracted_manifest(data_path, summary):
  """The manifest of embeddings already extracted from this very backbone, else None."""
  path = os.path.join(data_path, DATASET, FLAGS.crop, extract.MANIFEST)
  sha = (summary.get("export") or {}).get("weights_sha256")
  if not sha or not os.path.exists(path):
    return None
  with open(path) as handle:
    manifest = json.load(handle)
  splits = manifest.get("splits", {})
  files_ok = all(os.path.exists(os.path.join(os.path.dirname(path), v["file"]))
                 for v in splits.values())
  if manifest.get("backbone", {}).get("checkpoint_sha256") == sha and len(splits) == 3 \
      and files_ok:
    print(f"embeddings already extracted from backbone {sha[:12]}: reusing {path}")
    return manifest
  return None


def cached_learner(root, model, ways, shots, steps, extra_flags, manifest, run):
  """run(extra_flags) unless this exact learner run already finished (resume after a kill).

  The key is the learner, setting, steps, flags, test episodes and the
  embeddings' hashes; a run directory left by a different key is removed first.
  """
  run_dir = os.path.join(root, f"{model}_{ways}w{shots}s")
  key = {"model": model, "ways": ways, "shots": shots, "steps": steps, "flags": extra_flags,
         "num_episodes": FLAGS.num_episodes, "episode_seed": FLAGS.episode_seed,
         "embeddings": {k: v["sha256"] for k, v in manifest["splits"].items()}}
  cache = os.path.join(root, f"{model}_{ways}w{shots}s.result.json")
  if os.path.exists(cache):
    with open(cache) as handle:
      saved = json.load(handle)
    if saved.get("key") == key:
      return saved["result"]
  if os.path.exists(run_dir):
    previous = os.path.join(root, f"{model}_{ways}w{shots}s.key.json")
    same = False
    if os.path.exists(previous):
      with open(previous) as handle:
        same = json.load(handle) == key
    if not same:
      shutil.rmtree(run_dir)
  os.makedirs(root, exist_ok=True)
  pipeline.write_json(os.path.join(root, f"{model}_{ways}w{shots}s.key.json"), key)
  result = run(extra_flags)
  if "accuracy" in result:
    pipeline.write_json(cache, {"key": key, "result": result})
  return result


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  started = time.time()
  omniglot_dir = FLAGS.omniglot_dir or images_lib.default_omniglot_dir()
  archives = [os.path.join(omniglot_dir, name) for name in ARCHIVES]
  missing = [a for a in archives if not os.path.exists(a)]
  if missing:
    raise errors.DataError(f"{missing[0]}: Omniglot archive not found; pass --omniglot_dir "
                           f"or set {images_lib.OMNIGLOT_ENV}")
  work = os.path.abspath(FLAGS.work_dir)
  try:
    settings = tuple(tuple(int(v) for v in s.rstrip("s").split("w")) for s in FLAGS.settings)
  except ValueError:
    raise errors.ConfigError(f"--settings={FLAGS.settings}: use e.g. 5w1s,20w1s") from None
  timings = {}
  ledger_path = os.path.join(work, "stage_seconds.json")
  if os.path.exists(ledger_path):
    with open(ledger_path) as handle:
      timings["_invocation"] = json.load(handle).get("invocations", 0) + 1

  # 1. data and pretraining.
  by_class, split_classes, origin = images_lib.load_labelled_splits(
      archives, DATASET, omniglot_dir)
  print(f"{origin}: " + ", ".join(f"{k} {len(v)} classes" for k, v in split_classes.items()))
  options = images_lib.DecodeOptions(28, 1, (105, 105), ("1", "L"))
  images, labels, _ = pipeline.decode_classes(by_class, split_classes["train"], options)
  val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"], options)
  config = train_lib.PretrainConfig(backbone=FLAGS.backbone, epochs=FLAGS.epochs,
                                    batch_size=FLAGS.batch_size,
                                    learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
                                    augment=FLAGS.augment, max_shift=FLAGS.max_shift,
                                    head=FLAGS.head)
  trainer = train_lib.Pretrainer(config, images, labels, os.path.join(work, "pretrain"),
                                 class_names=split_classes["train"])
  t0 = time.time()
  callback = (pipeline.val_ncm_callback(val_images, val_labels, config.invert,
                                        FLAGS.val_episodes) if FLAGS.val_episodes else None)
  summary = trainer.train(epoch_callback=callback)
  timings["pretrain_s"] = time.time() - t0
  stage_done("pretrain", timings, ledger_path)
  backbone_run = os.path.join(work, "pretrain")
  if FLAGS.distill_generations:
    t0 = time.time()
    for generation in range(1, FLAGS.distill_generations + 1):
      student_run = os.path.join(work, f"pretrain_gen{generation}")
      student = dataclasses.replace(config, teacher=backbone_run,
                                    distill_alpha=FLAGS.distill_alpha,
                                    distill_temperature=FLAGS.distill_temperature)
      print(f"distillation generation {generation}: teacher {backbone_run}", flush=True)
      summary = train_lib.Pretrainer(student, images, labels, student_run,
                                     class_names=split_classes["train"]).train(
                                         epoch_callback=callback)
      backbone_run = student_run
    timings["distill_s"] = time.time() - t0
    stage_done("distill", timings, ledger_path)

  # 2. extraction.
  t0 = time.time()
  data_path = os.path.join(work, "embeddings")
  manifest = extracted_manifest(data_path, summary)
  if manifest is None:  # not yet extracted from this backbone (a resumed run skips it)
    manifest = extract.extract_embeddings(
        os.path.join(backbone_run, "backbone"), by_class, split_classes, data_path, DATASET,
        FLAGS.crop, "pkl", 256, expected_size=(105, 105), allowed_modes=("1", "L"),
        sources=archives, split_origin=origin)
  timings["extract_s"] = time.time() - t0
  stage_done("extract", timings, ledger_path)

  # 3. baselines on meta-test.
  t0 = time.time()
  test = embeddings_lib.load_dataset_split(data_path, DATASET, FLAGS.crop, "test")
  label = BACKBONE_LABELS.get(FLAGS.backbone, FLAGS.backbone)
  rows = pipeline.evaluate_baselines(test, f"{label} embeddings", settings,
                                     num_episodes=FLAGS.num_episodes, seed=FLAGS.episode_seed)
  if FLAGS.pixel_baseline:
    pixels = pipeline.pixel_split(by_class, split_classes["test"], 28, True)
    rows += pipeline.evaluate_baselines(pixels, "raw pixels", settings,
                                        num_episodes=FLAGS.num_episodes,
                                        seed=FLAGS.episode_seed, methods=("ncm_cosine",))
  timings["baselines_s"] = time.time() - t0
  stage_done("baselines", timings, ledger_path)
  for row in rows:
    print(f"{row['method']:<45} {row['setting']:>6}: {row['accuracy']:.2f} ± {row['ci95']:.2f}")

  # 4. learners through runner.py.
  t0 = time.time()
  learners_root = os.path.join(work, "learners")
  jobs = [(model, ways, shots) for model in FLAGS.learners if model for ways, shots in settings]

  def run_job(job):
    model, ways, shots = job
    preset = learner_preset(model, ways, shots, FLAGS.backbone)
    steps = FLAGS.runner_steps or preset["steps"]
    if "skip" in preset:
      print(f"{model} {ways}w{shots}s: skipped ({preset['skip']})", flush=True)
      return {"method": f"{model} (runner.py)", "setting": f"{ways}w{shots}s", "model": model,
              "status": f"skipped: {preset['skip']}"}
    result = cached_learner(
        learners_root, model, ways, shots, steps, preset["flags"] + FLAGS.runner_flag, manifest,
        lambda flags_: pipeline.run_learner(model, data_path, DATASET, ways, shots,
                                            learners_root, steps, FLAGS.num_episodes,
                                            seed=FLAGS.episode_seed, extra_flags=flags_,
                                            crop=FLAGS.crop))
    print(f"{model} {ways}w{shots}s ({steps} steps): " + (
        f"{result['accuracy']:.2f} ± {result['ci95']:.2f}, best val "
        f"{result.get('val_accuracy', float('nan')):.2f} @ step {result.get('best_step')}, "
        f"{result.get('seconds', 0):.0f} s" if "accuracy" in result else str(result)),
        flush=True)
    return {"method": f"{model} (runner.py)", "setting": f"{ways}w{shots}s", "steps": steps,
            **result}

  with concurrent.futures.ThreadPoolExecutor(max(1, FLAGS.parallel_learners)) as pool:
    learner_rows = list(pool.map(run_job, jobs))
  rows += learner_rows
  for model in dict.fromkeys(m for m, _, _ in jobs):
    timings[f"learner_{model}_s"] = sum(r.get("seconds", 0.0) for r in learner_rows
                                        if r["method"] == f"{model} (runner.py)")
  timings["learners_s"] = time.time() - t0
  stage_done("learners", timings, ledger_path)
  timings["total_s"] = time.time() - started
  with open(ledger_path) as handle:
    ledger = json.load(handle)
  stages = ("pretrain", "distill", "extract", "baselines", "learners")
  timings.pop("_invocation", None)

  table = pipeline.markdown_table(rows, settings)
  history = summary.get("history") or []
  notes = (f"Omniglot-small meta-test (Latin, {test.num_classes} characters), "
           f"{FLAGS.num_episodes} fixed episodes (seed {FLAGS.episode_seed}), 15 queries "
           f"per class, accuracy % ± 95% CI; learner cells add the best validation accuracy "
           f"(meta-val alphabets) @ its step, the checkpoint evaluated. {label} pretrained "
           f"{FLAGS.epochs} epochs (augment {FLAGS.augment}, {FLAGS.head} head) on "
           f"{len(split_classes['train'])} meta-train characters x 4 rotations"
           + (f", then {FLAGS.distill_generations} born-again generation(s) of the same "
              f"recipe distilled from the previous one (alpha {FLAGS.distill_alpha}, "
              f"T {FLAGS.distill_temperature})" if FLAGS.distill_generations else "") + "; "
           f"embeddings: {FLAGS.crop} crop ({extract.CROP_DESCRIPTIONS[FLAGS.crop]})"
           + (f" (final train loss {history[-1]['loss']:.3f})" if history else "") +
           f"; backbone sha256 {manifest['backbone']['checkpoint_sha256'][:12]}. "
           f"Stage wall times, summed over the {ledger.get('invocations', 1)} invocation(s) "
           f"that built this directory: " + ", ".join(
               f"{k} {ledger[k] / 60:.1f} min" for k in stages if k in ledger) +
           f"; total {sum(ledger.get(k, 0) for k in stages) / 60:.1f} min. Learner runs (train "
           f"+ evaluate, {FLAGS.parallel_learners} at a time): " + ", ".join(
               f"{k[8:-2]} {v:.0f} s" for k, v in timings.items() if k.startswith("learner_"))
           + ".")
  text = table + "\n\n" + notes + "\n"
  fileio.atomic_write_text(os.path.join(work, "results.md"), text)
  pipeline.write_json(os.path.join(work, "results.json"),
                      {"rows": rows, "timings": timings, "pretrain": summary,
                       "manifest": manifest})
  print(text)


if __name__ == "__main__":
  cli.run(main)
