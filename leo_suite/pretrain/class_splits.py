"""Class splits of image sources: which classes are meta-train, -val and -test.

Splits are lists of class names or class-path prefixes (an Omniglot alphabet
selects all its characters), from a JSON file or a named protocol
(`omniglot_small`); `assign_classes` checks that splits are disjoint, that
every entry selects something, and the expected per-split class counts.
`load_labelled_splits` scans the sources (`leo_suite.data.image_sources`) and
assigns their classes.
"""

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from leo_suite import errors
from leo_suite import safeio
from leo_suite.data.image_sources import group_by_class
from leo_suite.data.image_sources import ImageRecord
from leo_suite.data.image_sources import merge_records
from leo_suite.data.image_sources import scan_csv_splits
from leo_suite.data.image_sources import scan_source
from leo_suite.data.image_sources import SPLIT_NAMES

NAMED_PROTOCOLS = {"omniglot_small": "omniglot_small_split.json"}
OMNIGLOT_ENV = "LEO_SUITE_OMNIGLOT_DIR"


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """Entries (class names or class-path prefixes) per split, and where from."""
  entries: Dict[str, List[str]]
  origin: str
  expected_counts: Optional[Dict[str, int]] = None


def default_omniglot_dir():
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.environ.get(OMNIGLOT_ENV, os.path.join(here, "..", "shared", "data", "omniglot"))


