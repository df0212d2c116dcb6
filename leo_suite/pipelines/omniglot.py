"""Omniglot-small end to end: pretrain a Conv-4, extract, baselines, learners, table.

scripts/omniglot_pipeline.py is its command line (`Options` are its flags):

1. pretrains a Conv-4 (`backbone`, default conv4; conv4_wide: widths 64-96-128-256;
   28x28, inverted, rotations as classes; 30 epochs of Koch-style affine
   augmentation, cosine schedule, all chosen on meta-val) on the
   meta-train alphabets (Balinese, Korean, Japanese_(katakana), Sanskrit,
   Greek: 177 characters; with `metatrain_holdout` > 0 on all but that
   fraction of them, which the learners meta-train on instead; with
   `metatrain_rotations` the learners' meta-train classes are also turned by
   90/180/270 degrees, each turn a class; with `metatrain_views` each image is
   the mean of that many of its views, drawn per episode) read straight
   from the two archives, then trains
   `distill_generations` born-again students (default 0; each: the same
   recipe, 0.5 cross-entropy + 0.5 T^2 KL to the previous network at T = 4);
2. extracts embeddings (the last network's) of all three splits with `crop` (default
   warps: the center view averaged with 15 fixed affine warps, chosen on meta-val) to
   <work_dir>/embeddings/omniglot_small/<crop>/ (runner.py --data_path=
   <work_dir>/embeddings --dataset_name=omniglot_small --embedding_crop=<crop>
   reads them);
3. evaluates nearest-class-mean (cosine) and per-episode logistic regression
   on meta-test (Latin, 26 characters; `archives` and `split` choose other
   Omniglot alphabets): 5w1s, 5w5s, 20w1s, 15 queries,
   `num_episodes` fixed episodes (seed `episode_seed`), mean and 95% CI, and
   nearest class mean on meta-train and meta-val episodes beside it (how hard
   meta-training's tasks are);
4. trains each of `learners` with its preset (steps, flags, chosen on
   meta-val: leo_suite/pretrain/omniglot_presets.py) with runner.py, keeping
   the best-validation checkpoint, and evaluates that checkpoint
   (`parallel_learners` runs at a time, each with cores / parallel_learners
   TensorFlow threads);
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
import time
from typing import Optional, Sequence

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.models import registry
from leo_suite.pipelines import gap
from leo_suite.pipelines import results
from leo_suite.pretrain import class_splits
from leo_suite.pretrain import extract
from leo_suite.pretrain import omniglot_presets
from leo_suite.pretrain import pipeline
from leo_suite.pretrain import pretrain_config
from leo_suite.pretrain import train as train_lib
from leo_suite.training import compare

DATASET = "omniglot_small"
# The pretraining recipe: PretrainConfig's defaults (leo_suite/pretrain/train.py)
# except these, chosen on the meta-val alphabets (docs/results.md, Omniglot-small).
# Validation NCM (Early_Aramaic + Tagalog, 1,000 episodes, 5w1s / 5w5s / 20w1s):
# shift, 10 epochs 96.10 / 98.80 / 87.08; affine, 30 epochs 97.11 / 99.09 / 89.78.
RECIPE_OVERRIDES = {"epochs": 30, "augment": "affine"}
# Backbone (docs/results.md feature table, students; 1,000 val episodes, NCM 5w1s /
# 5w5s / 20w1s, warps): conv4 97.68 / 99.08 / 91.56, conv4_wide 97.79 / 99.18 /
# 91.64, a gain within the seed gap (0.1 to 0.2): conv4 stays the default
# (omniglot_presets.DEFAULT_BACKBONE), conv4_wide is an option with its own presets.
RECIPE = pretrain_config.PretrainConfig(backbone=omniglot_presets.DEFAULT_BACKBONE,
                                  **RECIPE_OVERRIDES)
# Table labels; a backbone missing here is labelled by its name.
BACKBONE_LABELS = {"conv4": "Conv-4", "conv4_wide": "Conv-4 wide", "conv4_map": "Conv-4 map",
                   "resnet12": "ResNet-12", "wrn28_10": "WRN-28-10"}
# Extraction crop chosen on meta-val (same backbone, cosine NCM 5w1s / 5w5s /
# 20w1s): center 96.91 / 98.92 / 89.78, warps 97.44 / 99.02 / 91.08.
DEFAULT_CROP = "warps"
# Born-again distillation (student: same recipe, loss 0.5 CE + 0.5 T^2 KL at
# T = 4 from the finished teacher), measured on meta-val (docs/results.md's feature
# table): over three teacher / student pairs the student gains +0.11 / +0.01 /
# +0.17 NCM points on average (5w1s / 5w5s / 20w1s), within the gap between
# two runs of one seed, and the latest pair (warps) went the other way: teacher
# 97.85 / 99.23 / 91.99, student 97.78 / 99.17 / 91.72. A generation costs as
# long as pretraining (9.9 minutes in runs/omniglot_v7, 16% of that run): off
# by default, an option.
DEFAULT_DISTILL_GENERATIONS = 0
STAGES = ("pretrain", "distill", "extract", "baselines", "learners")


@dataclasses.dataclass
class Options:
  """Everything a pipeline run takes (the command line's flags, same names)."""
  omniglot_dir: Optional[str] = None   # None: class_splits.default_omniglot_dir()
  archives: Sequence[str] = pipeline.OMNIGLOT_SMALL_ARCHIVES
  split: str = "omniglot_small"
  work_dir: str = "runs/omniglot_small"
  backbone: str = RECIPE.backbone
  epochs: int = RECIPE.epochs
  augment: str = RECIPE.augment
  max_shift: int = RECIPE.max_shift
  head: str = RECIPE.head
  crop: str = DEFAULT_CROP
  distill_generations: int = DEFAULT_DISTILL_GENERATIONS
  distill_alpha: float = RECIPE.distill_alpha
  distill_temperature: float = RECIPE.distill_temperature
  batch_size: int = RECIPE.batch_size
  learning_rate: float = RECIPE.learning_rate
  seed: int = RECIPE.seed
  val_episodes: int = 200
  num_episodes: int = 1000
  episode_seed: int = 0
  pixel_baseline: bool = True
  learners: Sequence[str] = tuple(registry.LEARNERS)
  runner_steps: int = 0                # 0: each learner's preset steps
  runner_flag: Sequence[str] = ()
  settings: Sequence[str] = ("5w1s", "5w5s", "20w1s")
  parallel_learners: int = 2
  metatrain_holdout: float = 0.0       # > 0: class_splits.hold_out (issue 31)
  metatrain_rotations: bool = False    # meta-train classes also turned 90/180/270 degrees
  metatrain_views: int = 0             # > 0: runner --metatrain_views (views drawn per episode)


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


def extracted_manifest(data_path, crop, summary, rotated_splits=(), view_splits=()):
  """The manifest of embeddings already extracted from this very backbone
  (and with the same rotated and view splits), else None."""
  path = os.path.join(data_path, DATASET, crop, embeddings_lib.MANIFEST)
  sha = (summary.get("export") or {}).get("weights_sha256")
  if not sha or not os.path.exists(path):
    return None
  with open(path) as handle:
    manifest = json.load(handle)
  splits = manifest.get("splits", {})
  files_ok = all(os.path.exists(os.path.join(os.path.dirname(path), v["file"]))
                 for v in [*splits.values(), *manifest.get("views", {}).values()])
  if manifest.get("backbone", {}).get("checkpoint_sha256") == sha and len(splits) == 3 \
      and files_ok and manifest.get("rotated_splits", []) == sorted(rotated_splits) \
      and sorted(manifest.get("views", {})) == sorted(view_splits):
    print(f"embeddings already extracted from backbone {sha[:12]}: reusing {path}")
    return manifest
  return None


def cached_learner(root, model, ways, shots, steps, extra_flags, manifest, run,
                   num_episodes, episode_seed):
  """run(extra_flags) unless this exact learner run already finished (resume after a kill).

  The key is the learner, setting, steps, flags, test episodes and the
  embeddings' hashes; a run directory left by a different key is removed first.
  """
  run_dir = os.path.join(root, f"{model}_{ways}w{shots}s")
  key = {"model": model, "ways": ways, "shots": shots, "steps": steps, "flags": extra_flags,
         "num_episodes": num_episodes, "episode_seed": episode_seed,
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


def parse_settings(settings):
  """((ways, shots), ...) of ['5w1s', ...]."""
  try:
    return tuple(tuple(int(v) for v in s.rstrip("s").split("w")) for s in settings)
  except ValueError:
    raise errors.ConfigError(f"--settings={list(settings)}: use e.g. 5w1s,20w1s") from None


def run(options: Options):
  """Runs the five stages into options.work_dir; the text of results.md."""
  o = options
  started = time.time()
  omniglot_dir = o.omniglot_dir or class_splits.default_omniglot_dir()
  archives = [os.path.join(omniglot_dir, name) for name in o.archives if name]
  missing = [a for a in archives if not os.path.exists(a)]
  if missing or not archives:
    raise errors.DataError(f"{missing[0] if missing else '--archives'}: Omniglot archive not "
                           f"found; pass --omniglot_dir or set {class_splits.OMNIGLOT_ENV}, "
                           "and --archives")
  work = os.path.abspath(o.work_dir)
  settings = parse_settings(o.settings)
  timings = {}
  ledger_path = os.path.join(work, "stage_seconds.json")
  if os.path.exists(ledger_path):
    with open(ledger_path) as handle:
      timings["_invocation"] = json.load(handle).get("invocations", 0) + 1

  # 1. data and pretraining.
  by_class, split_classes, origin = class_splits.load_labelled_splits(archives, o.split,
                                                                    omniglot_dir)
  print(f"{origin}: " + ", ".join(f"{k} {len(v)} classes" for k, v in split_classes.items()))
  pretrain_classes = split_classes["train"]
  if o.metatrain_holdout:  # the learners meta-train on classes the backbone never saw
    pretrain_classes, held = class_splits.hold_out(
        split_classes["train"], o.metatrain_holdout, o.seed, max(w for w, _ in settings))
    split_classes = dict(split_classes, train=held)
    print(f"--metatrain_holdout={o.metatrain_holdout}: pretraining on {len(pretrain_classes)} "
          f"classes, meta-training on the other {len(held)}")
  config = dataclasses.replace(RECIPE, backbone=o.backbone, epochs=o.epochs,
                               batch_size=o.batch_size, learning_rate=o.learning_rate,
                               seed=o.seed, augment=o.augment, max_shift=o.max_shift,
                               head=o.head)
  decode = images_lib.DecodeOptions(config.image_size, config.channels, (105, 105),
                                        ("1", "L"))
  images, labels, _ = pipeline.decode_classes(by_class, pretrain_classes, decode)
  val_images, val_labels, _ = pipeline.decode_classes(by_class, split_classes["val"],
                                                      decode)
  trainer = train_lib.Pretrainer(config, images, labels, os.path.join(work, "pretrain"),
                                 class_names=pretrain_classes)
  t0 = time.time()
  callback = (pipeline.val_ncm_callback(val_images, val_labels, config.invert,
                                        o.val_episodes) if o.val_episodes else None)
  summary = trainer.train(epoch_callback=callback)
  timings["pretrain_s"] = time.time() - t0
  stage_done("pretrain", timings, ledger_path)
  backbone_run = os.path.join(work, "pretrain")
  if o.distill_generations:
    t0 = time.time()
    for generation in range(1, o.distill_generations + 1):
      student_run = os.path.join(work, f"pretrain_gen{generation}")
      student = dataclasses.replace(config, teacher=backbone_run,
                                    distill_alpha=o.distill_alpha,
                                    distill_temperature=o.distill_temperature)
      print(f"distillation generation {generation}: teacher {backbone_run}", flush=True)
      summary = train_lib.Pretrainer(student, images, labels, student_run,
                                     class_names=pretrain_classes).train(
                                         epoch_callback=callback)
      backbone_run = student_run
    timings["distill_s"] = time.time() - t0
    stage_done("distill", timings, ledger_path)

  # 2. extraction.
  t0 = time.time()
  data_path = os.path.join(work, "embeddings")
  rotated = ["train"] if o.metatrain_rotations else []
  viewed = ["train"] if o.metatrain_views else []
  manifest = extracted_manifest(data_path, o.crop, summary, rotated, viewed)
  if manifest is None:  # not yet extracted from this backbone (a resumed run skips it)
    manifest = extract.extract_embeddings(
        os.path.join(backbone_run, "backbone"), by_class, split_classes, data_path, DATASET,
        o.crop, "pkl", 256, expected_size=(105, 105), allowed_modes=("1", "L"),
        sources=archives, split_origin=origin, rotated_splits=rotated, view_splits=viewed)
  timings["extract_s"] = time.time() - t0
  stage_done("extract", timings, ledger_path)

  # 3. baselines on meta-test.
  t0 = time.time()
  test = embeddings_lib.load_dataset_split(data_path, DATASET, o.crop, "test")
  label = BACKBONE_LABELS.get(o.backbone, o.backbone)
  rows = pipeline.evaluate_baselines(test, f"{label} embeddings", settings,
                                     num_episodes=o.num_episodes, seed=o.episode_seed)
  if o.pixel_baseline:
    pixels = pipeline.pixel_split(by_class, split_classes["test"], 28, True)
    rows += pipeline.evaluate_baselines(pixels, "raw pixels", settings,
                                        num_episodes=o.num_episodes,
                                        seed=o.episode_seed, methods=("ncm_cosine",))
  # How hard meta-training's episodes are next to meta-val's and meta-test's
  # (meta-test's are the rows above).
  baseline = f"ncm_cosine ({label} embeddings)"
  by_split = {name: embeddings_lib.load_dataset_split(data_path, DATASET, o.crop, name)
              for name in ("train", "val")}
  split_rows = (gap.ncm_by_split(by_split, settings, o.num_episodes, o.episode_seed)
                + gap.tagged([r for r in rows if r["method"] == baseline], "test"))
  timings["baselines_s"] = time.time() - t0
  stage_done("baselines", timings, ledger_path)
  for row in rows:
    print(f"{row['method']:<45} {row['setting']:>6}: {row['accuracy']:.2f} ± {row['ci95']:.2f}")

  # 4. learners through runner.py.
  t0 = time.time()
  learners_root = os.path.join(work, "learners")
  jobs = [(model, ways, shots) for model in o.learners if model for ways, shots in settings]
  # Two runs at once on two cores: one thread pool each, not two pools sized to
  # every core (SNAIL 5w1s, two runs at once: 12.1 -> 15.2 steps/s each).
  threads = (max(1, (os.cpu_count() or 1) // o.parallel_learners)
             if o.parallel_learners > 1 else None)

  def run_job(job):
    model, ways, shots = job
    preset = omniglot_presets.learner_preset(model, ways, shots, o.backbone)
    steps = o.runner_steps or preset["steps"]
    if "skip" in preset:
      print(f"{model} {ways}w{shots}s: skipped ({preset['skip']})", flush=True)
      return {"method": f"{model} (runner.py)", "setting": f"{ways}w{shots}s", "model": model,
              "status": f"skipped: {preset['skip']}"}
    result = cached_learner(
        learners_root, model, ways, shots, steps, preset["flags"] + list(o.runner_flag) + (
            [f"--metatrain_views={o.metatrain_views}"] if o.metatrain_views else []),
        manifest,
        lambda flags_: pipeline.run_learner(model, data_path, DATASET, ways, shots,
                                            learners_root, steps, o.num_episodes,
                                            seed=o.episode_seed, extra_flags=flags_,
                                            crop=o.crop, threads=threads),
        o.num_episodes, o.episode_seed)
    print(f"{model} {ways}w{shots}s ({steps} steps): " + (
        f"{result['accuracy']:.2f} ± {result['ci95']:.2f}, best val "
        f"{result.get('val_accuracy', float('nan')):.2f} @ step {result.get('best_step')}, "
        f"{result.get('seconds', 0):.0f} s" if "accuracy" in result else str(result)),
        flush=True)
    return {"method": f"{model} (runner.py)", "setting": f"{ways}w{shots}s", "steps": steps,
            **result}

  # Longest first (preset steps as the proxy), so that a long run does not start
  # last beside an idle slot; the table keeps the learners' order.
  def steps_of(job):
    return o.runner_steps or omniglot_presets.learner_preset(*job, o.backbone)["steps"]

  by_length = sorted(jobs, key=lambda job: -steps_of(job))
  with concurrent.futures.ThreadPoolExecutor(max(1, o.parallel_learners)) as pool:
    finished = dict(zip(by_length, pool.map(run_job, by_length)))
  learner_rows = [finished[job] for job in jobs]
  rows += learner_rows
  for model in dict.fromkeys(m for m, _, _ in jobs):
    timings[f"learner_{model}_s"] = sum(r.get("seconds", 0.0) for r in learner_rows
                                        if r["method"] == f"{model} (runner.py)")
  timings["learners_s"] = time.time() - t0
  stage_done("learners", timings, ledger_path)
  timings["total_s"] = time.time() - started
  with open(ledger_path) as handle:
    ledger = json.load(handle)
  timings.pop("_invocation", None)

  # 5. the table and its notes.
  table = results.results_table(rows, settings)
  history = summary.get("history") or []
  test_alphabets = sorted({name.split("/")[0] for name in split_classes["test"]})
  title = "Omniglot-small" if o.split == "omniglot_small" else f"Omniglot ({origin})"
  notes = (f"{title} meta-test ({', '.join(test_alphabets)}, {test.num_classes} characters), "
           f"{o.num_episodes} fixed episodes (seed {o.episode_seed}), 15 queries "
           f"per class, accuracy % ± 95% CI; learner cells add the best validation accuracy "
           f"(meta-val alphabets) @ its step, the checkpoint evaluated. {label} pretrained "
           f"{o.epochs} epochs (augment {o.augment}, {o.head} head) on "
           f"{len(pretrain_classes)} meta-train characters x 4 rotations"
           + results.metatrain_note(o, len(split_classes["train"]), manifest)
           + (f", then {o.distill_generations} born-again generation(s) of the same "
              f"recipe distilled from the previous one (alpha {o.distill_alpha}, "
              f"T {o.distill_temperature})" if o.distill_generations else "") + "; "
           f"embeddings: {o.crop} crop ({image_views.CROP_DESCRIPTIONS[o.crop]})"
           + (f" (final train loss {history[-1]['loss']:.3f})" if history else "") +
           f"; backbone sha256 {manifest['backbone']['checkpoint_sha256'][:12]}. "
           f"Stage wall times, summed over the {ledger.get('invocations', 1)} invocation(s) "
           f"that built this directory: " + ", ".join(
               f"{k} {ledger[k] / 60:.1f} min" for k in STAGES if k in ledger) +
           f"; total {sum(ledger.get(k, 0) for k in STAGES) / 60:.1f} min. Learner runs (train "
           f"+ evaluate, {o.parallel_learners} at a time"
           + (f", {compare.thread_settings(threads)['TF_NUM_INTRAOP_THREADS']} TensorFlow "
              f"thread(s) each" if threads else "") + "): " + ", ".join(
               f"{k[8:-2]} {v:.0f} s" for k, v in timings.items() if k.startswith("learner_"))
           + ".")
  verdict = results.against_baseline(rows, baseline, settings)
  learner_gaps = gap.learner_table(rows)
  text = (table + "\n\n" + (verdict + "\n\n" if verdict else "") + notes + "\n\n"
          + "How hard the episodes are: cosine nearest class mean on each split's episodes "
          + f"({o.num_episodes} per setting, seed {o.episode_seed}).\n\n"
          + gap.ncm_table(split_rows, settings) + "\n"
          + ("\nLearners on their meta-train batches and on meta-val (accuracy %).\n\n"
             + learner_gaps + "\n" if learner_gaps else ""))
  fileio.atomic_write_text(os.path.join(work, "results.md"), text)
  pipeline.write_json(os.path.join(work, "results.json"),
                      {"rows": rows, "ncm_by_split": split_rows, "timings": timings,
                       "pretrain": summary,
                       "manifest": manifest})
  return text
