"""Support and query sets in every form: the one loader of export and prediction.

`load_set(path, role, embed)` reads (`scripts/export_classifier.py --support`,
`scripts/predict.py --support / --query / --tasks`):

  DIR/<class>/.../<image>   a class-per-folder tree (or a .zip of one); the class
                            is the folder path under DIR. Images directly in DIR
                            have no label (queries only).
  DIR/ with labels.csv,     a `file,label` CSV (header line required) naming
  or FILE.csv               images relative to the CSV's folder (sub-folders
                            allowed); an empty label = no label (queries only).
  FILE.pkl / FILE.npz       embeddings in LEO format (`extract_embeddings.py`):
                            classes from the keys, original names from the
                            manifest.json beside the file; class `unlabelled`
                            (images in no class folder) = no label. The file
                            of a row is the path its key keeps
                            (`embedding_keys.key_file_path`), else the key's file field.

Images are embedded by `embed(records, origin)`, an
`image_embedder.ImageEmbedder` (`images.decode_encoded` and `image_views.embed`,
as extraction runs them). The rows of a class are kept in file order, so the
same images in any form make the same [N, K, D] support tensor. A support set
needs a label on every example and the same K for every class (`--num_shots`
keeps the first K of each); these are checked before any image is decoded.
"""

import csv
import dataclasses
import io
import json
import os
import posixpath
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from leo_suite import errors
from leo_suite import safeio
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_sources
from leo_suite.serving import support as support_lib

LABELS_CSV = "labels.csv"
EMBEDDING_SUFFIXES = (".pkl", ".npz")
ROLES = ("support", "query")
FORMS_HELP = ("a class-per-folder image tree, a folder of images with labels.csv "
              "(file,label), a file,label .csv, or an embeddings .pkl/.npz")

Embed = Callable[[list], np.ndarray]   # (records, origin) -> [n, D]


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """Rows of a support or query set: file, label (None = unknown), raw embedding."""
  files: Tuple[str, ...]
  labels: Tuple[Optional[str], ...]
  embeddings: np.ndarray      # float32 [n, D], not normalised
  origin: str
  form: str                   # "tree", "csv" or "embeddings"

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  @property
  def labelled(self) -> bool:
    return any(label is not None for label in self.labels)

  def to_support(self, num_shots: int = 0) -> support_lib.SupportSet:
    """N classes (sorted) x K examples; unequal shots refused (see support_lib.check_shots)."""
    groups: Dict[str, list] = {}
    for row, label in enumerate(self.labels):
      groups.setdefault(label, []).append(row)
    return support_lib.support_from_groups(
        {label: self.embeddings[rows] for label, rows in groups.items()}, self.origin,
        num_shots)


def set_form(path: str) -> str:
  """"embeddings", "csv" or "tree" for an existing `path` (no file is read)."""
  lower = path.lower()
  if lower.endswith(EMBEDDING_SUFFIXES):
    return "embeddings"
  if lower.endswith(".csv") or os.path.isfile(os.path.join(path, LABELS_CSV)):
    return "csv"
  return "tree"


def load_set(path: str, role: str, embed: Optional[Embed] = None,
             num_shots: int = 0, num_ways: int = 0, learner: str = "the learner") -> LabelledSet:
  """Any form above -> LabelledSet; DataError/ConfigError naming what to fix.

  `embed` is needed for image forms (else a ConfigError asking for
  --backbone_dir); `num_shots` > 0 keeps the first K examples of each class
  of a support set (0: all, and all classes must have the same number);
  `num_ways` > 0 is `learner`'s N, which a support set's classes must number
  (checked before any image is embedded).
  """
  if role not in ROLES:
    raise ValueError(f"role {role!r} not in {ROLES}")
  if not path or not os.path.exists(path):
    raise errors.DataError(f"{path}: no such file or directory; a {role} set is {FORMS_HELP}")
  form = set_form(path)
  if form == "embeddings":
    files, labels, matrix = _from_embeddings(path)
    rows = _ordered_rows(files, labels, path, role, num_shots, num_ways, learner)
    matrix = matrix[rows]
  else:
    records, files, labels = (_from_csv(path) if form == "csv" else _from_tree(path, role))
    rows = _ordered_rows(files, labels, path, role, num_shots, num_ways, learner)
    if embed is None:
      raise errors.ConfigError(
          f"{path}: the {role} set is images: pass --backbone_dir (the backbone/ folder "
          "of the pretraining whose embeddings the learner was trained on)")
    matrix = np.asarray(embed([records[i] for i in rows], path), np.float32)
  files, labels = tuple(files[i] for i in rows), tuple(labels[i] for i in rows)
  zero = np.flatnonzero(~matrix.any(axis=-1))
  if zero.size:
    raise errors.DataError(
        f"{path}: the embedding of {files[zero[0]]!r} is all zeros, with no direction to "
        "L2-normalise; remove the image or re-extract it")
  return LabelledSet(files, labels, matrix, path, form)


