"""Issue 30: hostile inputs reach the tools only through leo_suite's safety layer.

Each case checks the wiring, not the layer itself (tests/test_safeio.py and
tests/test_runlock.py test that): a run's lock is leo_suite/runlock.py's, names
from flags and manifests are checked before anything is read or written, data
files are read only if regular and under the cap, images and archives are
checked before they are decompressed. Each refusal is one `error:` line.
"""

import io
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.test_safeio import deadline

from tests import scripts_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- 1. the run's lock ---------------------------------------------------------------

# A process taking `Run.lock` through the tools' error path (console.run): waits
# for the test's go, holds the run for `hold` seconds, exits 0; refused, exit 2.
LOCK_TAKER = r"""
import os, sys, time
from leo_suite import console
console.import_tensorflow()
from leo_suite.training import run as run_lib
directory, ready, go, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def main(argv):
  open(ready + str(os.getpid()), "w").close()
  while not os.path.exists(go):
    time.sleep(0.002)
  with run_lib.Run.lock(directory, create=True):
    time.sleep(hold)

console.run(main)
"""
NUM_TAKERS = 4


@pytest.mark.parametrize("start", ["new_path", "empty_dir", "garbage_lock"])
def test_run_lock_processes_starting_together_exactly_one_holds(tmp_path, start):
  directory = tmp_path / "runs" / "run"
  if start != "new_path":
    directory.mkdir(parents=True)
  if start == "garbage_lock":
    (directory / ".lock").write_bytes(b"\xff\0{not json")
  ready, go = tmp_path / "ready-", tmp_path / "go"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  taker = tmp_path / "lock_taker.py"    # a script: scripts_run forks it ready-imported
  taker.write_text(LOCK_TAKER)
  procs = [scripts_run.Popen([sys.executable, str(taker), str(directory), str(ready),
                              str(go), "2.0"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(NUM_TAKERS)]
  try:
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < NUM_TAKERS:
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
          p.communicate() for p in procs if p.poll() is not None]
      time.sleep(0.01)
    go.write_text("")
    results = [(p.pid, p.wait(timeout=120), p.communicate()[1]) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  winners = [pid for pid, code, _ in results if code == 0]
  assert len(winners) == 1, results
  for pid, code, stderr in results:
    if pid != winners[0]:
      assert code == 2 and stderr.count("\n") == 1, stderr
      assert stderr.startswith(f"error: {directory} is in use by process {winners[0]} on "
                               f"{socket.gethostname()} (since "), stderr
  assert not (directory / ".lock").exists()   # released by its holder


# -- 2. names from flags and manifests -----------------------------------------------

HOSTILE_NAMES = ["../../outside", "/etc", "a/b", "..", "", "bad\nname", "x\0y"]


def assert_one_line_refusal(proc, *parts):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  for part in parts:
    assert part in lines[0], lines[0]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_dataset_and_crop_names_are_single_names_before_anything_is_read(tmp_path, name):
  from leo_suite import errors
  from leo_suite.data import embeddings
  from leo_suite.training import settings as settings_lib
  settings = settings_lib.default_settings("leo")
  known = settings_lib.baseline_names(settings)
  settings_lib.check(settings, known)   # the defaults pass
  for flag in ("dataset_name", "embedding_crop"):
    with pytest.raises(errors.ConfigError, match=f"^--{flag} "):
      settings_lib.check(dict(settings, **{flag: name}), known)
  outside = tmp_path / "outside" / "center"
  outside.mkdir(parents=True)   # what "../outside" would reach from data_path
  data_path = tmp_path / "data" / "here"
  data_path.mkdir(parents=True)
  for args in ((name, "center", "train"), ("ds", name, "train"), ("ds", "center", name)):
    with pytest.raises(errors.ConfigError, match="single name|is empty|names a folder|control|NUL"):
      embeddings.load_dataset_split(str(data_path), *args)


def test_runner_refuses_a_dataset_path_in_one_line_and_leaves_no_run_directory(tmp_path):
  run_dir = tmp_path / "run"
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO_ROOT, "runner.py"), f"--data_path={tmp_path}",
       "--dataset_name=../../etc", f"--checkpoint_path={run_dir}"],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT), check=False)
  assert_one_line_refusal(proc, "--dataset_name '../../etc' must be a single name")
  assert not run_dir.exists()


