"""Your own tasks from the command line: whole-source extraction keyed by file
path, one loader for every support/query form, scripts/predict.py on images
and embeddings, one task or a folder of many, agreeing with the exported
SavedModel and with the runner's evaluation path; bad input is one line."""

import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.models import backbones
from leo_suite.models import image_embedder
from leo_suite.pretrain import classifier as classifier_lib
from leo_suite.pretrain import extract_files
from leo_suite.pretrain import pretrain_config
from leo_suite.serving import export
from leo_suite.serving import predict
from leo_suite.serving import sets
from leo_suite.training import run as run_lib
from tests import test_serving as serving

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K = serving.N, serving.K
# Class folders and file names a user may well have: spaces, dashes,
# underscores, dots, non-ASCII.
CLASSES = ("cat", "dog-2 big", "ünï_cörn.v2")
QUERY_FILES = ("q 1-a_b.c.png", "日本 ü.png")
HOSTILE = ("my file-1_a.b.png", "..x .png", "ü ñ 日本.PNG", "a_5fb-_2d.png", "%20 +&=.png")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _noisy(rng, proto, spread):
  return np.clip(proto.astype(int) + rng.integers(-spread, spread, proto.shape), 0,
                 255).astype(np.uint8)


def _write(root, files):
  """{relative path: bytes} -> files under `root`."""
  for relative, payload in files.items():
    path = os.path.join(str(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
      handle.write(payload)


def _csv(path, rows):
  with open(path, "w", encoding="utf-8", newline="") as handle:
    handle.write("file,label\n")
    for file, label in rows:
      handle.write(f'"{file}","{label}"\n')


def _script(name, *args):
  return scripts_run.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                         capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny Conv-4 backbone, a LEO run on its 64-d features, image sets in every form."""
  root = tmp_path_factory.mktemp("predict")
  tf.keras.utils.set_random_seed(0)
  backbone = backbones.build_backbone("conv4", 28, 1)
  config = pretrain_config.PretrainConfig(backbone="conv4", image_size=28, channels=1, invert=True)
  classifier_lib.export_backbone(backbone, config, str(root / "backbone"))
  dim = int(backbone.output_shape[-1])
  serving.make_run(root / "run", "leo", steps=1, dim=dim)
  rng = np.random.default_rng(3)
  protos = rng.integers(0, 256, [N, 28, 28], np.uint8)
  support = {f"{c}/{i}.png": serving._png(_noisy(rng, p, 40))  # pylint: disable=protected-access
             for c, p in zip(CLASSES, protos) for i in range(K)}
  query = {f"{c}/{f}": serving._png(_noisy(rng, p, 70))  # pylint: disable=protected-access
           for c, p in zip(CLASSES, protos) for f in QUERY_FILES}
  _write(root / "support", support)
  _write(root / "query", query)
  # The same support images as a flat folder + labels.csv (same order within a class).
  flat = {relative.replace("/", "_"): payload for relative, payload in support.items()}
  _write(root / "flat", flat)
  _csv(root / "flat" / sets.LABELS_CSV, [(f, f.rsplit("_", 1)[0]) for f in flat])
  world = types.SimpleNamespace(root=root, backbone_dir=str(root / "backbone"),
                                run_dir=str(root / "run"), dim=dim, support=support,
                                query=query)
  world.predictor = predict.Predictor(world.run_dir, world.backbone_dir)
  return world


def _extract(world, source, out, fmt="pkl"):
  """extract_all in process: (manifest, path of the embeddings file)."""
  records = extract_files.scan_all([str(source)])
  name = extract_files.default_dataset_name([str(source)])
  manifest = extract_files.extract_all(world.backbone_dir, records, str(out), name,
                                       fmt=fmt, log=lambda _: None)
  return manifest, os.path.join(str(out), name, "center", f"all_embeddings.{fmt}")


@pytest.fixture(scope="module")
def extracted(world):
  """support/ via the CLI with no --split (.pkl), support/ (.npz) and query/ in process."""
  out = world.root / "emb"
  proc = _script("extract_embeddings.py", f"--backbone_dir={world.backbone_dir}",
                 f"--source={world.root / 'support'}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "all_embeddings.pkl (6 images, 3 classes)" in proc.stdout
  _, npz = _extract(world, world.root / "support", world.root / "emb_npz", fmt="npz")
  _, query = _extract(world, world.root / "query", world.root / "emb")
  return types.SimpleNamespace(pkl=str(out / "support" / "center" / "all_embeddings.pkl"),
                               npz=npz, query=query)


# -- keys that keep the file path -------------------------------------------------------
@pytest.mark.parametrize("path", HOSTILE + ("deep/er/ß-_.x/f.png", "plain.png", "x\udcff.png"))
def test_path_key_round_trip_on_hostile_names(path):
  key = embedding_keys.make_path_key("cls", path)
  assert key.isascii() and key.count("-") == 2
  assert embedding_keys.parse_key(key, "k", 0)[0] == "cls"
  assert embedding_keys.key_file_path(key) == path
  assert embedding_keys.decode_path(embedding_keys.encode_path(path)) == path


def test_path_key_decoding_is_strict():
  for text in ("a_zz.png", "a_4", "a b", "_2F"):   # never written by encode_path
    with pytest.raises(ValueError):
      embedding_keys.decode_path(text)
  assert embedding_keys.key_file_path("train-cat-cat_00001.png") is None   # no path kept


def test_whole_source_extraction_keeps_paths_and_lists_files(world, tmp_path):
  """Hostile names, a class tree and images in no folder: keys decode to the paths."""
  rng = np.random.default_rng(0)
  files = {name: serving._png(rng.integers(0, 256, [28, 28], np.uint8))  # pylint: disable=protected-access
           for name in HOSTILE + ("Ünï-cls_1/sub dir/x-y_z.png", "cat/a.png")}
  _write(tmp_path / "my photos", files)
  manifest, path = _extract(world, tmp_path / "my photos", tmp_path / "out")
  assert path.endswith(os.path.join("my_photos", "center", "all_embeddings.pkl"))
  assert set(manifest["files"]) == set(files)
  keys, matrix = embeddings_lib.read_keys_and_embeddings(path)
  assert matrix.shape == (len(files), world.dim)
  for row, key in enumerate(keys):
    assert manifest["files"][embedding_keys.key_file_path(key)] == row
  # Images in no folder are `unlabelled` (no class); folders are classes.
  assert manifest["class_names"]["unlabelled"] == ""
  assert sorted(manifest["class_names"].values()) == ["", "cat", "Ünï-cls_1/sub dir"]
  loaded = sets.load_set(path, "query")
  assert dict(zip(loaded.files, loaded.labels)) == {
      f: (os.path.dirname(f) or None) for f in files}


# -- one loader, every form ---------------------------------------------------------------
def test_every_support_form_gives_identical_predictions(world, extracted):
  forms = {"tree": str(world.root / "support"), "flat+csv": str(world.root / "flat"),
           "csv file": str(world.root / "flat" / sets.LABELS_CSV),
           "pkl": extracted.pkl, "npz": extracted.npz}
  results = {name: world.predictor.predict_task(path, str(world.root / "query"))
             for name, path in forms.items()}
  reference = results["tree"]
  assert reference.classes == tuple(sorted(CLASSES)) and reference.num_labelled == 6
  for name, result in results.items():
    assert result.classes == reference.classes, name
    assert result.files == reference.files and result.predicted == reference.predicted, name
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-6,
                               err_msg=name)
  # Embeddings on both sides: no backbone needed, the same predictions.
  on_embeddings = predict.Predictor(world.run_dir)
  result = on_embeddings.predict_task(extracted.pkl, extracted.query)
  assert on_embeddings.description()["backbone"] is None
  assert result.files == reference.files and result.labels == reference.labels
  np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-6)
  # Export reads the same forms through the same loader.
  for path in (forms["flat+csv"], extracted.npz):
    loaded, _, _ = export.load_support(path, world.backbone_dir)
    expected = sets.load_set(forms["tree"], "support", world.predictor.embedder(path))
    np.testing.assert_allclose(loaded.embeddings, expected.to_support().embeddings, atol=1e-6)


def test_predict_export_and_runner_evaluation_agree_on_an_image(world, extracted, tmp_path):
  """One set of query images through predict, the SavedModel and learner.adapt/predict."""
  result = world.predictor.predict_task(str(world.root / "support"), str(world.root / "query"))
  # The exported SavedModel, sent the query files' bytes.
  support, model, description = export.load_support(str(world.root / "support"),
                                                    world.backbone_dir)
  exported = export.export_classifier(world.run_dir, support, str(tmp_path / "serve"),
                                      backbone=model, backbone_description=description)
  loaded = tf.saved_model.load(exported.path)
  served = loaded.signatures["serving_default"](
      images=tf.constant([world.query[f] for f in result.files]))
  np.testing.assert_allclose(served["probabilities"].numpy(), result.probabilities, atol=1e-5)
  assert [c.decode() for c in served["classes"].numpy()] == result.predicted
  # The runner's evaluation path: extracted embeddings, L2-normalised rows as the
  # sampler's table, learner.adapt/predict in eval mode with the zero seed.
  learner, _ = run_lib.Run.open(world.run_dir).restored_learner()
  support_split = embeddings_lib.load_split(extracted.pkl)
  query_keys, query_rows = embeddings_lib.read_keys_and_embeddings(extracted.query)
  order = [query_keys.index(k) for f in result.files for k in query_keys
           if embedding_keys.key_file_path(k) == f]

  def sampler_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
  support_x = sampler_rows(support_split.embeddings).reshape(1, N, K, world.dim)
  support_y = np.tile(np.arange(N, dtype=np.int32)[:, None], [1, K])[None]
  zero = tf.zeros([2], tf.int32)
  state = learner.adapt(tf.constant(support_x), tf.constant(support_y), training=False,
                        seed=zero)
  logits = learner.predict(state, tf.constant(sampler_rows(query_rows[order])[None, None]),
                           training=False, seed=zero)
  runner = tf.nn.softmax(tf.reshape(logits, [-1, N])).numpy()
  assert support_split.class_names == ["cat", "dog2big", "ncrnv2"]   # tokens, in class order
  np.testing.assert_allclose(runner, result.probabilities, atol=1e-5)
  assert list(runner.argmax(-1)) == list(result.probabilities.argmax(-1))


# -- the run names its backbone --------------------------------------------------------
def test_backbone_comes_from_the_runs_data_manifest(world, extracted, tmp_path):
  run_dir = str(tmp_path / "run")
  shutil.copytree(world.run_dir, run_dir)
  with open(os.path.join(run_dir, "config.json")) as handle:
    record = json.load(handle)
  # As if the run had been trained on <emb>/support/center/*_embeddings.pkl.
  record["data"]["data_path"] = str(world.root / "emb")
  record["settings"]["dataset_name"] = "support"
  with open(os.path.join(run_dir, "config.json"), "w") as handle:
    json.dump(record, handle)
  result = predict.Predictor(run_dir).predict_task(str(world.root / "support"),
                                                   str(world.root / "query"))
  reference = world.predictor.predict_task(str(world.root / "support"),
                                           str(world.root / "query"))
  np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-6)
  # Another backbone than the one that made the run's embeddings is refused.
  tf.keras.utils.set_random_seed(1)
  other = str(tmp_path / "other_backbone")
  classifier_lib.export_backbone(backbones.build_backbone("conv4", 28, 1),
                                 pretrain_config.PretrainConfig(image_size=28, channels=1), other)
  with pytest.raises(errors.ConfigError, match="differ from the"):
    predict.Predictor(run_dir, other).predict_task(str(world.root / "support"),
                                                   str(world.root / "query"))


# -- many tasks, through the command line ----------------------------------------------
@pytest.mark.slow   # a scripts/predict.py subprocess (TensorFlow start-up)
def test_task_folder_in_one_call_with_progress_and_mean_accuracy(world, extracted, tmp_path):
  tasks = tmp_path / "tasks"
  shutil.copytree(world.root / "support", tasks / "a_tree" / "support")
  shutil.copytree(world.root / "query", tasks / "a_tree" / "query")
  # b: support.csv naming images in a sub-folder; an unlabelled flat query folder.
  shutil.copytree(world.root / "flat", tasks / "b_csv" / "imgs")
  _csv(tasks / "b_csv" / "support.csv",
       [(f"imgs/{f}", f.rsplit("_", 1)[0]) for f in sorted(os.listdir(world.root / "flat"))
        if f.endswith(".png")])
  _write(tasks / "b_csv" / "query", {f.replace("/", "__"): b for f, b in world.query.items()})
  # c: embeddings for both (the manifest beside them gives the original names).
  (tasks / "c_emb").mkdir()
  shutil.copy(extracted.pkl, tasks / "c_emb" / "support.pkl")
  shutil.copy(os.path.join(os.path.dirname(extracted.pkl), "manifest.json"), tasks / "c_emb")
  shutil.copy(extracted.query, tasks / "c_emb" / "query.pkl")
  out = tmp_path / "preds.json"
  proc = _script("predict.py", f"--checkpoint_path={world.run_dir}", f"--tasks={tasks}",
                 f"--backbone_dir={world.backbone_dir}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "predict: 3/3 tasks" in proc.stderr and "tasks/s, ETA" in proc.stderr
  reference = world.predictor.predict_task(str(world.root / "support"),
                                           str(world.root / "query"))
  lines = proc.stdout.splitlines()
  assert any(line.startswith("a_tree: ") and "of 6 queries (3-way 2-shot)" in line
             for line in lines)
  assert any(line.startswith("mean accuracy: ") and "(2 tasks)" in line for line in lines)
  report = json.loads(out.read_text())
  assert [t["task"] for t in report["tasks"]] == ["a_tree", "b_csv", "c_emb"]
  assert report["tasks"][1]["accuracy"] is None and report["accuracy"]["num_tasks"] == 2
  assert report["accuracy"]["accuracy"] == pytest.approx(reference.accuracy)
  assert report["model"] == "leo" and report["backbone"]["weights_sha256"]
  for task in report["tasks"]:
    by_file = {p["file"].replace("__", "/"): p for p in task["predictions"]}
    assert sorted(by_file) == sorted(reference.files)
    for file, probs in zip(reference.files, reference.probabilities):
      got = by_file[file]
      assert got["predicted"] == reference.predicted[reference.files.index(file)]
      np.testing.assert_allclose([got["probabilities"][c] for c in reference.classes], probs,
                                 atol=1e-5)
  # The same call as CSV on stdout: one row per query, class/probability pairs.
  rows = predict.as_csv([reference]).splitlines()
  assert rows[0] == ("task,file,label,predicted,correct,class_1,prob_1,class_2,prob_2,"
                     "class_3,prob_3")
  assert len(rows) == 1 + len(reference.files)


# -- bad input: one line, nothing written ------------------------------------------------
def test_bad_inputs_are_one_line_errors(world, extracted, tmp_path):
  p = world.predictor
  query = str(world.root / "query")

  def refused(fn, match, kind=errors.UserError):
    with pytest.raises(kind, match=match) as info:
      fn()
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000
    return str(info.value)

  # Unequal shots: names the counts and --num_shots; --num_shots then works.
  uneven = tmp_path / "uneven"
  shutil.copytree(world.root / "support", uneven)
  shutil.copy(uneven / "cat" / "0.png", uneven / "cat" / "2.png")
  text = refused(lambda: p.predict_task(str(uneven), query), "unequal shots")
  assert "'cat' has 3" in text and "--num_shots=2" in text
  assert predict.Predictor(world.run_dir, world.backbone_dir, num_shots=2).predict_task(
      str(uneven), query).num_shots == 2
  # A flat support folder without labels; labels.csv problems.
  _write(tmp_path / "nolabels", {"a.png": world.support["cat/0.png"]})
  refused(lambda: p.predict_task(str(tmp_path / "nolabels"), query), "'a.png' has no label")
  _write(tmp_path / "badcsv", {"a.png": world.support["cat/0.png"]})
  (tmp_path / "badcsv" / "labels.csv").write_text("image;class\na.png;cat\n")
  refused(lambda: p.load(str(tmp_path / "badcsv"), "support"), "header 'file,label'")
  _csv(tmp_path / "badcsv" / "labels.csv", [("a.png", "cat"), ("gone.png", "dog")])
  refused(lambda: p.load(str(tmp_path / "badcsv"), "support"), "1 listed image.*gone.png")
  # A corrupt image names its file.
  _write(tmp_path / "corrupt", dict(world.support, **{"cat/1.png": b"not a png"}))
  refused(lambda: p.predict_task(str(tmp_path / "corrupt"), query),
          r"cat/1\.png: unreadable or corrupt image")
  # Two classes for a 3-way learner; a query label that is no support class.
  two = tmp_path / "two"
  _write(two, {f: b for f, b in world.support.items() if not f.startswith("cat/")})
  refused(lambda: p.predict_task(str(two), query), "2 classes .* is 3-way")
  _write(tmp_path / "zebra", {"z.png": world.query["cat/" + QUERY_FILES[0]]})
  _csv(tmp_path / "zebra" / "labels.csv", [("z.png", "zebra")])
  refused(lambda: p.predict_task(str(world.root / "support"), str(tmp_path / "zebra")),
          "'z.png' has label 'zebra', which is not a support class")
  # Images without a backbone (the run's data manifest names none); missing paths.
  refused(lambda: predict.Predictor(world.run_dir).predict_task(
      str(world.root / "support"), query), "pass --backbone_dir", errors.ConfigError)
  refused(lambda: p.predict_task(str(tmp_path / "nope"), query), "no such file or directory")
  refused(lambda: predict.check_output("preds.txt"), r"\.csv or \.json")
  refused(lambda: predict.plan(world.run_dir, "s", None, None), "pass --support=... and --query")
  refused(lambda: predict.plan(world.run_dir, "s", "q", "tasks"), "--tasks replaces")
  (tmp_path / "tasks" / "t1" / "support").mkdir(parents=True)
  refused(lambda: predict.find_tasks(str(tmp_path / "tasks")), "no query set")
  # D of an embeddings file that is not the run's.
  keys = [embedding_keys.make_key(c, i) for c in ("a", "b", "c") for i in range(K)]
  embeddings_lib.write_split(str(tmp_path / "d8.npz"), keys, np.ones([len(keys), 8]))
  refused(lambda: p.load(str(tmp_path / "d8.npz"), "support"), "D=8 but .* D=64")


@pytest.mark.slow   # a scripts/predict.py subprocess (TensorFlow start-up)
def test_cli_error_is_one_line_exit_2_and_writes_nothing(world, tmp_path):
  """Task 2 of 2 fails after task 1 succeeded: no output file at all."""
  tasks = tmp_path / "tasks"
  for name in ("t1", "t2"):
    shutil.copytree(world.root / "support", tasks / name / "support")
    shutil.copytree(world.root / "query", tasks / name / "query")
  shutil.copy(tasks / "t2" / "support" / "cat" / "0.png", tasks / "t2" / "support" / "cat" / "9.png")
  out = tmp_path / "preds.csv"
  proc = _script("predict.py", f"--checkpoint_path={world.run_dir}", f"--tasks={tasks}",
                 f"--backbone_dir={world.backbone_dir}", f"--output={out}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "unequal shots" in last and "--num_shots=2" in last
  assert not os.path.exists(out) and os.listdir(tmp_path) == ["tasks"]


def test_warps_crop_is_per_image_and_the_export_embeds_images_the_same_way(world):
  """The 'warps' crop (center view + 15 fixed affine warps, averaged): an image's
  features do not depend on its batch, view 0 is the image itself, and the
  SavedModel's image path computes what extraction wrote."""
  from leo_suite.data import image_views  # pylint: disable=g-import-not-at-top
  records = extract_files.scan_all([str(world.root / "query")])
  warped = image_embedder.ImageEmbedder(world.backbone_dir, "warps", batch_size=3)(records, "q")
  alone = image_embedder.ImageEmbedder(world.backbone_dir, "warps", batch_size=1)(records, "q")
  center = image_embedder.ImageEmbedder(world.backbone_dir, "center")(records, "q")
  np.testing.assert_allclose(warped, alone, rtol=1e-5, atol=1e-6)
  assert np.abs(warped - center).max() > 1e-3 * np.abs(center).max()   # the views differ
  x = tf.random.uniform([2, 28, 28, 1], seed=1)
  views = image_views.make_views(x, "warps", 28)
  assert views.shape[0] == 2 * image_views.WARP_VIEWS
  np.testing.assert_array_equal(views[::image_views.WARP_VIEWS].numpy(), x.numpy())
  # Same warps for both images: a view of image 1 is the same warp of image 1.
  swapped = image_views.make_views(tf.reverse(x, [0]), "warps", 28)
  np.testing.assert_allclose(swapped[:image_views.WARP_VIEWS].numpy(),
                             views[image_views.WARP_VIEWS:].numpy(), atol=1e-6)
  # The exported module embeds sent image bytes with the same crop.
  support, model, description = export.load_support(str(world.root / "support"),
                                                    world.backbone_dir, crop="warps")
  restored = export.restore_learner(run_lib.Run.open(world.run_dir))
  module = export.AdaptedClassifier(restored.learner, support, model, description, "warps")
  sent = tf.constant([world.query[extract_files.relative_path(r)] for r in records])
  np.testing.assert_allclose(module.embed_images(sent).numpy(), warped, rtol=1e-5, atol=1e-5)
