"""Injected faults: SIGKILL (random and at the worst moments), disk full, NaN batches.

runner.py and extract_embeddings.py run as subprocesses through a small
wrapper that can SIGKILL itself at a chosen point (between the two renames of
the best/ swap, after a checkpoint's data is written but before it is
recorded, halfway through a split file) or fill the disk; kills at random
times come from outside. After every kill the next start must resume from the
last complete checkpoint and, with --deterministic, finish bit-for-bit where an
uninterrupted run does.
"""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data import embeddings

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--dataset_name=tiny", "--deterministic", "--num_latents=4", "--num_classes=3",
         "--metatrain_batch_size=4", "--metavalid_batch_size=10", "--num_val_batches=1",
         "--num_val_examples_per_class=4", "--outer_lr=1e-2", "--checkpoint_steps=2",
         "--log_steps=1", "--jit_compile=false"]  # plain steps: XLA's compile is not the point
LIMIT = 24

WRAPPER = r'''
import errno, os, signal, sys
point, nth = os.environ.get("FAULT_POINT", ""), int(os.environ.get("FAULT_NTH", "1"))
calls = [0]

def due():
  calls[0] += 1
  return calls[0] == nth

def die():
  os.kill(os.getpid(), signal.SIGKILL)

from leo_suite import fileio
if point == "best_swap":          # between 'best' -> 'best.old' and 'best.tmp' -> 'best'
  real_replace_directory = fileio.replace_directory
  def replace_directory(staging, final):
    if os.path.exists(final) and due():
      os.replace(final, final + ".old")
      die()
    return real_replace_directory(staging, final)
  fileio.replace_directory = replace_directory
if point == "ckpt_state":         # checkpoint data written, not yet recorded as latest
  from tensorflow.python.checkpoint import checkpoint_management as cm
  real_update = cm.update_checkpoint_state_internal
  def update(*args, **kwargs):
    if due():
      die()
    return real_update(*args, **kwargs)
  cm.update_checkpoint_state_internal = update
if point == "half_file":          # a split file half written, before fsync + rename
  real_fsync = os.fsync
  def fsync(fd):
    import stat
    if stat.S_ISREG(os.fstat(fd).st_mode) and due():   # files, not directory syncs
      os.ftruncate(fd, max(os.fstat(fd).st_size // 2, 1))
      die()
    return real_fsync(fd)
  os.fsync = fsync
if point in ("fill_disk", "enospc"):  # the disk fills up while training
  from leo_suite.training import trainer
  real_validate = trainer.Trainer.validate
  def validate(self):
    if due():
      if point == "fill_disk":
        with open(os.environ["FAULT_FILLER"], "wb") as handle:
          try:
            while True:
              handle.write(b"\0" * 65536)
              handle.flush()
          except OSError:
            pass
      else:
        import tensorflow as tf
        real_save = tf.train.CheckpointManager.save
        def save(*args, **kwargs):
          raise OSError(errno.ENOSPC, "No space left on device", "ckpt")
        tf.train.CheckpointManager.save = save
    return real_validate(self)
  trainer.Trainer.validate = validate

if point == "erofs":              # the file system is read-only from the first write on
  real_atomic_write = fileio.atomic_write
  def atomic_write(path, mode="wb"):
    raise OSError(errno.EROFS, "Read-only file system", path)
  fileio.atomic_write = atomic_write

script = sys.argv[1]
sys.argv = sys.argv[1:]
if script == "runner":
  import runner
  from absl import app
  sys.argv[0] = os.path.join({repo!r}, "runner.py")
  app.run(runner.main)
else:
  import runpy
  runpy.run_path(script, run_name="__main__")
'''


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
  path = tmp_path_factory.mktemp("wrapper") / "faulty.py"
  path.write_text(WRAPPER.format(repo=REPO))
  return str(path)


def env(**fault):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
              **{f"FAULT_{k.upper()}": str(v) for k, v in fault.items()})


def run_runner(wrapper, data, run_dir, limit=LIMIT, **fault):
  return scripts_run.run(
      [sys.executable, wrapper, "runner", f"--data_path={data}", *FLAGS,
       f"--checkpoint_path={run_dir}", f"--num_steps_limit={limit}"],
      capture_output=True, text=True, env=env(**fault), timeout=300, cwd=REPO, check=False)


def variables(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith(("learner/", "optimizer/", "step/"))}


