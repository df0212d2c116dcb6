"""Shared pytest fixtures."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT_ENV = "LEO_SUITE_OMNIGLOT_DIR"


def omniglot_dir():
  """Where the real Omniglot archives are: $LEO_SUITE_OMNIGLOT_DIR or ../shared."""
  return os.environ.get(
      OMNIGLOT_ENV, os.path.join(REPO_ROOT, "..", "shared", "data", "omniglot"))


@pytest.fixture
def omniglot_archives():
  directory = omniglot_dir()
  archives = [os.path.join(directory, name) for name in
              ("images_background_small1.zip", "images_background_small2.zip")]
  missing = [a for a in archives if not os.path.exists(a)]
  if missing:
    pytest.skip(f"Omniglot archives not found ({missing}); set {OMNIGLOT_ENV}")
  return archives
