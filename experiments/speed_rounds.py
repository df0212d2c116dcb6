"""Issue 32's ratios in rounds: LEO against the release, MAML against the peer.

  python experiments/speed_rounds.py --release_dir=/work/anchors/release \
      --peer_python=/work/anchors/peer-venv/bin/python --out_dir=runs/rounds

Each round runs, back to back: scripts/benchmark.py's LEO and MAML training
rows, the release's graph (`leo_release_speed.py RELEASE_DIR 1 5`) and the
peer at 1 and 5 shots (`maml_peer_higher.py K`, in the peer's own Python),
from `--anchors_dir` (../shared/tools/anchors: its README says how to set
them up). It prints each round's ratios and their medians and ranges, and
writes them with the load averages to <out_dir>/rounds.json (logs beside it).
Run it on a quiet machine.
"""
import json
import os
import subprocess
import sys
import time

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite import fileio  # pylint: disable=wrong-import-position
from leo_suite.bench import anchors  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("release_dir", "", "folder holding the release's model.py and data.py")
flags.DEFINE_string("peer_python", "", "the Python of a venv with torch and higher")
flags.DEFINE_string("anchors_dir", os.path.join(REPO, "..", "shared", "tools", "anchors"),
                    "folder of leo_release_speed.py and maml_peer_higher.py")
flags.DEFINE_string("out_dir", "runs/speed_rounds", "logs and rounds.json go here")
flags.DEFINE_integer("rounds", 3, "rounds (each about 2 minutes on 2 cores)")
FLAGS = flags.FLAGS


def need_file(path, flag, what):
  if not os.path.isfile(path):
    raise errors.ConfigError(f"{flag}: {path} is not a file ({what})")


def logged(args, log_path):
  """Runs `args`, its output into `log_path`; the output, or DataError naming the log."""
  with open(log_path, "w") as log:
    proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=REPO)
  with open(log_path) as log:
    text = log.read()
  if proc.returncode != 0:
    raise errors.DataError(f"{' '.join(args[:2])} exited with {proc.returncode}; see {log_path}: "
                           f"{text.strip()[-300:]!r}")
  return text


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  release_script = os.path.join(FLAGS.anchors_dir, "leo_release_speed.py")
  peer_script = os.path.join(FLAGS.anchors_dir, "maml_peer_higher.py")
  need_file(release_script, "--anchors_dir", "the anchors' release timer")
  need_file(peer_script, "--anchors_dir", "the anchors' peer timer")
  need_file(os.path.join(FLAGS.release_dir, "model.py"), "--release_dir", "the release's model.py")
  need_file(FLAGS.peer_python, "--peer_python", "a Python with torch and higher")
  if FLAGS.rounds < 1:
    raise errors.ConfigError(f"--rounds must be >= 1, got {FLAGS.rounds}")
  out = FLAGS.out_dir
  os.makedirs(out, exist_ok=True)
  record = {"load_before": os.getloadavg(), "rounds": []}
  for r in range(1, FLAGS.rounds + 1):
    train_json = os.path.join(out, f"train{r}.json")
    logged([sys.executable, "scripts/benchmark.py", "--only=leo,maml", f"--output={train_json}",
            "--skip=eval,memory,extraction,serving,map_fn"], os.path.join(out, f"train{r}.log"))
    with open(train_json) as handle:
      train_rows = json.load(handle)["train"]
    release = anchors.release_tasks_per_s(logged(
        [sys.executable, release_script, FLAGS.release_dir, "1", "5"],
        os.path.join(out, f"release{r}.log")))
    peer = {}
    for k in (1, 5):
      peer.update(anchors.peer_tasks_per_s(logged(
          [FLAGS.peer_python, peer_script, str(k)], os.path.join(out, f"peer{k}_{r}.log"))))
    ratios = anchors.round_ratios(train_rows, release, peer)
    record["rounds"].append({"time": time.strftime("%H:%M:%S"), "ratios": ratios})
    print(f"round {r}: " + "; ".join(
        f"K={k}: LEO {v['leo']:,.0f} / release {v['release']:,.0f} = {v['leo_ratio']:.2f}x, "
        f"MAML {v['maml']:,.0f} / peer {v['peer']:,.0f} = {v['maml_ratio']:.2f}x"
        for k, v in ratios.items()), flush=True)
  record["load_after"] = os.getloadavg()
  record["summary"] = anchors.summary([r["ratios"] for r in record["rounds"]])
  for k, per_shot in record["summary"].items():
    for key, v in per_shot.items():
      print(f"K={k} {key}: median {v['median']:.2f}x ({v['low']:.2f}-{v['high']:.2f})")
  fileio.atomic_write_text(os.path.join(out, "rounds.json"), json.dumps(record, indent=1))


if __name__ == "__main__":
  console.run(main)