def assert_same(a, b):
  assert a.keys() == b.keys() and len(a) > 8
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def latest_step(run_dir):
  latest = tf.train.latest_checkpoint(run_dir)
  return int(latest.rsplit("-", 1)[1]) if latest else 0


def check_best_is_whole(run_dir):
  """best/ is complete, or (mid-swap) absent with a complete best.old, or not yet made."""
  best, old = os.path.join(run_dir, "best"), os.path.join(run_dir, "best.old")
  candidate = best if os.path.isdir(best) else old if os.path.isdir(old) else None
  if candidate:
    assert os.path.exists(os.path.join(candidate, "best.json")), os.listdir(candidate)
    variables(os.path.join(candidate, "ckpt"))  # every tensor readable
  return candidate


@pytest.fixture(scope="module")
def straight(wrapper, tiny_data, tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("straight") / "run")
  proc = run_runner(wrapper, tiny_data, run_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run_dir


def resume_and_check(wrapper, data, run_dir):
  expected = latest_step(run_dir)
  if expected:
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == expected
  proc = run_runner(wrapper, data, run_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  if expected:
    assert f"at step {expected}" in proc.stderr   # resumed from the last complete one
  return proc


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_equals_uninterrupted(wrapper, tiny_data, straight,
                                                                  tmp_path):
  run_dir = str(tmp_path / "run")
  rng = random.Random(7)
  effective = 0
  for attempt in range(4):
    log_path = tmp_path / f"log{attempt}.txt"
    with open(log_path, "w") as log:
      proc = scripts_run.Popen(
          [sys.executable, wrapper, "runner", f"--data_path={tiny_data}", *FLAGS,
           f"--checkpoint_path={run_dir}", f"--num_steps_limit={LIMIT}"],
          stdout=subprocess.DEVNULL, stderr=log, env=env(), cwd=REPO)
    target = rng.randint(1, 4)   # steps to see in this attempt's log before the kill
    deadline = time.time() + 200
    while proc.poll() is None and time.time() < deadline:
      seen = log_path.read_text().count("  loss ")
      if seen >= target:
        time.sleep(rng.uniform(0.0, 0.4))   # anywhere: a step, validation, a save
        break
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      effective += 1
    proc.wait(timeout=60)
    check_best_is_whole(run_dir)
    assert not glob.glob(os.path.join(run_dir, "checkpoint.tmp*"))
  assert effective >= 3, "the runs finished before they could be killed"
  resume_and_check(wrapper, tiny_data, run_dir)
  assert latest_step(run_dir) == LIMIT
  assert_same(variables(os.path.join(straight, f"ckpt-{LIMIT}")),
              variables(os.path.join(run_dir, f"ckpt-{LIMIT}")))
  assert check_best_is_whole(run_dir).endswith("best")


@pytest.mark.slow
@pytest.mark.parametrize("point,nth", [("ckpt_state", 3), ("best_swap", 2)])
def test_sigkill_while_writing_checkpoints(wrapper, tiny_data, straight, tmp_path, point, nth):
  run_dir = str(tmp_path / "run")
  proc = run_runner(wrapper, tiny_data, run_dir, point=point, nth=nth)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  if point == "ckpt_state":   # killed before the save was recorded: an earlier one is latest
    assert latest_step(run_dir) in (2, 4)
  else:                       # best/ was moved aside and the new one not yet in place
    assert not os.path.exists(os.path.join(run_dir, "best"))
  check_best_is_whole(run_dir)
  resume_and_check(wrapper, tiny_data, run_dir)
  assert_same(variables(os.path.join(straight, f"ckpt-{LIMIT}")),
              variables(os.path.join(run_dir, f"ckpt-{LIMIT}")))
  assert check_best_is_whole(run_dir).endswith("best")
  assert not os.path.exists(os.path.join(run_dir, "best.old"))


def _mount_tmpfs(directory, size):
  os.makedirs(directory, exist_ok=True)
  if os.geteuid() != 0:
    return False
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                        capture_output=True, check=False)
  return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_is_a_clear_error_and_a_later_run_resumes(wrapper, tiny_data, straight,
                                                            tmp_path):
  disk = str(tmp_path / "disk")
  mounted = _mount_tmpfs(disk, "16m")   # a real full disk; else a simulated ENOSPC
  try:
    run_dir = os.path.join(disk, "run")
    first = run_runner(wrapper, tiny_data, run_dir, limit=10)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(run_dir, "ckpt-10*"))}
    filler = os.path.join(disk, "filler")
    proc = run_runner(wrapper, tiny_data, run_dir, point="fill_disk" if mounted else "enospc",
                      nth=1, filler=filler)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk is full" in last and "resume" in last, last
    assert latest_step(run_dir) == 10
    assert {p: open(p, "rb").read() for p in before} == before   # previous checkpoint intact
    if os.path.exists(filler):
      os.remove(filler)
    resume_and_check(wrapper, tiny_data, run_dir)
    assert_same(variables(os.path.join(straight, f"ckpt-{LIMIT}")),
                variables(os.path.join(run_dir, f"ckpt-{LIMIT}")))
  finally:
    if mounted:
      subprocess.run(["umount", disk], check=False)
  print(f"disk full injected with {'a 16 MB tmpfs' if mounted else 'a simulated ENOSPC'}")