def _ordered_rows(files, labels, origin, role, num_shots, num_ways=0,
                  learner="the learner") -> List[int]:
  """Rows sorted by (label, file); for a support set checked (N, K) and cut to K per class."""
  rows = sorted(range(len(files)), key=lambda i: (labels[i] or "", files[i]))
  if not rows:
    raise errors.DataError(f"{origin}: the {role} set is empty")
  if role == "query":
    return rows
  unlabelled = [files[i] for i in rows if labels[i] is None]
  if unlabelled:
    raise errors.DataError(
        f"{origin}: support example {unlabelled[0]!r} has no label; put each class's "
        f"images in its own sub-folder, or list them in {LABELS_CSV} (file,label)")
  counts: Dict[str, int] = {}
  for i in rows:
    counts[labels[i]] = counts.get(labels[i], 0) + 1
  if num_ways:
    support_lib.check_ways(list(counts), num_ways, origin, learner)
  k = support_lib.check_shots(counts, origin, num_shots)
  taken: Dict[str, int] = {}
  kept = []
  for i in rows:
    taken[labels[i]] = taken.get(labels[i], 0) + 1
    if taken[labels[i]] <= k:
      kept.append(i)
  return kept


# -- the forms ----------------------------------------------------------------------
def _from_tree(path, role):
  if os.path.isdir(path) and role == "support":
    empty = _empty_class_folders(path)
    if empty:
      raise errors.DataError(
          f"{path}: class folder {empty[0]!r} has no images; every class needs at "
          "least one support image (remove the folder or add images)")
  if not os.path.isdir(path) and not path.lower().endswith(".zip"):
    raise errors.DataError(f"{path}: not a folder, .zip, .csv, .pkl or .npz; a {role} set "
                           f"is {FORMS_HELP}")
  records = image_sources.scan_source(path, unlabelled=True)
  files = [posixpath.join(r.class_name, r.file_name) for r in records]
  return records, files, [r.class_name or None for r in records]


def _empty_class_folders(root):
  """Leaf folders under `root` that hold no image (classes without examples)."""
  empty = []
  for directory, subdirs, names in os.walk(root):
    if directory != root and not subdirs and not any(
        n.lower().endswith(image_sources.IMAGE_EXTENSIONS) for n in names):
      empty.append(os.path.relpath(directory, root).replace(os.sep, "/"))
  return sorted(empty)


def _from_csv(path):
  """Records of a `file,label` CSV (or DIR/labels.csv); paths relative to its folder."""
  csv_path = path if path.lower().endswith(".csv") else os.path.join(path, LABELS_CSV)
  base = os.path.dirname(os.path.abspath(csv_path))
  payload = safeio.read_bytes(csv_path)   # a regular file under the cap, or DataError
  try:
    lines = list(csv.reader(io.StringIO(payload.decode("utf-8-sig"), newline="")))
  except UnicodeDecodeError:
    raise errors.DataError(f"{csv_path}: not UTF-8 text; save it as a UTF-8 CSV") from None
  except (OSError, csv.Error) as exc:
    raise errors.DataError(f"{csv_path}: cannot be read as CSV ({exc})") from None
  header = [c.strip().lower() for c in lines[0]] if lines else []
  if header not in (["file", "label"], ["filename", "label"]):
    raise errors.DataError(
        f"{csv_path}: the first line must be the header 'file,label' (found "
        f"{','.join(lines[0])[:80] if lines else 'an empty file'!r})")
  records, files, labels, seen, missing = [], [], [], {}, []
  for number, row in enumerate(lines[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != 2 or not row[0].strip():
      raise errors.DataError(
          f"{csv_path}:{number}: expected 'file,label' (quote names with commas), got "
          f"{','.join(row)[:120]!r}")
    name, label = row[0].strip().replace("\\", "/"), row[1].strip()
    if name in seen:
      raise errors.DataError(f"{csv_path}:{number}: {name!r} is listed again (first on "
                             f"line {seen[name]}); list each image once")
    seen[name] = number
    image = os.path.join(base, name)
    if not os.path.isfile(image):
      missing.append(image)
    records.append(image_sources.ImageRecord(label, posixpath.basename(name), image,
                                             ("file", image)))
    files.append(name)
    labels.append(label or None)
  if missing:
    raise errors.DataError(
        f"{csv_path}: {len(missing)} listed image(s) not found, first {missing[0]}; file "
        f"names are relative to {base}")
  return records, files, labels


def _manifest_names(path):
  """Token -> original class name from extraction's manifest.json beside `path`."""
  manifest = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
  if not os.path.exists(manifest):
    return {}
  try:   # a FIFO or device in its place is refused (DataError), not read
    names = json.loads(safeio.read_bytes(manifest)).get("class_names", {})
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}
  except (OSError, ValueError, AttributeError):
    return {}


def _from_embeddings(path):
  """(files, labels, float32 [n, D]) of a LEO-format file, in file order."""
  keys, matrix = embeddings_lib.read_keys_and_embeddings(path)   # DataError with the reason
  names = _manifest_names(path)
  tokens, files = [], []
  for index, key in enumerate(keys):
    token, image_file = embedding_keys.parse_key(key, path, index)
    tokens.append(token)
    files.append(embedding_keys.key_file_path(key) or image_file)
  present = sorted(set(tokens))
  originals = {t: names.get(t, t) for t in present}
  if len(set(originals.values())) != len(present):   # two tokens, one name: keep tokens
    originals = {t: t for t in present}
  labels = [None if t == embedding_keys.UNLABELLED and names.get(t, "") == "" else originals[t]
            for t in tokens]
  return files, labels, matrix
