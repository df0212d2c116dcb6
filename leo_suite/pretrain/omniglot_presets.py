"""Omniglot-small learner presets: meta-training steps, validation interval and
runner.py flags per learner and setting, chosen on the meta-val alphabets
(scripts/omniglot_pipeline.py uses them; docs/results.md, Omniglot-small).

No flags are read here, so tests can check every preset against the runner's
flags (tests/test_omniglot_presets.py).
"""

DEFAULT_BACKBONE = "conv4"

# Per-learner, per-setting meta-training: steps, validation interval and
# runner.py flags, chosen by the validation sweep in the README (Omniglot-small;
# meta-val alphabets only, never Latin; experiments/omniglot_learner_sweep.py, on
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
#   leo   fine-tuning step size eta (--finetuning_lr_init; the release's 0.001 leaves
#         the decoded weights where they are on unit-norm features, as MAML's alpha
#         must be O(1) here). Seed-0 student of this recipe (runs/sweep/ba1_s0, warps,
#         200 val tasks, NCM 97.55 / 98.96 / 91.44; runs/sweep/leo1s.jsonl, leo5w5s.jsonl):
#         5w1s eta 0.001: 96.35 @600 of 600; 1: 97.31 @0; 3: 97.40 @0 (kept); 5: 96.33
#         @450; 1 at outer_lr 3e-4: 97.36 @50. 20w1s 0.001: 89.02 @300; 1: 90.94 @0;
#         3: 91.26 @0 (kept); 5: 88.02 @250; 10: 61.52; 30: 59.74; 1 at 3e-4: 91.00 @50.
#         5w5s (outer_lr 3e-4, 200 steps) 0.001: 98.49 @50;
#         0.1: 98.72 @0; 0.3: 98.85 @0; 1: 98.99 @0; 3: 99.03 @125 (kept); dropout 0.2
#         or 0 instead of 0.5: 98.49 / 98.47. Meta-training moves the 1-shot learner
#         away from its best validation point: the best checkpoint is the first.
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
#   snail steps, from the validation curves of runs/omniglot_v7 (Conv-4 student,
#         200 val tasks): 5w1s best 94.77 @2500 of 5000, then 94.44 @3000 and at most
#         94.28 after; 5w5s 97.73 @2500 of 4000 (again @3500); 20w1s 86.08 @1750 of
#         2500: hence 3000 / 3000 / 2000 steps. XLA off (--jit_compile=false): on
#         D = 64 its step is slower than plain (300-step runs, one at a time, steps/s
#         XLA / plain: 5w1s 16.5 / 22.3, 5w5s 8.8 / 9.3, 20w1s 4.8 / 5.4), unlike
#         the benchmark's D = 640 where XLA is faster (snail.SPEC.xla_default).
LEARNER_PRESETS = {
    ("leo", None, None): {"steps": 600, "every": 50, "flags": ["--outer_lr=3e-3",
                                                               "--finetuning_lr_init=3.0"]},
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
    # l2f, stop 41 (runs/omniglot_v9's warps features, 200 val tasks;
    #   runs/s41/sweep.jsonl): the preset before, 4096 units with a signed-identity
    #   first layer and a zero output layer: 97.33 @0 / 98.76 @0 / 90.40 @0, under
    #   NCM on the same tasks (97.49 / 98.99 / 91.34). A linear head with one
    #   evaluation step (gamma is then one learned constant per tensor, as the
    #   module docstring says): 5w1s zero head 97.49 @0; 5w5s proto start,
    #   inner_lr 0.3: 99.01 @10 (zero head 98.81 @0); 20w1s zero head, inner_lr 4:
    #   91.34 @0 (5 steps: 91.30). Kept.
    ("l2f", None, None): {"flags": ["--l2f_hidden_sizes=", "--l2f_head_init=zeros",
                                    "--l2f_inner_steps=1", "--l2f_eval_inner_steps=1"]},
    ("l2f", 5, 5): {"flags": ["--l2f_head_init=proto", "--l2f_inner_lr=0.3",
                              "--l2f_inner_steps=5"]},
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
    ("snail", None, None): {"steps": 3000, "every": 500, "flags": [
        "--outer_lr=3e-3", "--metatrain_batch_size=32", "--snail_dropout_rate=0.3",
        "--jit_compile=false"]},
    ("snail", 5, 5): {"flags": ["--snail_sequence_length=26"]},
    ("snail", 20, 1): {"steps": 2000, "every": 250, "flags": ["--outer_lr=1e-3"]},
    ("hallucination", None, None): {"steps": 30},
}


# Presets that replace LEARNER_PRESETS' for another --backbone, chosen on that
# backbone's validation (see the comments above LEARNER_PRESETS).
BACKBONE_PRESETS = {
    "conv4_wide": {
        # 4096 hidden units on D = 256 ran out of memory in evaluation (24 GB; since
        # then the table path bounds the adapted states it holds: 4.7 GB); 5w1s:
        # 1024 97.37 @0, 512 (= 2D: just [I, -I]) 97.65 @0.
        # L2F here keeps its preset from before stop 41 (these flags undo Conv-4's
        # linear head and one-step evaluation, which were not measured on this
        # backbone): 512 units, signed identity, 5 steps, zero head at 5w5s.
        ("l2f", None, None): {"flags": ["--l2f_hidden_sizes=512",
                                        "--l2f_hidden_init=signed_identity",
                                        "--l2f_inner_steps=5", "--l2f_eval_inner_steps=5"]},
        ("l2f", 5, 5): {"flags": ["--l2f_head_init=zeros", "--l2f_inner_lr=0.5"]},
        # 5w1s 600 steps: 95.43 @600 (the last); 1,200: 95.90 @1000. 20w1s 1,200:
        # 87.73 @800 against 87.72 @400 of 600 (unchanged). Measured with the
        # release's fine-tuning step 0.001, before eta 3 (above) was chosen on
        # Conv-4; not re-measured on this backbone.
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