@pytest.mark.slow
def test_nan_batch_is_skipped_and_every_variable_stays_finite(tiny_data, tmp_path, caplog):
  from leo_suite.data import episodes  # pylint: disable=import-outside-toplevel
  from leo_suite.models import registry  # pylint: disable=import-outside-toplevel
  from leo_suite.training import optim  # pylint: disable=import-outside-toplevel
  from leo_suite.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  split = embeddings.load_dataset_split(tiny_data, "tiny", "center", "train")
  sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(3, 1, 4), "train")
  tf.random.set_seed(0)
  learner = registry.build("leo", registry.spec("leo").config_class(num_latents=4), 3,
                           split.dim)
  poisoned_steps = {2, 3}
  real_dataset = sampler.dataset

  def dataset(*args, **kwargs):   # steps 2 and 3: NaN query embeddings in task 0
    for step, episode in enumerate(real_dataset(*args, **kwargs)):
      if step in poisoned_steps:   # (all of them: LEO's input dropout zeroes some entries)
        query = episode.query_x.numpy()
        query[0] = np.nan
        episode = episode._replace(query_x=tf.constant(query))
      yield episode
  sampler.dataset = dataset
  config = trainer_lib.TrainConfig(checkpoint_path=str(tmp_path / "run"), num_steps_limit=6,
                                   metatrain_batch_size=4, checkpoint_steps=6, log_steps=1,
                                   outer=optim.OuterConfig(learning_rate=1e-2))
  trainer = trainer_lib.Trainer(learner, config, sampler)
  poisoned = next(e for i, e in enumerate(dataset(0, 4)) if i == 2)
  loss, grads, _ = learner.loss_and_gradients(poisoned, seed=tf.constant([0, 2]))
  assert not np.isfinite(loss.numpy())           # the injection really produces NaN
  # Variables and every optimizer slot after the guard (the guard's own skip
  # counter is asserted below).
  state = lambda: [v.numpy().copy() for v in [*learner.trainable_variables,
                                               *tf.nest.flatten(trainer.optimizer.state[1])]]
  snapshots = []
  real_step = trainer.train_step

  def train_step(episode, step):
    snapshots.append(state())
    metrics = real_step(episode, step)
    assert float(metrics["skipped"]) == float(step in poisoned_steps), step
    return metrics
  trainer.train_step = train_step
  with caplog.at_level("WARNING"):
    assert trainer.train() == 6
  snapshots.append(state())
  for values in snapshots:
    assert all(np.isfinite(v).all() for v in values)
  # A skipped step changes nothing, bit for bit: variables and optimizer slots.
  for step in poisoned_steps:
    for before, after in zip(snapshots[step], snapshots[step + 1]):
      assert before.tobytes() == after.tobytes(), step
  assert int(trainer.optimizer.num_skipped.numpy()) == len(poisoned_steps)
  skipped = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
  assert [m.split(":")[0] for m in skipped] == ["step 3", "step 4"]  # 1-based step numbers
  assert "2 such steps so far" in skipped[-1]
  # Training went on: the steps after the NaN ones still moved the variables.
  assert any(not np.array_equal(a, b) for a, b in zip(snapshots[4], snapshots[6]))