def write_shard_set(root, entries, settings=None, payload=b"not read"):
  """Two finished-looking shard folders under `root` whose manifests list `entries`."""
  import json
  settings = dict({"mode": "splits", "format": "pkl", "records": {"train": {}},
                   "split_classes": {"train": ["a"]}}, **(settings or {}))
  for index in range(2):
    folder = root / f"shard-{index:05d}-of-00002"
    folder.mkdir(parents=True)
    (folder / "train_shard.npz").write_bytes(payload)
    (folder / "manifest.json").write_text(json.dumps({
        "shard_index": index, "num_shards": 2, "settings": settings, "backbone": {},
        "splits": entries}))


@pytest.mark.parametrize("case", ["file_outside", "file_absolute", "file_nested",
                                  "split_outside", "split_in_settings", "format_path"])
def test_merge_refuses_names_leaving_the_shard_folder_before_writing(tmp_path, case):
  from leo_suite import errors
  from leo_suite.pretrain import extract_shards
  out = tmp_path / "out"
  root = out / "ds" / "center" / "shards"
  secret = tmp_path / "secret.npz"
  secret.write_bytes(b"outside")
  entry = {"file": "train_shard.npz", "sha256": "0", "skipped": []}
  entries, settings, expected = {"train": entry}, None, None
  if case == "file_outside":
    entries, expected = {"train": dict(entry, file="../../../../../secret.npz")}, "single name"
  elif case == "file_absolute":
    entries, expected = {"train": dict(entry, file=str(secret))}, "single name"
  elif case == "file_nested":
    entries, expected = {"train": dict(entry, file="sub/train_shard.npz")}, "single name"
  elif case == "split_outside":
    entries, expected = {"../../../evil": entry}, "split '../../../evil' is not one of"
  elif case == "split_in_settings":
    settings = {"records": {"/tmp/evil": {}}}
    expected = "split '/tmp/evil' is not one of"
  else:
    settings, expected = {"format": "pkl/../../x"}, "format 'pkl/../../x' is not one of"
  write_shard_set(root, entries, settings)
  before = sorted(p for p in tmp_path.rglob("*"))
  with pytest.raises(errors.DataError) as refused:
    extract_shards.merge_shards(str(out), "ds", "center")
  message = str(refused.value)
  assert expected in message and "manifest.json" in message and "rerun it:" in message
  assert "\n" not in message
  assert sorted(p for p in tmp_path.rglob("*")) == before   # nothing written or removed


# -- 3. only regular files under a cap are read as data ------------------------------

def test_embeddings_loader_refuses_a_fifo_at_once_and_a_link_to_a_device(tmp_path):
  from leo_suite import errors
  from leo_suite.data import embeddings
  from tests.test_loader_hardening import assert_one_error_line, run_loader
  fifo = tmp_path / "train_embeddings.pkl"
  os.mkfifo(fifo)
  with deadline(10), pytest.raises(errors.DataError, match="FIFO"):
    embeddings.load_split(str(fifo))
  with deadline(10), pytest.raises(errors.DataError, match="FIFO"):
    embeddings.read_keys_and_embeddings(str(fifo))
  zero = tmp_path / "val_embeddings.npz"
  zero.symlink_to("/dev/zero")
  code, stderr, _ = run_loader(zero)
  assert_one_error_line(code, stderr, zero, "is a character device, not a regular file")


def test_a_valid_split_loads_the_same_through_the_checks(tmp_path):
  import numpy as np
  from leo_suite.data import embedding_keys, embeddings
  keys = [embedding_keys.make_key(f"c{c}", i) for c in range(3) for i in range(4)]
  rows = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
  for suffix in (".pkl", ".npz"):
    path = str(tmp_path / f"train_embeddings{suffix}")
    embeddings.write_split(path, keys, rows)
    read_keys, matrix = embeddings.read_keys_and_embeddings(path)
    assert read_keys == keys and matrix.tobytes() == rows.tobytes()


