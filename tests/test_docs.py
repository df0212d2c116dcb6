"""The documentation's relative links resolve, and README.md stays short.

Every markdown link in README.md, CHANGELOG.md, embeddings/README.md and
docs/*.md whose target is not a URL must name an existing file or directory
(relative to the linking file, anchor removed); an anchor must name a heading
of its target file.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def doc_files():
  names = ("README.md", "CHANGELOG.md", os.path.join("embeddings", "README.md"))
  paths = [os.path.join(ROOT, name) for name in names]
  return paths + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def links(text):
  """Link targets of markdown `text`, outside code blocks and inline code."""
  prose = _INLINE_CODE.sub("", _FENCE.sub("", text))
  return _LINK.findall(prose)


def anchor(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
  text = _INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
  with open(path, encoding="utf-8") as handle:
    text = _FENCE.sub("", handle.read())
  return {anchor(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def broken_links(path):
  """(target, reason) for every relative link of `path` that does not resolve."""
  with open(path, encoding="utf-8") as handle:
    targets = links(handle.read())
  broken = []
  for target in targets:
    if _URL.match(target):
      continue
    file_part, _, fragment = target.partition("#")
    resolved = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part else path)
    if not os.path.exists(resolved):
      broken.append((target, "no such file"))
    elif fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
      broken.append((target, f"no heading with anchor #{fragment}"))
  return broken


def test_link_extraction_skips_code_and_finds_prose_links():
  text = ("See [a](docs/a.md) and [b](b.md#part).\n"
          "```sh\necho [not](a/link.md)\n```\n"
          "`[nor](this.md)` and [url](https://example.com).\n")
  assert links(text) == ["docs/a.md", "b.md#part", "https://example.com"]


def test_anchor_follows_github_rules():
  assert anchor("LEO") == "leo"
  assert anchor("The embedded default: `synthetic`") == "the-embedded-default-synthetic"
  assert anchor("Journey 1: train and evaluate") == "journey-1-train-and-evaluate"


def test_broken_links_are_reported(tmp_path):
  (tmp_path / "here.md").write_text("# Title\n\n## Part two\n", encoding="utf-8")
  page = tmp_path / "page.md"
  page.write_text("[ok](here.md) [ok](here.md#part-two) [ok](#own) [gone](gone.md) "
                  "[bad](here.md#nope)\n\n## Own\n", encoding="utf-8")
  assert broken_links(str(page)) == [("gone.md", "no such file"),
                                     ("here.md#nope", "no heading with anchor #nope")]


def test_readme_links_into_docs():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
    targets = links(handle.read())
  assert sum(t.startswith("docs/") for t in targets) >= 9
  assert "CHANGELOG.md" in targets


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
  assert os.path.exists(path), path
  assert broken_links(path) == []


def test_readme_is_at_most_300_lines():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
    count = len(handle.read().splitlines())
  assert count <= README_MAX_LINES, f"README.md has {count} lines"