# -- extraction ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def extraction_inputs(tmp_path_factory):
  import io  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from leo_suite.models import backbones  # pylint: disable=import-outside-toplevel
  from leo_suite.pretrain import classifier as classifier_lib  # pylint: disable=import-outside-toplevel
  from leo_suite.pretrain import pretrain_config  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("extract")
  classifier_lib.export_backbone(backbones.build_backbone("conv4", 28, 1),
                                 pretrain_config.PretrainConfig(image_size=28, channels=1),
                                 str(root / "backbone"))
  rng = np.random.default_rng(0)
  classes = {"train": ["a1", "a2", "a3"], "val": ["b1", "b2"], "test": ["c1", "c2"]}
  for names in classes.values():
    for name in names:
      (root / "images" / name).mkdir(parents=True)
      for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, [28, 28], np.uint8)).save(buffer, format="PNG")
        (root / "images" / name / f"{i}.png").write_bytes(buffer.getvalue())
  (root / "split.json").write_text(json.dumps(classes))
  return root


def run_extraction(wrapper, inputs, out, **fault):
  return scripts_run.run(
      [sys.executable, wrapper, os.path.join(REPO, "scripts", "extract_embeddings.py"),
       f"--backbone_dir={inputs / 'backbone'}", f"--source={inputs / 'images'}",
       f"--split={inputs / 'split.json'}", f"--out={out}", "--dataset_name=tiny",
       "--batch_size=4"],
      capture_output=True, text=True, env=env(**fault), timeout=300, cwd=REPO, check=False)


def _files(folder):
  return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_sigkill_during_extraction_leaves_no_partial_file_and_rerun_completes(
    wrapper, extraction_inputs, tmp_path):
  out = tmp_path / "out"
  folder = out / "tiny" / "center"
  proc = run_extraction(wrapper, extraction_inputs, out, point="half_file", nth=2)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  # train was complete, val died half written, both in the staging folder no reader opens.
  assert not folder.exists()
  staging = [n for n in os.listdir(out / "tiny") if n.startswith("center.tmp-")]
  assert len(staging) == 1 and "train_embeddings.pkl" in os.listdir(out / "tiny" / staging[0])
  with pytest.raises(Exception, match="no such file"):
    embeddings.load_dataset_split(str(out), "tiny", "center", "train")  # absent, not partial
  proc = run_extraction(wrapper, extraction_inputs, out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.listdir(out / "tiny") == ["center"]   # the killed run's staging folder removed
  previous = _files(folder)
  assert sorted(previous) == ["manifest.json", "test_embeddings.pkl", "train_embeddings.pkl",
                              "val_embeddings.pkl"]
  # Killed again halfway through val: the previous generation is whole, byte for byte.
  proc = run_extraction(wrapper, extraction_inputs, out, point="half_file", nth=2)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert _files(folder) == previous
  for split in embeddings.SPLITS:
    assert embeddings.load_dataset_split(str(out), "tiny", "center", split).dim == 64
  proc = run_extraction(wrapper, extraction_inputs, out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.listdir(out / "tiny") == ["center"] and sorted(_files(folder)) == sorted(previous)
  with open(folder / "manifest.json") as handle:
    assert json.load(handle)["generation"] != json.loads(previous["manifest.json"])["generation"]
  for split in embeddings.SPLITS:
    assert embeddings.load_dataset_split(str(out), "tiny", "center", split).dim == 64


@pytest.mark.slow
def test_sigkill_between_the_renames_of_an_extraction_is_named_and_recovered(
    wrapper, extraction_inputs, tmp_path):
  out = tmp_path / "out"
  folder = out / "tiny" / "center"
  assert run_extraction(wrapper, extraction_inputs, out).returncode == 0
  previous = _files(folder)
  # Killed after center -> center.old, before center.tmp-* -> center.
  proc = run_extraction(wrapper, extraction_inputs, out, point="best_swap")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not folder.exists() and _files(out / "tiny" / "center.old") == previous
  with pytest.raises(errors.DataError, match=r"center is missing but .*center.old holds the "
                     r"previous extraction: an extraction was killed while switching it in"):
    embeddings.load_dataset_split(str(out), "tiny", "center", "train")
  proc = run_extraction(wrapper, extraction_inputs, out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.listdir(out / "tiny") == ["center"] and sorted(_files(folder)) == sorted(previous)
  for split in embeddings.SPLITS:
    assert embeddings.load_dataset_split(str(out), "tiny", "center", split).dim == 64


def test_read_only_disk_on_a_new_run_gives_honest_advice(wrapper, tiny_data, tmp_path):
  run_dir = tmp_path / "run"
  proc = run_runner(wrapper, tiny_data, str(run_dir), point="erofs")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "Read-only file system" in error[0]
  assert "No checkpoint was written" in error[0] and "intact" not in error[0]
  assert not run_dir.exists()   # nothing half-made left behind
