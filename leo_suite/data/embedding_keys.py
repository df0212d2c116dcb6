"""The keys of LEO-format embedding files: `<prefix>-<class>-<file>`.

Each row of a split file has a key whose file name's part before `_` equals
the class (`parse_key`), as in DeepMind's release; `make_key` writes
release-style keys and `make_path_key` keys that keep an image's relative path.
"""

import re
from typing import Optional

from leo_suite import errors
from leo_suite.data.safe_arrays import shorten


def parse_key(key: str, path: str, index: int):
  """Splits `<prefix>-<class>-<file>` into (class, file), checking the format."""
  fields = key.split("-")
  if len(fields) != 3 or not fields[1] or not fields[2]:
    raise errors.DataError(
        f"{path}: keys[{index}] = {shorten(key)} is malformed: expected exactly "
        "three '-'-separated fields '<prefix>-<class>-<file>'")
  _, class_name, image_file = fields
  if image_file.split("_")[0] != class_name:
    raise errors.DataError(
        f"{path}: keys[{index}] = {shorten(key)} is malformed: the file name "
        f"{shorten(image_file)} should start with its class {shorten(class_name)} followed by '_'")
  return class_name, image_file


def make_key(class_name: str, index: int, prefix: str = "img", ext: str = "png") -> str:
  """Builds a release-style key `<prefix>-<class>-<class>_<index>.<ext>`."""
  if "-" in class_name or "_" in class_name or "-" in prefix or not class_name:
    raise ValueError(
        f"a class name may not contain '-' or '_' (and a prefix no '-'): "
        f"{class_name!r}, {prefix!r}")
  return f"{prefix}-{class_name}-{class_name}_{index:05d}.{ext}"


# -- keys that keep the image's relative path ------------------------------------------
# `path-<class>-<class>_<encoded relative path>`: letters, digits and '.' stand
# for themselves; every other character (including '_', '-', '/', spaces and
# non-ASCII) is written as '_hh' for each byte of its UTF-8 encoding (lowercase
# hex). The key is ASCII, holds no '-' after the class field, and
# `key_file_path` gives the path back exactly: 'cat/my file-1.png' ->
# 'path-cat-cat_cat_2fmy_20file_2d1.png'. Class `unlabelled` holds images that
# were in no class folder.
PATH_KEY_PREFIX = "path"
UNLABELLED = "unlabelled"
_PATH_LITERAL = re.compile(r"[A-Za-z0-9.]")
_PATH_ESCAPE = re.compile(r"_([0-9a-f]{2})")


def encode_path(path: str) -> str:
  """A relative path as `[A-Za-z0-9._]+` (see above); `decode_path` inverts it."""
  out = []
  for char in path:
    if _PATH_LITERAL.fullmatch(char):
      out.append(char)
    else:   # surrogateescape: undecodable file-name bytes survive too
      out.extend(f"_{b:02x}" for b in char.encode("utf-8", "surrogateescape"))
  return "".join(out)


def decode_path(text: str) -> str:
  """Inverse of `encode_path`; ValueError if `text` is not one of its outputs."""
  raw, pos = bytearray(), 0
  while pos < len(text):
    if text[pos] == "_":
      match = _PATH_ESCAPE.match(text, pos)
      if not match:
        raise ValueError(f"{shorten(text)}: '_' at {pos} is not followed by two hex digits")
      raw.append(int(match.group(1), 16))
      pos = match.end()
    elif _PATH_LITERAL.fullmatch(text[pos]):
      raw.extend(text[pos].encode("ascii"))
      pos += 1
    else:
      raise ValueError(f"{shorten(text)}: {text[pos]!r} at {pos} is never written by encode_path")
  return raw.decode("utf-8", "surrogateescape")


def make_path_key(class_token: str, relative_path: str) -> str:
  """`path-<class>-<class>_<encode_path(relative_path)>`, a valid `parse_key` key."""
  key = f"{PATH_KEY_PREFIX}-{class_token}-{class_token}_{encode_path(relative_path)}"
  parse_key(key, "make_path_key", 0)   # a class token with '-' or '_' is refused
  return key


def key_file_path(key: str) -> Optional[str]:
  """The relative path a `make_path_key` key keeps; None for other keys (no path)."""
  fields = key.split("-")
  if len(fields) != 3 or fields[0] != PATH_KEY_PREFIX:
    return None
  class_name, image_file = fields[1], fields[2]
  if not image_file.startswith(class_name + "_"):
    return None
  try:
    return decode_path(image_file[len(class_name) + 1:])
  except ValueError:
    return None
