"""Your own few-shot tasks: a trained run adapted to a support set, predicting queries.

`scripts/predict.py` is its command line. The learner is rebuilt from the run
directory (`Run.opened(dir)`, holding its lock; `restored_learner()`: its
settings and best, else latest, checkpoint), never from flags. Support and query sets are read by
`leo_suite.serving.sets.load_set` (trees, folders or CSVs of images,
embeddings files), images embedded by `image_embedder.ImageEmbedder` with the
run's embedding crop. Support and query embeddings are L2-normalised and the
learner adapted and applied by `support.adapt_support` / `support.query_logits`,
the very functions of the exported SavedModel, in eval mode with the zero seed
as evaluation does, so predict, export and `runner.py --evaluation_mode`
agree on the same embeddings.

The backbone for image sets is `--backbone_dir`, else the one the run's data
manifest (`<data_path>/<dataset_name>/<crop>/manifest.json`) names; a
backbone whose weights differ from the manifest's is refused.

A task folder (`--tasks=DIR`) holds one sub-folder per task, each with a
support and a query set named `support` / `query` (a folder, or
`support.csv`, `support.pkl`, `support.npz`, `support.zip`, likewise query).
"""

import csv
import dataclasses
import io
import json
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite import progress as progress_lib
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.models import image_embedder
from leo_suite.serving import export
from leo_suite.serving import sets
from leo_suite.serving import support as support_lib
from leo_suite.training import evaluation
from leo_suite.training import run as run_lib

OUTPUT_FORMATS = (".csv", ".json")
SET_NAMES = ("support", "query")
SET_SUFFIXES = ("", ".csv", ".pkl", ".npz", ".zip")


@dataclasses.dataclass(frozen=True)
class TaskResult:
  """One task's predictions: probabilities [Q, N] over `classes` for each query file."""
  name: Optional[str]
  support: str
  query: str
  classes: Tuple[str, ...]
  num_shots: int
  files: Tuple[str, ...]
  labels: Tuple[Optional[str], ...]
  probabilities: np.ndarray

  @property
  def predicted(self) -> List[str]:
    return [self.classes[i] for i in self.probabilities.argmax(axis=-1)]

  @property
  def num_labelled(self) -> int:
    return sum(label is not None for label in self.labels)

  @property
  def accuracy(self) -> Optional[float]:
    """Accuracy over the labelled queries (None if no query has a label)."""
    hits = [p == l for p, l in zip(self.predicted, self.labels) if l is not None]
    return float(np.mean(hits)) if hits else None