@pytest.mark.parametrize("form", ["set.csv", "set.pkl", "manifest"])
def test_serving_sets_refuse_a_fifo_at_once(tmp_path, form):
  from leo_suite import errors
  from leo_suite.data import embedding_keys, embeddings
  from leo_suite.serving import sets
  import numpy as np
  path = tmp_path / form
  if form == "manifest":   # a valid embeddings file whose manifest.json is a FIFO
    path = tmp_path / "support.npz"
    embeddings.write_split(str(path), [embedding_keys.make_key("a", 0)], np.ones((1, 2)))
    os.mkfifo(tmp_path / "manifest.json")
  else:
    os.mkfifo(path)
  with deadline(10), pytest.raises(errors.DataError, match="FIFO") as refused:
    sets.load_set(str(path), "support")
  assert "\n" not in str(refused.value)


def test_merge_checks_a_shard_npz_before_np_load_decompresses_it(tmp_path):
  import hashlib
  import io
  import numpy as np
  from leo_suite import errors
  from leo_suite.pretrain import extract_shards
  buffer = io.BytesIO()
  np.savez_compressed(buffer, indices=np.zeros(0, np.int64),
                      embeddings=np.zeros((2**20, 4), np.float32),   # 16 MiB of zeros
                      classes=np.zeros(0, np.str_), files=np.zeros(0, np.str_))
  payload = buffer.getvalue()
  assert len(payload) < 2**16
  entry = {"file": "train_shard.npz", "sha256": hashlib.sha256(payload).hexdigest(),
           "skipped": [], "elapsed_s": 0}
  settings = {"records": {"train": {"num_records": 0}}, "class_names": {},
              "sources": [], "split_origin": "", "checkpoint_sha256": "0"}
  write_shard_set(tmp_path / "out" / "ds" / "center" / "shards", {"train": entry}, settings,
                  payload)
  with pytest.raises(errors.DataError, match="compression bomb"):
    extract_shards.merge_shards(str(tmp_path / "out"), "ds", "center")


# -- 4. images and archives: checked before they are decompressed ---------------------

def test_decode_image_checks_the_pixel_count_from_the_header_first(monkeypatch):
  import io
  import numpy as np
  from PIL import Image
  from leo_suite import errors
  from leo_suite.data import images
  from tests.test_safeio import png_claiming
  options = images.DecodeOptions(image_size=8)
  with pytest.raises(errors.DataError, match=r"^class_a/img\.png: 13000x13000 = 169,000,000 "
                     "pixels, more than the cap of 16,777,216; refused before decoding"):
    images.decode_image(png_claiming(13000, 13000), "class_a/img.png", options)
  with pytest.raises(errors.DataError, match="unreadable or corrupt image"):  # as before
    images.decode_image(b"not an image", "x.png", options)
  buffer = io.BytesIO()
  Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20)).save(buffer, format="PNG")
  unchecked = images.decode_image(buffer.getvalue(), "ok.png", options)
  monkeypatch.setenv("LEO_SUITE_MAX_IMAGE_PIXELS", "400")
  np.testing.assert_array_equal(images.decode_image(buffer.getvalue(), "ok.png", options),
                                unchecked)   # same pixels
  monkeypatch.setenv("LEO_SUITE_MAX_IMAGE_PIXELS", "399")
  with pytest.raises(errors.DataError, match="20x20 = 400 pixels"):
    images.decode_image(buffer.getvalue(), "ok.png", options)


