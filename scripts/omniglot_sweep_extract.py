"""Extract a sweep backbone's Omniglot-small embeddings and score val NCM (issue 12).

  .venv/bin/python scripts/omniglot_sweep_extract.py runs/sweep/<name> [val_tasks]

Writes runs/sweep/<name>/embeddings/omniglot_small/center/*.pkl and prints the
cosine-NCM accuracy on the meta-val split for 5w1s / 5w5s / 20w1s on the same
fixed episodes runner.py validates on (--eval_seed=0, 15 queries).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract  # pylint: disable=wrong-import-position
from leo_suite.pretrain import images as images_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position

run = sys.argv[1]
tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 300
omniglot_dir = images_lib.default_omniglot_dir()
archives = [os.path.join(omniglot_dir, n) for n in
            ("images_background_small1.zip", "images_background_small2.zip")]
by_class, split_classes, origin = images_lib.load_labelled_splits(archives, "omniglot_small",
                                                                  omniglot_dir)
data_path = os.path.join(run, "embeddings")
if not os.path.exists(os.path.join(data_path, "omniglot_small", "center", "manifest.json")):
  extract.extract_embeddings(os.path.join(run, "backbone"), by_class, split_classes, data_path,
                             "omniglot_small", "center", "pkl", 256, expected_size=(105, 105),
                             allowed_modes=("1", "L"), sources=archives, split_origin=origin,
                             log=lambda s: None)
val = embeddings_lib.load_dataset_split(data_path, "omniglot_small", "center", "val")
rows = pipeline.evaluate_baselines(val, "val", num_episodes=tasks, seed=0)
out = {r["method"] + " " + r["setting"]: round(r["accuracy"], 2) for r in rows}
print(json.dumps({"run": run, "val_tasks": tasks, **out}))