def load_split_spec(spec: str, protocol_dir: Optional[str] = None) -> SplitSpec:
  """A named protocol (`omniglot_small`) or a JSON file of class lists.

  JSON keys: `train`/`val`/`test` or `meta_train`/`meta_val`/`meta_test`,
  each a list of class names or prefixes; optional `characters` or
  `class_counts` {split: expected number of classes}.
  """
  if spec in NAMED_PROTOCOLS:
    path = os.path.join(protocol_dir or default_omniglot_dir(), NAMED_PROTOCOLS[spec])
  else:
    path = spec
  try:
    if not os.path.lexists(path):
      raise FileNotFoundError(path)
    with safeio.open_regular(path) as handle:   # a FIFO or device is refused, not read
      content = json.load(handle)
  except FileNotFoundError:
    extra = (f" (protocol {spec!r}; set {OMNIGLOT_ENV} or --protocol_dir)"
             if spec in NAMED_PROTOCOLS else
             f"; named protocols are {sorted(NAMED_PROTOCOLS)}")
    raise errors.DataError(f"{path}: no such split file{extra}") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
    raise errors.DataError(f"{path}: not a readable JSON split file ({exc})") from None
  if not isinstance(content, dict):
    raise errors.DataError(f"{path}: expected a JSON object with train/val/test lists")
  entries, counts = {}, {}
  declared = content.get("characters") or content.get("class_counts") or {}
  for split in SPLIT_NAMES:
    for key in (split, "meta_" + split):
      if key in content:
        value = content[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
          raise errors.DataError(f"{path}: {key!r} must be a list of class names")
        entries[split] = list(value)
        if isinstance(declared, dict) and key in declared:
          counts[split] = int(declared[key])
  if not entries:
    raise errors.DataError(
        f"{path}: no 'train'/'val'/'test' (or 'meta_train'/...) class lists found")
  seen = {}
  for split, names in entries.items():
    for name in names:
      if name in seen and seen[name] != split:
        raise errors.DataError(
            f"{path}: {name!r} is listed in both {seen[name]} and {split}; "
            "train/val/test classes must not overlap")
      if name in seen:
        raise errors.DataError(f"{path}: {name!r} is listed twice in {split}")
      seen[name] = split
  return SplitSpec(entries, path, counts or None)


def split_spec_from_lists(lists: Dict[str, List[str]], origin: str) -> SplitSpec:
  return SplitSpec({k: list(v) for k, v in lists.items()}, origin)


def _matches(entry, class_name):
  return class_name == entry or class_name.startswith(entry.rstrip("/") + "/")


def assign_classes(class_names: Sequence[str], spec: SplitSpec) -> Dict[str, List[str]]:
  """{split: sorted class names}; checks disjointness, coverage and counts."""
  assigned: Dict[str, List[str]] = {}
  owner = {}
  for split, entries in spec.entries.items():
    chosen = []
    for entry in entries:
      hits = [c for c in class_names if _matches(entry, c)]
      if not hits:
        raise errors.DataError(
            f"{spec.origin}: {split} entry {entry!r} matches no class of the "
            f"image sources (classes look like {sorted(class_names)[:3]})")
      for name in hits:
        if name in owner and owner[name] != split:
          raise errors.DataError(
              f"{spec.origin}: class {name!r} is selected by both {owner[name]} "
              f"and {split}; train/val/test classes must not overlap")
        owner[name] = split
      chosen.extend(hits)
    assigned[split] = sorted(set(chosen))
  if spec.expected_counts:
    for split, expected in spec.expected_counts.items():
      found = len(assigned.get(split, []))
      if found != expected:
        raise errors.DataError(
            f"{spec.origin}: {split} should have {expected} classes but the "
            f"sources give {found}; are all archives/folders passed?")
  return assigned


def check_nonempty(split_classes: Dict[str, List[str]],
                   by_class: Dict[str, List[ImageRecord]], origin: str):
  for split, names in split_classes.items():
    if not names:
      raise errors.DataError(f"{origin}: split {split!r} has no classes")
    for name in names:
      if not by_class.get(name):
        raise errors.DataError(f"{origin}: class {name!r} ({split}) has no images")


def load_labelled_splits(sources: Sequence[str], split: str,
                         protocol_dir: Optional[str] = None,
                         tfds_data_dir: Optional[str] = None,
                         tfds_download: bool = False):
  """Sources + split spec -> (records by class, {split: classes}, split origin).

  A source `csv:<root>` is a miniImageNet CSV root; with `split='csv'` its
  CSVs define the class split. Otherwise `split` is a protocol name or JSON.
  """
  csv_roots = [s[len("csv:"):] for s in sources if s.startswith("csv:")]
  others = [s for s in sources if not s.startswith("csv:")]
  groups, csv_lists = [], {}
  for root in csv_roots:
    records, lists = scan_csv_splits(root)
    groups.append(records)
    for name, classes in lists.items():
      csv_lists.setdefault(name, []).extend(classes)
  groups.extend(scan_source(s, tfds_data_dir, tfds_download) for s in others)
  if not groups:
    raise errors.ConfigError("no image source given (--source)")
  by_class = group_by_class(merge_records(groups))
  if split == "csv":
    if not csv_roots:
      raise errors.ConfigError("--split=csv needs a --source=csv:<miniImageNet root>")
    spec = split_spec_from_lists(csv_lists, ",".join(f"{r}/*.csv" for r in csv_roots))
  else:
    spec = load_split_spec(split, protocol_dir)
  split_classes = assign_classes(list(by_class), spec)
  check_nonempty(split_classes, by_class, spec.origin)
  return by_class, split_classes, spec.origin


def hold_out(classes: Sequence[str], fraction: float, seed: int,
             min_classes: int = 1) -> Tuple[List[str], List[str]]:
  """(kept, held out): `fraction` of `classes`, drawn with `seed`, held out.

  The Omniglot pipeline's --metatrain_holdout: the backbone pretrains on the
  kept classes and the learners meta-train on episodes of the held-out ones,
  embedded by that backbone, so that meta-training meets unseen classes as
  meta-val and meta-test do. Both parts keep the classes' order.
  """
  if not 0.0 < fraction < 1.0:
    raise errors.ConfigError(f"--metatrain_holdout={fraction}: use a fraction in (0, 1), "
                             "or 0 to meta-train on the pretraining classes")
  count = int(round(fraction * len(classes)))
  if count < min_classes or len(classes) - count < min_classes:
    raise errors.ConfigError(
        f"--metatrain_holdout={fraction}: holds out {count} of {len(classes)} classes; each "
        f"part needs at least {min_classes} (the widest episode's ways)")
  chosen = set(np.random.default_rng(seed).choice(len(classes), count, replace=False).tolist())
  kept = [c for i, c in enumerate(classes) if i not in chosen]
  held = [c for i, c in enumerate(classes) if i in chosen]
  return kept, held