def test_zip_sources_check_members_before_reading_and_read_the_same_bytes(tmp_path):
  from leo_suite import errors
  from leo_suite.data import image_sources
  from tests.test_safeio import patch_member, zip_bytes
  encrypted = tmp_path / "encrypted.zip"
  encrypted.write_bytes(patch_member(zip_bytes({"cls/secret.png": b"x" * 100}), flag_bits=0x1))
  with pytest.raises(errors.DataError, match=r"encrypted\.zip: member 'cls/secret\.png' is "
                     "encrypted"):
    image_sources.scan_source(str(encrypted))
  bomb = tmp_path / "bomb.zip"
  bomb.write_bytes(bytes(zip_bytes({"cls/a.png": b"\0" * 2**21})))
  with pytest.raises(errors.DataError, match=r"bomb\.zip: member 'cls/a\.png' expands .* a "
                     "compression bomb"):
    image_sources.scan_source(str(bomb))
  fifo = tmp_path / "fifo.zip"
  os.mkfifo(fifo)
  with deadline(10), pytest.raises(errors.DataError, match="FIFO"):
    image_sources.scan_source(str(fifo))
  members = {"top/cls/a.png": b"a" * 3000, "top/cls/b.png": bytes(range(256)) * 4}
  valid = tmp_path / "valid.zip"
  valid.write_bytes(bytes(zip_bytes(members)))
  records = image_sources.scan_source(str(valid))
  assert [r.class_name for r in records] == ["cls", "cls"]
  cache = {}
  assert [r.read_bytes(cache) for r in records] == list(members.values())
  image_sources.close_archives(cache)
  image_fifo = tmp_path / "cls" / "c.png"
  image_fifo.parent.mkdir()
  os.mkfifo(image_fifo)
  record = image_sources.ImageRecord("cls", "c.png", str(image_fifo), ("file", str(image_fifo)))
  with deadline(10), pytest.raises(errors.DataError, match="FIFO"):
    record.read_bytes()


# -- 5. the served model's image signature: pixels checked in the graph ---------------

def _encoded(fmt, width, height):
  import io
  import numpy as np
  from PIL import Image
  buffer = io.BytesIO()
  pixels = np.arange(width * height, dtype=np.uint8).reshape(height, width)
  Image.fromarray(pixels).convert("RGB").save(buffer, format=fmt)
  return buffer.getvalue()


def test_graph_pixel_check_reads_each_formats_header_and_refuses_above_the_cap():
  import numpy as np
  import tensorflow as tf
  from leo_suite.data import images
  from tests.test_safeio import png_claiming
  decode = images.decode_encoded   # eager: the same ops, without a trace per case
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"image of 13000x13000 = 169000000 "
                     r"pixels, more than the cap of 16,777,216 pixels; refused before decoding"):
    decode(tf.constant(png_claiming(13000, 13000)), 8, 1, 4096 * 4096)
  for fmt in ("PNG", "JPEG", "GIF", "BMP"):
    encoded = tf.constant(_encoded(fmt, 20, 30))
    assert [int(v) for v in images.encoded_size(encoded)] == [20, 30], fmt
    np.testing.assert_array_equal(decode(encoded, 8, 1, 600), decode(encoded, 8, 1, None))
    with pytest.raises(tf.errors.InvalidArgumentError, match="20x30 = 600 pixels"):
      decode(encoded, 8, 1, 599)
  assert [int(v) for v in images.encoded_size(tf.constant(b"GI"))] == [0, 0]   # short


