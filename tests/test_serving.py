"""Serving exports: every learner's SavedModel, loaded by plain TensorFlow in a
fresh process, reproduces the in-process learner; TF Serving layout, versions,
REST bodies and gRPC protos; clear errors with nothing written."""

import base64
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data.episodes import Episode
from leo_suite.models import registry
from leo_suite.serving import export
from leo_suite.serving import latency
from leo_suite.serving import rest
from leo_suite.serving import support as support_lib
from leo_suite.training import run as run_lib
from leo_suite.training import settings as settings_lib
from leo_suite.training import trainer as trainer_lib
from tests import learner_checks

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K, D = 3, 2, 16
NUM_QUERIES = 5
TINY = learner_checks.SMALL_CONFIGS
CLASS_NAMES = ("cat", "dog", "owl")
ZERO_SEED = tf.zeros([2], tf.int32)


# -- helpers ------------------------------------------------------------------------
def random_episode(rng, dim, batch=2):
  def norm(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  centers = rng.standard_normal([batch, N, 1, dim])
  labels = np.tile(np.arange(N, dtype=np.int32)[None, :, None], [batch, 1, K])
  return Episode(norm(centers + 0.5 * rng.standard_normal([batch, N, K, dim])), labels,
                 norm(centers + 0.5 * rng.standard_normal([batch, N, K, dim])), labels)


def make_run(run_dir, model, steps=2, dim=D, seed=0):
  """A runner-style run directory (config.json + CheckpointManager checkpoints)."""
  shutil.rmtree(run_dir, ignore_errors=True)  # a new run (a failed earlier build may have left one)
  config = registry.spec(model).config_class(**TINY[model])
  settings = settings_lib.default_settings(model, config, num_classes=N,
                                      num_tr_examples_per_class=K, seed=seed, outer_lr=1e-2)
  run = run_lib.Run.new(str(run_dir), settings, dim, {"data_path": "", "sha256": {}})
  learner = run.build_learner()
  trainer = trainer_lib.Trainer(learner, trainer_lib.TrainConfig.from_run(run), None)
  run.create()
  rng = np.random.default_rng(seed)
  for step in range(steps):
    trainer.train_step(random_episode(rng, dim), step)
  trainer.manager.save(checkpoint_number=steps)
  return learner, trainer


def normalise(x):
  return tf.math.l2_normalize(tf.constant(x, tf.float32), axis=-1)


def reference_logits(learner, support_x, queries):
  """In-process learner: adapt on support [N, K, D], logits [batch, N] of queries."""
  labels = tf.tile(tf.range(N, dtype=tf.int32)[:, None], [1, support_x.shape[1]])[None]
  state = learner.adapt(normalise(support_x)[None], labels, training=False, seed=ZERO_SEED)
  logits = learner.predict(state, normalise(queries)[None, None], training=False,
                           seed=ZERO_SEED)
  return tf.reshape(logits, [-1, N]).numpy()


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def support_set(rng, dim=D, shots=K):
  centers = 2.0 * rng.standard_normal([N, 1, dim])
  x = (centers + rng.standard_normal([N, shots, dim])).astype(np.float32)
  return support_lib.SupportSet(CLASS_NAMES, x, "test-support")


class Exports:
  """Runs and exports built on first use, one per learner (module-scoped cache)."""

  def __init__(self, root):
    self.root = str(root)
    self.rng = np.random.default_rng(42)
    self.queries = self.rng.standard_normal([NUM_QUERIES, D]).astype(np.float32)
    self._entries = {}

  def run_dir(self, model):
    self[model]
    return os.path.join(self.root, "runs", model)

  def __getitem__(self, model):
    if model not in self._entries:
      self._entries[model] = self._build(model)
    return self._entries[model]

  def _build(self, model):
    """Trains 1-2 steps, exports, and computes the in-process reference outputs."""
    rng, queries = np.random.default_rng(sorted(registry.LEARNERS).index(model)), self.queries
    run_dir = os.path.join(self.root, "runs", model)
    learner, trainer = make_run(run_dir, model, steps=2 if model == "maml" else 1)
    entry = {}
    if model == "maml":   # best/ckpt must win over a later latest checkpoint
      trainer._save_best(2, types.SimpleNamespace(accuracy=0.5, ci95=0.0))  # pylint: disable=protected-access
      best_values = [v.numpy() for v in learner.trainable_variables]
      for step in (2, 3):
        trainer.train_step(random_episode(rng, D), step)
      trainer.manager.save(checkpoint_number=4)
    support = support_set(rng)
    exported = export.export_classifier(run_dir, support, os.path.join(self.root, "export"))
    if model == "maml":
      entry["latest_logits"] = reference_logits(learner, support.embeddings, queries)
      for variable, value in zip(learner.trainable_variables, best_values):
        variable.assign(value)
    # A second support set, flattened in a shuffled order, for adapt_and_predict.
    support2 = support_set(rng).embeddings
    flat_labels = np.repeat(np.arange(N, dtype=np.int32), K)
    order = rng.permutation(N * K)
    # adapt_and_predict groups it by class, keeping the given order within a class
    # (what it adapts on; order-dependent learners such as SNAIL read that order).
    grouped = support2.reshape(N * K, D)[order[np.argsort(flat_labels[order], kind="stable")]]
    entry.update(
        path=exported.path, version=exported.version, learner=learner,
        logits=reference_logits(learner, support.embeddings, queries),
        adapt_logits=reference_logits(learner, grouped.reshape(N, K, D), queries),
        support2_flat=support2.reshape(N * K, D)[order], support2_labels=flat_labels[order])
    return entry


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  return Exports(tmp_path_factory.mktemp("serving"))


CHILD = r'''
import json, sys
import numpy as np
import tensorflow as tf
spec = json.load(open(sys.argv[1]))
inputs = np.load(spec["inputs"])
queries = inputs["queries"]
out, report = {}, {}
def error_of(fn):
  try:
    fn()
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
    return type(exc).__name__ + ": " + str(exc)
  return None
for name, path in spec["models"].items():
  model = tf.saved_model.load(path)
  sigs = model.signatures
  pred = sigs["serving_default"](embeddings=tf.constant(queries))
  for key, value in pred.items():
    out[name + "/predict/" + key] = value.numpy().astype(str) if value.dtype == tf.string else value.numpy()
  examples = []
  for row in queries:
    ex = tf.train.Example()
    ex.features.feature["embedding"].float_list.value.extend(row.tolist())
    examples.append(ex.SerializeToString())
  cls = sigs["classify"](inputs=tf.constant(examples))
  out[name + "/classify/classes"] = cls["classes"].numpy().astype(str)
  out[name + "/classify/scores"] = cls["scores"].numpy()
  adapt = sigs["adapt_and_predict"](
      support_embeddings=tf.constant(inputs[name + "/support"]),
      support_labels=tf.constant(inputs[name + "/labels"]),
      query_embeddings=tf.constant(queries))
  for key, value in adapt.items():
    out[name + "/adapt/" + key] = value.numpy()
  d = queries.shape[1]
  report[name] = {
      "wrong_dim": error_of(lambda: sigs["serving_default"](embeddings=tf.zeros([2, d + 1]))),
      "wrong_dtype": error_of(lambda: sigs["serving_default"](embeddings=tf.zeros([2, d], tf.int32))),
      "wrong_rank": error_of(lambda: sigs["serving_default"](embeddings=tf.zeros([d]))),
      "unbalanced_labels": error_of(lambda: sigs["adapt_and_predict"](
          support_embeddings=tf.constant(inputs[name + "/support"]),
          support_labels=tf.zeros_like(tf.constant(inputs[name + "/labels"])),
          query_embeddings=tf.constant(queries))),
      "wrong_example_length": error_of(lambda: sigs["classify"](inputs=tf.constant(
          [tf.train.Example(features=tf.train.Features(feature={"embedding": tf.train.Feature(
              float_list=tf.train.FloatList(value=[0.0] * (d - 1)))})).SerializeToString()]))),
  }
report["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("leo_suite", "sonnet"))
np.savez(spec["out"], **out)
json.dump(report, open(spec["report"], "w"))
'''


# -- fresh-process equivalence -----------------------------------------------------
@pytest.fixture(scope="module")
def fresh_process(exports):
  """Every learner's export run once through CHILD in one fresh process: (out, report)."""
  root = exports.root
  models = {model: exports[model] for model in registry.LEARNERS}
  arrays = {"queries": exports.queries}
  for name, entry in models.items():
    arrays[name + "/support"] = entry["support2_flat"]
    arrays[name + "/labels"] = entry["support2_labels"]
  np.savez(os.path.join(root, "inputs.npz"), **arrays)
  spec = {"inputs": os.path.join(root, "inputs.npz"), "out": os.path.join(root, "out.npz"),
          "report": os.path.join(root, "report.json"),
          "models": {n: e["path"] for n, e in models.items()}}
  with open(os.path.join(root, "spec.json"), "w") as handle:
    json.dump(spec, handle)
  with open(os.path.join(root, "child.py"), "w") as handle:
    handle.write(CHILD)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  # cwd outside the repo and no PYTHONPATH: leo_suite is not even importable there.
  # A new interpreter (not scripts_run's fork, which has the library imported).
  proc = subprocess.run([sys.executable, os.path.join(root, "child.py"),
                         os.path.join(root, "spec.json")], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(spec["report"]) as handle:
    return dict(np.load(spec["out"])), json.load(handle)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(registry.LEARNERS))
def test_every_learner_export_matches_in_process_learner_in_fresh_tf_only_process(exports,
                                                                                  fresh_process,
                                                                                  model):
  out, report = fresh_process
  models = {model: exports[model]}
  assert report["modules"] == []
  queries = exports.queries
  for name, entry in models.items():
    logits = entry["logits"]
    assert np.abs(logits).max() > 0 and np.ptp(logits) > 1e-4, name  # not degenerate
    np.testing.assert_allclose(out[name + "/predict/logits"], logits, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out[name + "/predict/probabilities"], softmax(logits),
                               atol=1e-5, err_msg=name)
    expected_classes = np.asarray(CLASS_NAMES)[logits.argmax(-1)]
    np.testing.assert_array_equal(out[name + "/predict/classes"], expected_classes)
    np.testing.assert_array_equal(out[name + "/classify/classes"],
                                  np.tile(np.asarray(CLASS_NAMES), [len(queries), 1]))
    np.testing.assert_allclose(out[name + "/classify/scores"], softmax(logits), atol=1e-5)
    adapt_logits = entry["adapt_logits"]
    assert np.abs(adapt_logits - logits).max() > 1e-4, name   # really re-adapted
    np.testing.assert_allclose(out[name + "/adapt/logits"], adapt_logits, atol=1e-5,
                               err_msg=name)
    np.testing.assert_allclose(out[name + "/adapt/probabilities"], softmax(adapt_logits),
                               atol=1e-5)
    np.testing.assert_array_equal(out[name + "/adapt/class_ids"], adapt_logits.argmax(-1))
    errs = report[name]
    for case in ("wrong_dim", "wrong_rank"):
      assert f"not compatible with expected shape [?,{D}]" in (errs[case] or ""), (name, errs)
    assert "expected to be a float tensor but is a int32" in (errs["wrong_dtype"] or ""), errs
    assert f"exactly K={K}" in errs["unbalanced_labels"], errs["unbalanced_labels"]
    assert errs["wrong_example_length"] is not None and "embedding" in errs["wrong_example_length"]


def test_best_checkpoint_is_exported_not_the_later_latest(exports):
  entry = exports["maml"]
  assert np.abs(entry["latest_logits"] - entry["logits"]).max() > 1e-4  # they differ
  model = tf.saved_model.load(entry["path"])
  served = model.signatures["serving_default"](embeddings=tf.constant(exports.queries))
  np.testing.assert_allclose(served["logits"].numpy(), entry["logits"], atol=1e-5)


# -- layout and signatures as TF Serving / saved_model_cli see them ---------------
def test_layout_and_saved_model_cli_show_all(exports):
  entry = exports["maml"]
  path = entry["path"]
  assert os.path.basename(path) == "1" and os.path.basename(os.path.dirname(path)) == "maml"
  assert os.path.exists(os.path.join(path, "saved_model.pb"))
  assert os.path.exists(os.path.join(path, "variables", "variables.index"))
  info = export.read_export_info(path)
  assert info["class_names"] == list(CLASS_NAMES) and info["num_shots"] == K
  assert [n for n in os.listdir(os.path.dirname(path))] == ["1"]  # no temp dirs left
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  proc = scripts_run.run([cli, "show", "--all", "--dir", path], capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  blocks = {}
  for block in proc.stdout.split("signature_def[")[1:]:
    name = block.split("'")[1]
    blocks[name] = block
  expected = {
      "serving_default": {"inputs": {"embeddings": ("DT_FLOAT", f"(-1, {D})")},
                          "outputs": {"probabilities": ("DT_FLOAT", f"(-1, {N})"),
                                      "classes": ("DT_STRING", "(-1)"),
                                      "logits": ("DT_FLOAT", f"(-1, {N})")}},
      "classify": {"inputs": {"inputs": ("DT_STRING", "(-1)")},
                   "outputs": {"classes": ("DT_STRING", f"(-1, {N})"),
                               "scores": ("DT_FLOAT", f"(-1, {N})")}},
      "adapt_and_predict": {
          "inputs": {"support_embeddings": ("DT_FLOAT", f"({N * K}, {D})"),
                     "support_labels": ("DT_INT32", f"({N * K})"),
                     "query_embeddings": ("DT_FLOAT", f"(-1, {D})")},
          "outputs": {"logits": ("DT_FLOAT", f"(-1, {N})"),
                      "probabilities": ("DT_FLOAT", f"(-1, {N})"),
                      "class_ids": ("DT_INT32", "(-1)")}},
  }
  for name, spec in expected.items():
    assert name in blocks, sorted(blocks)
    block = blocks[name]
    assert "Method name is: tensorflow/serving/predict" in block
    inputs_part, outputs_part = block.split("contains the following output(s):")
    for part, wanted in ((inputs_part, spec["inputs"]), (outputs_part, spec["outputs"])):
      kind = "inputs" if part is inputs_part else "outputs"
      listed = part.count(f"{kind}['")
      assert listed == len(wanted), (name, kind, part)
      for tensor, (dtype, shape) in wanted.items():
        entry_text = part.split(f"{kind}['{tensor}']")[1].split("name:")[0]
        assert f"dtype: {dtype}" in entry_text and f"shape: {shape}" in entry_text, (
            name, tensor, entry_text)


# -- versions ------------------------------------------------------------------------
def test_versions_increase_and_are_never_overwritten(exports, tmp_path):
  run_dir = exports.run_dir("r2d2")
  support = support_set(np.random.default_rng(3))
  base_dir = str(tmp_path / "models")
  first = export.export_classifier(run_dir, support, base_dir, model_name="birds")
  second = export.export_classifier(run_dir, support, base_dir, model_name="birds")
  assert (first.version, second.version) == (1, 2)
  os.makedirs(os.path.join(base_dir, "birds", "7"))      # a version written by hand
  assert export.export_classifier(run_dir, support, base_dir, model_name="birds").version == 8
  before = os.path.getmtime(os.path.join(second.path, "saved_model.pb"))
  with pytest.raises(errors.UserError, match="never overwritten"):
    export.export_classifier(run_dir, support, base_dir, model_name="birds", version=2)
  assert os.path.getmtime(os.path.join(second.path, "saved_model.pb")) == before
  assert sorted(os.listdir(os.path.join(base_dir, "birds"))) == ["1", "2", "7", "8"]


def test_killed_export_leaves_no_version_and_no_temp_dir(exports, tmp_path, monkeypatch):
  run_dir = exports.run_dir("r2d2")
  support = support_set(np.random.default_rng(4))
  real_save = tf.saved_model.save

  def save_then_die(module, path, signatures=None):
    real_save(module, path, signatures=signatures)   # fully written, then killed
    raise KeyboardInterrupt

  monkeypatch.setattr(tf.saved_model, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    export.export_classifier(run_dir, support, str(tmp_path / "m"), model_name="x")
  assert not os.path.exists(tmp_path / "m" / "x")       # nothing TF Serving could load
  os.makedirs(tmp_path / "m" / "y" / "1")
  with pytest.raises(KeyboardInterrupt):
    export.export_classifier(run_dir, support, str(tmp_path / "m"), model_name="y")
  assert os.listdir(tmp_path / "m" / "y") == ["1"]


# -- bad input: UserError, nothing written -------------------------------------------
def _write_support(path, counts, dim=D):
  rng = np.random.default_rng(5)
  keys = [embedding_keys.make_key(c, i) for c, n in zip(CLASS_NAMES, counts) for i in range(n)]
  embeddings_lib.write_split(str(path), keys, rng.standard_normal([len(keys), dim]))
  return str(path)


def test_bad_inputs_raise_user_errors_and_write_nothing(exports, tmp_path):
  run_dir = exports.run_dir("r2d2")
  maml_dir = exports.run_dir("maml")
  out = str(tmp_path / "out")

  def assert_refused(make_support, match, run=run_dir):
    with pytest.raises(errors.UserError, match=match):
      export.export_classifier(run, make_support(), out)
    assert not os.path.exists(out)

  with pytest.raises(errors.UserError, match="'owl' has no support examples"):
    support_lib.support_from_groups({"cat": np.ones([2, D]), "dog": np.ones([2, D]),
                                "owl": np.zeros([0, D])}, "groups")
  assert_refused(lambda: export.load_support_embeddings(
      _write_support(tmp_path / "uneq.npz", [2, 2, 3])), r"unequal shots.*--num_shots=2")
  # --num_shots makes the same file usable; too many shots is refused.
  assert export.load_support_embeddings(str(tmp_path / "uneq.npz"), num_shots=2).num_shots == 2
  with pytest.raises(errors.UserError, match="has only 2"):
    export.load_support_embeddings(str(tmp_path / "uneq.npz"), num_shots=3)
  assert_refused(lambda: export.load_support_embeddings(
      _write_support(tmp_path / "d8.pkl", [2, 2, 2], dim=8)), "D=8 but the checkpoint .* D=16")
  two_way = support_lib.SupportSet(("a", "b"), np.ones([2, K, D], np.float32), "two")
  assert_refused(lambda: two_way, "2 classes but the learner is 3-way")
  support = support_set(np.random.default_rng(6))
  # Missing checkpoint: a run directory with config.json only.
  empty_run = tmp_path / "empty_run"
  empty_run.mkdir()
  with open(os.path.join(run_dir, "config.json")) as handle:
    config = json.load(handle)
  (empty_run / "config.json").write_text(json.dumps(config))
  assert_refused(lambda: support, "no checkpoint", run=str(empty_run))
  assert_refused(lambda: support, "not a run directory", run=str(tmp_path))
  assert_refused(lambda: support, "no such run directory", run=str(tmp_path / "nope"))
  # Mismatched checkpoint: config.json claims another model (r2d2 weights) or
  # another width (maml weights: the head's W is [16, 3]).
  maml_settings = settings_lib.default_settings("maml", num_classes=N)
  for index, (source, change) in enumerate(((run_dir, {"settings": maml_settings}),
                                            (maml_dir, {"embedding_dim": 12}))):
    bad_run = str(tmp_path / f"bad_{index}")
    shutil.copytree(source, bad_run)
    with open(os.path.join(source, "config.json")) as handle:
      bad = json.load(handle)
    bad.update(change)
    with open(os.path.join(bad_run, "config.json"), "w") as handle:
      json.dump(bad, handle)
    bad_support = support_set(np.random.default_rng(7), dim=bad["embedding_dim"])
    assert_refused(lambda s=bad_support: s, "does not match", run=bad_run)
  with pytest.raises(errors.UserError, match="model_name"):
    export.export_classifier(run_dir, support, out, model_name="../evil")
  assert not os.path.exists(out)


# -- images with a bundled backbone, through the script -------------------------------
def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array, mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.mark.slow
def test_script_bundles_backbone_images_match_in_process_pipeline(tmp_path):
  from leo_suite.data import image_views
  from leo_suite.data import images as images_lib
  from leo_suite.models import backbones
  from leo_suite.pretrain import classifier as classifier_lib
  from leo_suite.pretrain import pretrain_config
  tf.keras.utils.set_random_seed(0)
  backbone = backbones.build_backbone("conv4", 28, 1)
  config = pretrain_config.PretrainConfig(backbone="conv4", image_size=28, channels=1, invert=True)
  classifier_lib.export_backbone(backbone, config, str(tmp_path / "backbone"))
  dim = int(backbone.output_shape[-1])
  learner, _ = make_run(tmp_path / "run", "r2d2", steps=1, dim=dim)
  rng = np.random.default_rng(8)
  prototypes = rng.integers(0, 256, [N, 28, 28], np.uint8)
  for name, proto in zip(CLASS_NAMES, prototypes):
    (tmp_path / "support" / name).mkdir(parents=True)
    for i in range(K):
      noisy = np.clip(proto.astype(int) + rng.integers(-40, 40, proto.shape), 0, 255)
      (tmp_path / "support" / name / f"{i}.png").write_bytes(_png(noisy.astype(np.uint8)))
  script = os.path.join(REPO, "scripts", "export_classifier.py")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  common = [sys.executable, script, f"--checkpoint_path={tmp_path / 'run'}",
            f"--backbone_dir={tmp_path / 'backbone'}", f"--export_base={tmp_path / 'serve'}"]
  # An empty class folder: exit 2, one clear line, nothing written.
  (tmp_path / "bad" / "cat").mkdir(parents=True)
  (tmp_path / "bad" / "dog").mkdir()
  (tmp_path / "bad" / "cat" / "0.png").write_bytes(_png(prototypes[0]))
  proc = scripts_run.run(common + [f"--support={tmp_path / 'bad'}"], capture_output=True,
                         text=True, env=env, timeout=300, cwd=REPO)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "'dog' has no images" in proc.stderr
  assert not os.path.exists(tmp_path / "serve")
  proc = scripts_run.run(common + [f"--support={tmp_path / 'support'}", "--model_name=glyphs"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = str(tmp_path / "serve" / "glyphs" / "1")
  model = tf.saved_model.load(path)
  assert set(model.signatures) == {"serving_default", "predict_embeddings", "classify",
                                   "adapt_and_predict"}
  queries = [np.clip(p.astype(int) + rng.integers(-60, 60, p.shape), 0, 255).astype(np.uint8)
             for p in prototypes]
  encoded = [_png(q) for q in queries]
  # In-process: PIL decoding + the extraction feature function + the learner.
  options = images_lib.DecodeOptions(28, 1)
  features_fn = image_views.feature_function(backbone, "center", 28, invert=True)

  def embed(payloads):
    arrays = np.stack([images_lib.decode_image(p, "q", options) for p in payloads])
    return features_fn(tf.constant(arrays)).numpy()

  support_x = np.stack([embed([(tmp_path / "support" / c / f"{i}.png").read_bytes()
                               for i in range(K)]) for c in CLASS_NAMES])
  expected = reference_logits(learner, support_x, embed(encoded))
  # The REST body a client sends ({"b64": ...}) decoded as the server does.
  body = {"instances": [{"b64": base64.b64encode(e).decode()} for e in encoded]}
  inputs = rest.request_inputs(body, model.signatures["serving_default"])
  assert list(inputs) == ["images"] and inputs["images"].shape == (N,)
  served = model.signatures["serving_default"](images=tf.constant(list(inputs["images"])))
  np.testing.assert_allclose(served["logits"].numpy(), expected, atol=1e-5)
  np.testing.assert_array_equal(served["classes"].numpy().astype(str),
                                np.asarray(CLASS_NAMES)[expected.argmax(-1)])
  # Another size is resized in the graph (Lanczos): still a valid prediction.
  big = _png(np.asarray(Image.fromarray(queries[0]).resize((40, 40))))
  probs = model.signatures["serving_default"](images=tf.constant([big]))["probabilities"]
  np.testing.assert_allclose(probs.numpy().sum(-1), 1.0, atol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError):
    model.signatures["serving_default"](images=tf.constant([b"not an image"]))


# -- REST bodies and gRPC protos -----------------------------------------------------
def readme_predict_body(queries):
  return {"signature_name": "serving_default", "instances": queries.tolist()}


def readme_classify_body(queries):
  return {"signature_name": "classify",
          "examples": [{"embedding": row.tolist()} for row in queries]}


def test_rest_bodies_fit_signatures_and_build_grpc_requests(exports):
  from tensorflow_serving.apis import classification_pb2
  from tensorflow_serving.apis import predict_pb2
  entry = exports["maml"]
  queries = exports.queries
  model = tf.saved_model.load(entry["path"])
  predict = model.signatures["serving_default"]
  body = json.loads(json.dumps(readme_predict_body(queries)))   # as sent over the wire
  inputs = rest.request_inputs(body, predict)
  assert list(inputs) == ["embeddings"]
  assert inputs["embeddings"].dtype == np.float32 and inputs["embeddings"].shape == (NUM_QUERIES, D)
  request = rest.predict_request(body, predict, model_name="maml")
  assert isinstance(request, predict_pb2.PredictRequest)
  assert request.model_spec.name == "maml"
  assert request.model_spec.signature_name == "serving_default"
  tensor = request.inputs["embeddings"]
  assert tensor.dtype == tf.float32.as_datatype_enum
  assert [d.size for d in tensor.tensor_shape.dim] == [NUM_QUERIES, D]
  served = predict(embeddings=tf.constant(tf.make_ndarray(tensor)))
  np.testing.assert_allclose(served["logits"].numpy(), entry["logits"], atol=1e-5)
  response = rest.predict_response({k: v.numpy() for k, v in served.items()}, row_format=True)
  first = response["predictions"][0]
  assert sorted(first) == ["classes", "logits", "probabilities"]
  assert first["classes"] in CLASS_NAMES and len(first["probabilities"]) == N
  json.dumps(response)
  # Classify.
  cbody = json.loads(json.dumps(readme_classify_body(queries)))
  crequest = rest.classification_request(cbody, model_name="maml")
  assert isinstance(crequest, classification_pb2.ClassificationRequest)
  assert crequest.model_spec.signature_name == "classify"
  examples = crequest.input.example_list.examples
  assert len(examples) == NUM_QUERIES
  assert list(examples[0].features.feature["embedding"].float_list.value) == pytest.approx(
      queries[0].tolist())
  scores = model.signatures["classify"](
      inputs=tf.constant([e.SerializeToString() for e in examples]))["scores"]
  np.testing.assert_allclose(scores.numpy(), softmax(entry["logits"]), atol=1e-5)
  # Bodies that do not fit are refused with what is wrong.
  with pytest.raises(rest.RequestError, match=r"shape \[5, 15\].*\[-1, 16\]"):
    rest.request_inputs({"instances": queries[:, :-1].tolist()}, predict)
  with pytest.raises(rest.RequestError, match="numbers"):
    rest.request_inputs({"instances": [["a"] * D]}, predict)
  with pytest.raises(rest.RequestError, match="exactly one"):
    rest.request_inputs({"instances": [], "inputs": []}, predict)
  # Columnar body for the multi-input signature.
  adapt = model.signatures["adapt_and_predict"]
  cols = {"inputs": {"support_embeddings": entry["support2_flat"].tolist(),
                     "support_labels": entry["support2_labels"].tolist(),
                     "query_embeddings": queries.tolist()}}
  arrays = rest.request_inputs(json.loads(json.dumps(cols)), adapt)
  assert arrays["support_labels"].dtype == np.int32
  areq = rest.predict_request(dict(cols, signature_name="adapt_and_predict"), adapt, "maml")
  assert [d.size for d in areq.inputs["support_embeddings"].tensor_shape.dim] == [N * K, D]


def test_loopback_rest_stub(exports):
  entry = exports["r2d2"]
  queries = exports.queries
  server = rest.LoopbackServer(os.path.dirname(entry["path"]), "r2d2").start()
  try:
    def post(verb, body):
      request = urllib.request.Request(f"{server.url}:{verb}", json.dumps(body).encode(),
                                       {"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(request, timeout=60) as response:
          return response.status, json.load(response)
      except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)

    with urllib.request.urlopen(server.url, timeout=60) as response:
      status = json.load(response)["model_version_status"][0]
    assert status["state"] == "AVAILABLE" and status["version"] == str(entry["version"])
    code, reply = post("predict", readme_predict_body(queries))
    assert code == 200
    logits = np.asarray([p["logits"] for p in reply["predictions"]])
    np.testing.assert_allclose(logits, entry["logits"], atol=1e-5)
    assert [p["classes"] for p in reply["predictions"]] == list(
        np.asarray(CLASS_NAMES)[entry["logits"].argmax(-1)])
    code, reply = post("classify", readme_classify_body(queries))
    assert code == 200
    assert [c for c, _ in reply["result"][0]] == list(CLASS_NAMES)
    np.testing.assert_allclose([[s for _, s in row] for row in reply["result"]],
                               softmax(entry["logits"]), atol=1e-5)
    code, reply = post("predict", {"instances": queries[:, :3].tolist()})
    assert code == 400 and "shape" in reply["error"]
  finally:
    server.stop()


def test_benchmark_latency_reports_both_batch_sizes(exports):
  figures = latency.benchmark_latency(exports["r2d2"]["path"], min_seconds=0.05,
                                     min_calls=2)
  for batch in (1, 256):
    assert figures[f"batch_{batch}_predictions_per_s"] > 0
    assert figures[f"batch_{batch}_latency_ms"] > 0
  assert figures["input"] == "embeddings"
