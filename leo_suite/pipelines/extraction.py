"""The extraction command's shard steps (scripts/extract_embeddings.py): merge
the finished shards, or embed one shard, each reported in one line."""

import os

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.models import backbones
from leo_suite.pretrain import extract_shards


def describe_splits(manifest):
  return ", ".join(f"{k}: {v['num_images']} images" for k, v in manifest["splits"].items())


def merge_expectations(sources, split, file_format, backbone_dir):
  """The settings the merge command names itself, which the shards must share.

  `sources` and `file_format` are None when the command does not name them.
  """
  expected = {}
  if sources is not None:
    expected["sources"] = list(sources)
  if split or sources is not None:
    expected["mode"] = extract_shards.SPLIT_MODE if split else extract_shards.ALL_MODE
  if file_format is not None:
    expected["format"] = file_format
  if backbone_dir:
    weights = os.path.join(backbone_dir, backbones.BACKBONE_WEIGHTS)
    if not os.path.isfile(weights):
      raise errors.ConfigError(f"{weights}: no such file; pass the backbone/ folder the "
                               "shards used, or no --backbone_dir with --merge")
    expected["checkpoint_sha256"] = fileio.file_sha256(weights)
  return expected


def merge(out, name, crop, num_shards, expected, keep_shards):
  """Merges the shards (`num_shards` None: as many as were written) and says so."""
  manifest = extract_shards.merge_shards(out, name, crop, num_shards, expected, keep_shards)
  print(f"merged {manifest['shards']['num_shards']} shards; manifest: "
        f"{os.path.join(out, name, crop, embeddings_lib.MANIFEST)} ({describe_splits(manifest)})")


def run_shard(backbone_dir, plan, out, name, num_shards, shard_index, crop, file_format,
              batch_size, skip_bad_images, expected_size, allowed_modes):
  """Embeds shard `shard_index` of `plan` (extract_shards.extract_shard) and says so."""
  manifest = extract_shards.extract_shard(
      backbone_dir, plan, out, name, num_shards, shard_index, crop, file_format, batch_size,
      skip_bad_images, expected_size, allowed_modes)
  folder = os.path.join(extract_shards.shards_dir(out, name, crop),
                        extract_shards.shard_name(shard_index, num_shards))
  print(f"shard {shard_index} of {num_shards}: {folder} ({describe_splits(manifest)}); when "
        "every shard is done, rerun with --merge instead of --shard_index")