def test_exported_image_signature_refuses_a_huge_png_header_before_decoding(monkeypatch):
  import numpy as np
  import tensorflow as tf
  from leo_suite.models import backbones, registry
  from leo_suite.serving import export, support as support_lib
  from tests import learner_checks
  from tests.test_safeio import png_claiming
  backbone = backbones.build_backbone("conv4", 28, 1)
  dim = int(backbone.output_shape[-1])
  config = registry.spec("protonet").config_class(**learner_checks.SMALL_CONFIGS["protonet"])
  learner = registry.build("protonet", config, 2, dim, "float32")
  rows = np.random.default_rng(0).standard_normal([2, 1, dim]).astype(np.float32)
  support = support_lib.SupportSet(("a", "b"), rows, "test")
  description = {"image_size": 28, "channels": 1, "invert": True, "feature_dim": dim}
  monkeypatch.setenv("LEO_SUITE_MAX_IMAGE_PIXELS", "1000")
  module = export.AdaptedClassifier(learner, support, backbone, description)
  ok = module.predict_images(tf.constant([_encoded("PNG", 28, 28)] * 2))
  assert ok["probabilities"].shape == (2, 2)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"image of 13000x13000 = "
                     "169000000 pixels, more than the cap of 1,000 pixels"):
    module.predict_images(tf.constant([png_claiming(13000, 13000)]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="images is an empty batch"):
    module.predict_images(tf.constant([], tf.string))


# -- 6. split JSON, a run's config.json, the release archive: through safeio -----------

def test_split_json_and_run_config_refuse_a_fifo_at_once(tmp_path):
  from leo_suite import errors
  from leo_suite.pretrain import class_splits
  from leo_suite.training import run as run_lib
  split = tmp_path / "split.json"
  os.mkfifo(split)
  with deadline(10), pytest.raises(errors.DataError, match=r"split\.json: is a FIFO"):
    class_splits.load_split_spec(str(split))
  with pytest.raises(errors.DataError, match="no such split file"):   # as before
    class_splits.load_split_spec(str(tmp_path / "gone.json"))
  (tmp_path / "run").mkdir()
  os.mkfifo(tmp_path / "run" / "config.json")
  with deadline(10), pytest.raises(errors.DataError, match=r"config\.json: is a FIFO"):
    run_lib.Run.open(str(tmp_path / "run"))
  (tmp_path / "run" / "config.json").unlink()
  (tmp_path / "run" / "config.json").write_bytes(b"\xff{")
  with pytest.raises(errors.ConfigError, match="cannot be read as a run configuration"):
    run_lib.Run.open(str(tmp_path / "run"))


@pytest.mark.parametrize("case", ["fifo", "encrypted", "control_name", "bomb"])
def test_release_archive_is_a_regular_file_with_checked_members(tmp_path, case):
  from leo_suite import errors
  from leo_suite.data import release_archive
  from tests.test_safeio import patch_member, zip_bytes
  archive = tmp_path / "embeddings.zip"
  name = "embeddings/miniImageNet/center/train_embeddings.pkl"
  if case == "fifo":
    os.mkfifo(archive)
    expected = "is a FIFO"
  elif case == "encrypted":
    archive.write_bytes(patch_member(zip_bytes({name: b"x" * 100}), flag_bits=0x1))
    expected = "train_embeddings.pkl' is encrypted"
  elif case == "control_name":
    archive.write_bytes(bytes(zip_bytes({"embeddings/mini\x1bImageNet/center/x": b"x"})))
    expected = "contains control characters"
  else:
    archive.write_bytes(bytes(zip_bytes({name: b"\0" * 2**21})))
    expected = "a compression bomb"
  with deadline(10), pytest.raises(errors.DataError, match=expected) as refused:
    release_archive.verify_archive(str(archive), stream=io.StringIO())
  assert "\n" not in str(refused.value)
  assert sorted(os.listdir(tmp_path)) == ["embeddings.zip"]


# -- 7. file names that are not UTF-8, encrypted members, messages ---------------------

BAD_NAME = "bad\udcff.png"   # the bytes b"bad\xff.png" as os.listdir returns them


def test_a_skipped_non_utf8_name_is_reported_printably_without_object_reprs(tmp_path):
  from leo_suite.data import image_sources, images
  path = os.path.join(str(tmp_path), BAD_NAME)
  with open(os.fsencode(path), "wb") as handle:
    handle.write(b"not an image")
  (record,) = image_sources.scan_directory(str(tmp_path), unlabelled=True)
  decoder = images.Decoder(images.DecodeOptions(8, skip_bad=True))
  assert list(decoder.iterate([record])) == []
  ((origin, reason),) = decoder.skipped
  assert origin == path   # the record keeps the real name
  assert reason.startswith(f"{tmp_path}/bad\\xff.png: unreadable or corrupt image (")
  assert "object at 0x" not in reason and "--skip_bad_images" in reason
  reason.encode("utf-8")   # printable under a strict UTF-8 locale


def test_predict_and_export_advise_no_flag_they_lack(monkeypatch):
  from leo_suite import errors
  from leo_suite.data import images
  from leo_suite.models import image_embedder
  from leo_suite.serving import export, sets
  with pytest.raises(errors.DataError) as refused:
    images.decode_image(b"junk", "q.png", images.DecodeOptions(8, tool_flags=False))
  message = str(refused.value)
  assert message.endswith("replace or remove it") and "--" not in message, message
  assert "object at 0x" not in message and "q.png" in message
  made = []

  class Recorder:
    def __init__(self, *args, **kwargs):
      made.append(kwargs)
  monkeypatch.setattr(image_embedder, "ImageEmbedder", Recorder)
  monkeypatch.setattr(sets, "load_set", lambda *args: pytest.skip("not reached"))
  with pytest.raises(BaseException):
    export.load_support("support", "backbone_dir")
  assert made == [{"tool_flags": False}]


def test_predict_writes_non_utf8_names_losslessly_whatever_the_locale(tmp_path):
  import json
  import numpy as np
  from leo_suite.serving import predict
  result = predict.TaskResult(None, "s", "q", ("a", "b"), 1, (BAD_NAME, "ok.png"), (None, "a"),
                              np.array([[0.9, 0.1], [0.2, 0.8]], np.float32))
  out = tmp_path / "p.json"
  predict.write_output(str(out), [result], {})
  files = [p["file"] for p in json.loads(out.read_bytes())["tasks"][0]["predictions"]]
  assert [os.fsencode(f) for f in files] == [b"bad\xff.png", b"ok.png"]
  predict.write_output(str(tmp_path / "p.csv"), [result], {})
  assert b"\n,bad\xff.png," in (tmp_path / "p.csv").read_bytes()
  raw = io.BytesIO()
  strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
  predict.write_stdout([result], strict)
  assert raw.getvalue() == (tmp_path / "p.csv").read_bytes()


def test_encrypted_members_and_a_non_utf8_csv_are_one_line_refusals(tmp_path):
  from leo_suite import errors
  from leo_suite.data import image_sources
  from leo_suite.serving import sets
  from tests.test_safeio import patch_member, zip_bytes
  encrypted = tmp_path / "query.zip"
  encrypted.write_bytes(patch_member(zip_bytes({"q/a.png": b"x" * 50}), flag_bits=0x1))

  def embed(records, origin):
    raise AssertionError("nothing may be decoded")
  with pytest.raises(errors.DataError, match=r"query\.zip: member 'q/a\.png' is encrypted"):
    sets.load_set(str(encrypted), "query", embed)
  (tmp_path / "mini" / "images").mkdir(parents=True)
  (tmp_path / "mini" / "train.csv").write_bytes(b"filename,label\nx\xff.jpg,n01\n")
  with pytest.raises(errors.DataError, match=r"train\.csv: not UTF-8 text \(byte 16\); save "
                     "it as a UTF-8 CSV"):
    image_sources.scan_csv_splits(str(tmp_path / "mini"))


def test_an_error_line_is_capped_and_says_how_much_was_cut(capsys):
  from leo_suite import console, errors

  def main(argv):
    raise errors.DataError("missing: " + ", ".join(f"class_{i:05d}" for i in range(10000)))
  with pytest.raises(SystemExit) as exited:
    console.guarded(main)([])
  err = capsys.readouterr().err
  assert exited.value.code == 2 and err.count("\n") == 1 and len(err) < 2100
  assert err.startswith("error: missing: class_00000, ") and " more characters)" in err
  from leo_suite import safeio
  assert safeio.listed(range(7), 2) == "'0', '1' ... and 5 more"


def test_support_classes_are_counted_before_any_image_is_embedded(tmp_path):
  from leo_suite import errors
  from leo_suite.serving import sets
  for name in ("dog", "owl"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "0.png").write_bytes(b"never decoded")

  def embed(records, origin):
    raise AssertionError("nothing may be embedded")
  with pytest.raises(errors.DataError, match=r"the support set has 2 classes but runs/x is "
                     r"3-way; give exactly 3 classes \(given: 'dog', 'owl'\)$"):
    sets.load_set(str(tmp_path), "support", embed, num_ways=3, learner="runs/x")


def test_predict_refuses_an_output_that_is_an_input_before_any_work(tmp_path):
  from leo_suite import errors
  from leo_suite.serving import predict
  query = tmp_path / "query.csv"
  query.write_text("file,label\n")
  (tmp_path / "link.csv").symlink_to(query)
  for output in (str(query), str(tmp_path / "link.csv"), f"{tmp_path}/./query.csv"):
    with pytest.raises(errors.ConfigError, match=r"--output=.* is the query set .*choose "
                       "another --output"):
      predict.plan("run_never_opened", "support", str(query), None, output)
  assert predict.plan("run", "s", str(query), None, str(tmp_path / "p.csv"))


def test_served_embeddings_refuse_empty_batches_and_denormal_values():
  import numpy as np
  import tensorflow as tf
  from leo_suite.serving import rest, support
  check = tf.function(lambda x: support.checked_embeddings(x, "embeddings"))
  np.testing.assert_array_equal(check(tf.constant([[1e-30, 0.0, 2.0]])),
                                np.float32([[1e-30, 0.0, 2.0]]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="embeddings is an empty batch"):
    check(tf.zeros([0, 3]))
  tiny = np.float32(1e-40)
  assert 0 < tiny < np.finfo(np.float32).tiny   # a denormal float32
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"embeddings holds a denormal "
                     r"\(subnormal\) value.*First such row:.*\b1\b"):
    check(tf.constant([[1.0, 1.0, 1.0], [1.0, tiny, 1.0]]))
  with pytest.raises(rest.RequestError, match="'images' is an empty batch"):
    rest._as_array(  # pylint: disable=protected-access
        "images", [], tf.TensorSpec([None], tf.string))


def test_a_tool_prints_a_non_utf8_name_under_a_strict_utf8_locale():
  """console.run (every tool's entry): stdout escapes what it cannot encode."""
  code = ("from leo_suite import console\n"
          "console.run(lambda argv: print('wrote ' + 'bad\\udcff.png'))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                        env=dict(os.environ, PYTHONPATH=REPO_ROOT,
                                 PYTHONIOENCODING="utf-8:strict"), check=False)
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"wrote bad\\udcff.png\n", b"")