class Predictor:
  """A run's learner (restored once) and, on first need, its backbone."""

  def __init__(self, run_dir: str, backbone_dir: Optional[str] = None, num_shots: int = 0,
               batch_size: int = 64):
    if num_shots < 0:
      raise errors.ConfigError(f"--num_shots={num_shots}: must be >= 0 (0 = all)")
    if backbone_dir and not os.path.isdir(backbone_dir):
      raise errors.DataError(f"--backbone_dir={backbone_dir}: no such directory; pass the "
                             "backbone/ folder written by scripts/pretrain.py")
    with run_lib.Run.opened(run_dir) as run:
      self.restored = export.restore_learner(run)
    self.run, self.learner = self.restored.run, self.restored.learner
    self.num_shots, self.batch_size, self.backbone_dir = num_shots, batch_size, backbone_dir
    self.crop = export.run_crop(self.run)
    self.manifest_path, self.manifest = self._data_manifest()
    self._embedder = None
    self._logits = tf.function(self._adapt_and_predict, reduce_retracing=True,
                               autograph=False)

  def _data_manifest(self):
    """(path, contents or None) of the extraction manifest of the run's embeddings."""
    data_path = (self.run.record.get("data") or {}).get("data_path")
    if not data_path:
      return "(the run records no data path)", None
    path = os.path.join(data_path, self.run.settings["dataset_name"],
                        self.run.settings["embedding_crop"], embeddings_lib.MANIFEST)
    try:
      with safeio.open_regular(path) as handle:
        manifest = json.load(handle)
      return path, manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError, errors.DataError):
      return path, None

  # -- images ------------------------------------------------------------------------
  def embedder(self, origin: str):
    """The ImageEmbedder: --backbone_dir, else the run's data manifest's backbone."""
    if self._embedder is not None:
      return self._embedder
    named = ((self.manifest or {}).get("backbone") or {})
    directory = self.backbone_dir or named.get("dir")
    if not directory:
      raise errors.ConfigError(
          f"{origin}: the set is images: pass --backbone_dir (the backbone/ folder of the "
          f"pretraining whose embeddings {self.run.directory} was trained on); the run's "
          f"data manifest {self.manifest_path} "
          f"{'names no backbone' if self.manifest else 'does not exist'}")
    embedder = image_embedder.ImageEmbedder(directory, self.crop, self.batch_size,
                                            tool_flags=False)
    expected = named.get("checkpoint_sha256")
    found = embedder.description.get("weights_sha256")
    if expected and found != expected:
      raise errors.ConfigError(
          f"{directory}: backbone weights sha256 {str(found)[:12]}... differ from the "
          f"{expected[:12]}... that made the run's embeddings ({self.manifest_path}); pass "
          "--backbone_dir=<the backbone/ of that pretraining>")
    if embedder.feature_dim != self.learner.embedding_dim:
      raise errors.DataError(
          f"{directory}: the backbone gives {embedder.feature_dim}-d features but "
          f"{self.run.directory} was trained on D={self.learner.embedding_dim}; pass the "
          "backbone whose embeddings the run was trained on")
    self._embedder = embedder
    return embedder

  def _embed(self, records, origin):
    return self.embedder(origin)(records, origin)

  def load(self, path: str, role: str) -> sets.LabelledSet:
    """A set of `role`; a support set's N is checked before any image is embedded."""
    support = role == "support"
    labelled = sets.load_set(path, role, self._embed, self.num_shots if support else 0,
                             self.learner.num_ways if support else 0, self.run.directory)
    if labelled.dim != self.learner.embedding_dim:
      raise errors.DataError(
          f"{path}: {role} embeddings have D={labelled.dim} but {self.run.directory} was "
          f"trained on D={self.learner.embedding_dim}; use embeddings from the backbone "
          "the run was trained on")
    return labelled

  # -- tasks -------------------------------------------------------------------------
  def _adapt_and_predict(self, support_embeddings, query_embeddings):
    state = support_lib.adapt_support(self.learner, support_embeddings)
    return tf.nn.softmax(support_lib.query_logits(self.learner, state, query_embeddings))

  def predict_task(self, support_path: str, query_path: str,
                   name: Optional[str] = None) -> TaskResult:
    support = self.load(support_path, "support").to_support(self.num_shots)
    queries = self.load(query_path, "query")
    unknown = [(f, l) for f, l in zip(queries.files, queries.labels)
               if l is not None and l not in support.class_names]
    if unknown:
      raise errors.DataError(
          f"{query_path}: query {safeio.quoted(unknown[0][0])} has label "
          f"{safeio.quoted(unknown[0][1])}, which is not a support class "
          f"({safeio.listed(support.class_names)}); fix the label or leave it empty")
    probabilities = self._logits(tf.constant(support.embeddings),
                                 tf.constant(queries.embeddings)).numpy()
    return TaskResult(name, support_path, query_path, support.class_names, support.num_shots,
                      queries.files, queries.labels, probabilities)

  def predict_tasks(self, tasks: Sequence[Tuple[str, str, str]],
                    log: Callable[[str], None] = print) -> List[TaskResult]:
    """Every (name, support, query) task, logging progress (rate, ETA)."""
    progress = progress_lib.Progress("predict", len(tasks), "tasks", interval_s=5.0,
                                     log=lambda fmt, *args: log(fmt % args))
    results = []
    for name, support, query in tasks:
      results.append(self.predict_task(support, query, name))
      progress.update(1)
    return results

  def description(self) -> dict:
    """What produced the predictions (for the JSON output)."""
    embedder = self._embedder
    return {"run": os.path.abspath(self.run.directory),
            "checkpoint": os.path.abspath(self.restored.checkpoint),
            "model": self.run.model, "num_ways": self.learner.num_ways,
            "embedding_dim": self.learner.embedding_dim, "crop": self.crop,
            "backbone": None if embedder is None else {
                "dir": os.path.abspath(embedder.backbone_dir),
                "weights_sha256": embedder.description.get("weights_sha256")}}


def find_set(folder: str, name: str) -> str:
  """The one `name`, `name`.csv/.pkl/.npz/.zip in `folder`; DataError otherwise."""
  found = [os.path.join(folder, name + s) for s in SET_SUFFIXES
           if os.path.exists(os.path.join(folder, name + s))]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)} ({', '.join(os.path.basename(f) for f in found)})"
    raise errors.DataError(
        f"{folder}: {what} {name} set; a task folder holds one {name}/ folder (or "
        f"{name}.csv, {name}.pkl, {name}.npz, {name}.zip) and likewise one "
        f"{SET_NAMES[1] if name == SET_NAMES[0] else SET_NAMES[0]}")
  return found[0]


def find_tasks(tasks_dir: str) -> List[Tuple[str, str, str]]:
  """[(name, support, query)] of every sub-folder of `tasks_dir`, sorted by name."""
  if not os.path.isdir(tasks_dir):
    raise errors.DataError(f"--tasks={tasks_dir}: no such directory; pass a folder with one "
                           "sub-folder per task, each holding support/ and query/")
  names = sorted(n for n in os.listdir(tasks_dir)
                 if not n.startswith(".") and os.path.isdir(os.path.join(tasks_dir, n)))
  if not names:
    raise errors.DataError(f"--tasks={tasks_dir}: no task sub-folders; each task is a "
                           "sub-folder holding support/ and query/")
  return [(n, find_set(os.path.join(tasks_dir, n), "support"),
           find_set(os.path.join(tasks_dir, n), "query")) for n in names]