# -- 8. split files of two extractions are not mixed -----------------------------------

def test_a_split_file_other_than_the_manifests_is_refused_as_a_mix(tmp_path):
  import hashlib
  import json
  import numpy as np
  from leo_suite import errors
  from leo_suite.data import embedding_keys, embeddings
  folder = tmp_path / "ds" / "center"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  entries = {}
  for split, classes in (("train", "ab"), ("val", "cd")):
    keys = [embedding_keys.make_key(c, i) for c in classes for i in range(2)]
    path = folder / f"{split}_embeddings.pkl"
    embeddings.write_split(str(path), keys, rng.standard_normal((4, 3)))
    entries[split] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
  (folder / "manifest.json").write_text(json.dumps({"splits": entries}))
  for split in ("train", "val"):   # as extracted: loads
    assert embeddings.load_dataset_split(str(tmp_path), "ds", "center", split).num_classes == 2
  keys = [embedding_keys.make_key(c, i) for c in "ab" for i in range(2)]   # re-extracted train
  embeddings.write_split(str(folder / "train_embeddings.pkl"), keys, rng.standard_normal((4, 3)))
  with pytest.raises(errors.DataError, match=r"train_embeddings\.pkl: not the file .*manifest\."
                     r"json lists for train .* split files of two extractions are mixed"):
    embeddings.load_dataset_split(str(tmp_path), "ds", "center", "train")
  assert embeddings.load_dataset_split(str(tmp_path), "ds", "center", "val").num_classes == 2
  (folder / "manifest.json").unlink()   # no manifest (the release): nothing to compare
  assert embeddings.load_dataset_split(str(tmp_path), "ds", "center", "train").num_classes == 2
  os.mkfifo(folder / "manifest.json")
  with deadline(10), pytest.raises(errors.DataError, match="FIFO"):
    embeddings.load_dataset_split(str(tmp_path), "ds", "center", "train")


@pytest.mark.slow   # a scripts/export_classifier.py subprocess (TensorFlow start-up)
def test_export_names_what_was_written_and_advises_no_rerun(tmp_path):
  import numpy as np
  from leo_suite.data import embedding_keys, embeddings
  from tests import test_serving as serving
  serving.make_run(tmp_path / "run", "protonet", steps=1)
  keys = [embedding_keys.make_key(c, i) for c in serving.CLASS_NAMES for i in range(serving.K)]
  embeddings.write_split(str(tmp_path / "support.npz"), keys,
                         np.random.default_rng(0).standard_normal([len(keys), serving.D]))
  (tmp_path / "a_file").write_text("")
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "export_classifier.py"),
       f"--checkpoint_path={tmp_path / 'run'}", f"--support={tmp_path / 'support.npz'}",
       f"--export_base={tmp_path / 'a_file' / 'serving'}"],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert_one_line_refusal(proc, "a_file/serving", "Not a directory",
                          "No version was written (a version appears only when complete).")
  assert "rerun" not in proc.stderr