def plan(checkpoint_path: Optional[str], support: Optional[str], query: Optional[str],
         tasks_dir: Optional[str], output: Optional[str] = None,
         batch_size: int = 64) -> List[Tuple[Optional[str], str, str]]:
  """Checks scripts/predict.py's flags; the (name, support, query) tasks to run."""
  if not checkpoint_path:
    raise errors.ConfigError("--checkpoint_path is required (a runner.py run directory)")
  if tasks_dir and (support or query):
    raise errors.ConfigError("--tasks replaces --support/--query: give one or the other")
  if not tasks_dir and not (support and query):
    raise errors.ConfigError("pass --support=... and --query=..., or --tasks=DIR")
  if batch_size < 1:
    raise errors.ConfigError(f"--batch_size={batch_size} must be >= 1")
  check_output(output)
  tasks = find_tasks(tasks_dir) if tasks_dir else [(None, support, query)]
  target = output and os.path.realpath(output)
  for name, *paths in tasks:
    for role, path in zip(SET_NAMES, paths):
      if target and os.path.realpath(path) == target:
        raise errors.ConfigError(
            f"--output={output} is the {role} set{f' of task {name}' if name else ''} "
            f"({path}); writing the predictions would replace it: choose another --output")
  return tasks


# -- results -------------------------------------------------------------------------
def summary(results: Sequence[TaskResult]) -> Optional[evaluation.Result]:
  """Mean accuracy and 95% CI over the tasks with labelled queries (None if none)."""
  scored = [r.accuracy for r in results if r.accuracy is not None]
  return evaluation.summarise(scored) if scored else None


def check_output(path: Optional[str]):
  """Refuses an --output that is not a .csv or .json file path (before any work)."""
  if path is None:
    return
  if os.path.splitext(path)[1].lower() not in OUTPUT_FORMATS:
    raise errors.ConfigError(
        f"--output={path}: use a .csv or .json file name (the format follows the suffix)")
  if os.path.isdir(path):
    raise errors.ConfigError(f"--output={path} is a directory; give a file name")


def as_csv(results: Sequence[TaskResult]) -> str:
  """One row per query: task, file, label, predicted, correct, then class_i, prob_i."""
  width = max(len(r.classes) for r in results)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["task", "file", "label", "predicted", "correct"] +
                  [c for i in range(1, width + 1) for c in (f"class_{i}", f"prob_{i}")])
  for r in results:
    for file, label, predicted, probs in zip(r.files, r.labels, r.predicted, r.probabilities):
      correct = "" if label is None else int(label == predicted)
      writer.writerow([r.name or "", file, label or "", predicted, correct] +
                      [v for c, p in zip(r.classes, probs) for v in (c, f"{p:.8g}")])
  return buffer.getvalue()


def as_json(results: Sequence[TaskResult], about: dict) -> str:
  total = summary(results)
  tasks = [{"task": r.name, "support": r.support, "query": r.query,
            "classes": list(r.classes), "num_shots": r.num_shots,
            "accuracy": r.accuracy, "num_labelled": r.num_labelled,
            "predictions": [{"file": f, "label": l, "predicted": p,
                             "probabilities": {c: float(v) for c, v in zip(r.classes, probs)}}
                            for f, l, p, probs in zip(r.files, r.labels, r.predicted,
                                                      r.probabilities)]}
           for r in results]
  return json.dumps(dict(about, tasks=tasks, accuracy=total and total.as_dict()), indent=1,
                    ensure_ascii=False)


def encoded(text: str, json_text: bool) -> bytes:
  """UTF-8 of an output: a file name that is not valid UTF-8 keeps its bytes in a
  CSV (as `ls` prints it) and becomes the escape `\\udcXX` in JSON strings
  (`os.fsencode(json.load(...)[...])` gives the bytes back), never an error."""
  return text.encode("utf-8", "backslashreplace" if json_text else "surrogateescape")


def write_output(path: str, results: Sequence[TaskResult], about: dict):
  """Writes the predictions atomically: a kill leaves the old file or none."""
  check_output(path)
  json_text = path.lower().endswith(".json")
  text = as_json(results, about) if json_text else as_csv(results)
  fileio.atomic_write_bytes(path, encoded(text, json_text))


def write_stdout(results: Sequence[TaskResult], stdout=None):
  """The CSV on standard output, whatever the locale's strictness (see `encoded`)."""
  stdout = stdout or sys.stdout
  stdout.flush()
  stdout.buffer.write(encoded(as_csv(results), False))
  stdout.buffer.flush()


def report_lines(results: Sequence[TaskResult]) -> List[str]:
  """Per-task accuracy, then the mean with its 95% CI (when queries have labels)."""
  lines = [f"{r.name or r.query}: {100 * r.accuracy:.2f}% of {r.num_labelled} queries "
           f"({len(r.classes)}-way {r.num_shots}-shot)" for r in results
           if r.accuracy is not None]
  total = summary(results)
  if total is not None and (len(results) > 1 or not lines):
    lines.append(f"mean accuracy: {total.as_percent()}")
  if total is None:
    lines.append(f"{sum(len(r.files) for r in results)} queries predicted (no labels, "
                 "so no accuracy)")
  return lines
