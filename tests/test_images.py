"""Image sources, class splits and decoding (leo_suite/data/image_sources.py,
data/images.py, pretrain/class_splits.py)."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from leo_suite import errors
from leo_suite.data import image_sources
from leo_suite.data import images as images_lib
from leo_suite.pretrain import class_splits


def _png(value=255, size=(105, 105), mode="L", square=None):
  image = Image.new(mode, size, value)
  if square:
    x0, y0, x1, y1 = square
    for x in range(x0, x1):
      for y in range(y0, y1):
        image.putpixel((x, y), 0)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
  return buffer.getvalue()


def _tree(root, layout):
  """layout: {relative path: bytes}."""
  for relative, payload in layout.items():
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
      handle.write(payload)


def _zip(path, layout):
  with zipfile.ZipFile(path, "w") as archive:
    for relative, payload in layout.items():
      archive.writestr(relative, payload)
  return str(path)


def test_directory_tree_of_any_depth_gives_folder_path_classes(tmp_path):
  _tree(tmp_path, {"Greek/character01/a.png": _png(), "Greek/character01/b.png": _png(),
                   "Latin/character02/c.png": _png(), "cats/d.png": _png(),
                   "cats/notes.txt": b"not an image"})
  records = image_sources.scan_directory(str(tmp_path))
  by_class = image_sources.group_by_class(records)
  assert list(by_class) == ["Greek/character01", "Latin/character02", "cats"]
  assert [r.file_name for r in by_class["Greek/character01"]] == ["a.png", "b.png"]


def test_image_directly_under_root_is_rejected_naming_it(tmp_path):
  _tree(tmp_path, {"loose.png": _png(), "a/x.png": _png()})
  with pytest.raises(errors.DataError, match="loose.png"):
    image_sources.scan_directory(str(tmp_path))


def test_zip_top_folder_stripped_and_identical_duplicates_counted_once(tmp_path):
  same = _png(square=(10, 10, 20, 20))
  one = _zip(tmp_path / "one.zip", {"arch1/Greek/character01/x.png": same,
                                     "arch1/Korean/character01/y.png": _png()})
  two = _zip(tmp_path / "two.zip", {"arch2/Greek/character01/x.png": same,
                                     "arch2/Latin/character01/z.png": _png()})
  records = image_sources.collect([one, two])
  assert sorted((r.class_name, r.file_name) for r in records) == [
      ("Greek/character01", "x.png"), ("Korean/character01", "y.png"),
      ("Latin/character01", "z.png")]
  # The zip member is read in place (no unpacking) and decodes.
  greek = [r for r in records if r.class_name.startswith("Greek")][0]
  assert greek.origin.endswith("one.zip:arch1/Greek/character01/x.png")
  assert greek.read_bytes() == same
  assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))


def test_conflicting_duplicates_across_archives_are_an_error(tmp_path):
  one = _zip(tmp_path / "one.zip", {"a/Greek/c1/x.png": _png(0)})
  two = _zip(tmp_path / "two.zip", {"b/Greek/c1/x.png": _png(255)})
  with pytest.raises(errors.DataError, match=r"two\.zip.*one\.zip.*differ"):
    image_sources.collect([one, two])


def test_corrupt_zip_and_missing_source_name_the_file(tmp_path):
  bad = tmp_path / "broken.zip"
  bad.write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(errors.DataError, match="broken.zip"):
    image_sources.collect([str(bad)])
  with pytest.raises(errors.DataError, match="nowhere"):
    image_sources.collect([str(tmp_path / "nowhere")])


def test_decode_resizes_and_keeps_geometry():
  # Black square in the top-left quarter of a white 104x104 image.
  payload = _png(255, (104, 104), square=(0, 0, 52, 52))
  array = images_lib.decode_image(payload, "x.png", images_lib.DecodeOptions(28, 1))
  assert array.shape == (28, 28, 1) and array.dtype == np.uint8
  assert array[:12, :12].max() <= 5 and array[16:, 16:].min() >= 250
  # The black area is a quarter of the image, within resampling error.
  assert abs(float((array < 128).mean()) - 0.25) < 0.02
  rgb = images_lib.decode_image(payload, "x.png", images_lib.DecodeOptions(28, 3))
  assert rgb.shape == (28, 28, 3)
  np.testing.assert_array_equal(rgb[..., 0], array[..., 0])


def test_one_bit_images_decode_like_omniglot():
  payload = _png(1, (105, 105), mode="1", square=(40, 40, 60, 60))
  array = images_lib.decode_image(payload, "o.png", images_lib.DecodeOptions(
      28, 1, expected_size=(105, 105), allowed_modes=("1", "L")))
  assert array.max() == 255 and array.min() < 30


def test_unexpected_mode_and_size_are_reported_with_the_file():
  cmyk = _png(0, (30, 30), mode="CMYK")
  with pytest.raises(errors.DataError, match=r"c\.jpg.*mode 'CMYK'"):
    images_lib.decode_image(cmyk, "c.jpg", images_lib.DecodeOptions(28, 1))
  with pytest.raises(errors.DataError, match=r"s\.png.*50x40, expected 105x105"):
    images_lib.decode_image(_png(size=(50, 40)), "s.png",
                            images_lib.DecodeOptions(28, 1, (105, 105)))
  assert images_lib.parse_expected_size("105x105") == (105, 105)
  assert images_lib.parse_expected_size("any") is None
  with pytest.raises(errors.ConfigError, match="WIDTHxHEIGHT"):
    images_lib.parse_expected_size("big")


def test_corrupt_images_fail_by_default_and_are_skipped_on_request(tmp_path):
  _tree(tmp_path, {"a/good.png": _png(), "a/bad.png": _png()[:40], "b/ok.png": _png()})
  records = image_sources.scan_directory(str(tmp_path))
  with pytest.raises(errors.DataError, match=r"bad\.png.*corrupt.*--skip_bad_images"):
    images_lib.load_arrays(records, images_lib.DecodeOptions(28, 1))
  images, kept, skipped = images_lib.load_arrays(
      records, images_lib.DecodeOptions(28, 1, skip_bad=True))
  assert images.shape == (2, 28, 28, 1)
  assert [records[i].file_name for i in kept] == ["good.png", "ok.png"]
  assert len(skipped) == 1 and skipped[0][0].endswith("bad.png")


def _spec_file(tmp_path, content):
  path = tmp_path / "split.json"
  path.write_text(json.dumps(content))
  return str(path)


def test_split_prefixes_select_characters_and_counts_are_checked(tmp_path):
  classes = ["Greek/c1", "Greek/c2", "Latin/c1", "Korean/c1", "Korean/c2"]
  spec = class_splits.load_split_spec(_spec_file(tmp_path, {
      "meta_train": ["Greek", "Korean/c1"], "meta_val": ["Korean/c2"], "meta_test": ["Latin"],
      "characters": {"meta_train": 3, "meta_val": 1, "meta_test": 1}}))
  assigned = class_splits.assign_classes(classes, spec)
  assert assigned == {"train": ["Greek/c1", "Greek/c2", "Korean/c1"], "val": ["Korean/c2"],
                      "test": ["Latin/c1"]}
  wrong = class_splits.load_split_spec(_spec_file(tmp_path, {
      "train": ["Greek"], "test": ["Latin"], "class_counts": {"train": 5}}))
  with pytest.raises(errors.DataError, match="train should have 5 classes but the sources give 2"):
    class_splits.assign_classes(classes, wrong)


def test_overlapping_or_unmatched_split_entries_are_errors(tmp_path):
  classes = ["Greek/c1", "Latin/c1"]
  with pytest.raises(errors.DataError, match="'Greek' is listed in both train and test"):
    class_splits.load_split_spec(_spec_file(tmp_path, {"train": ["Greek"], "test": ["Greek"]}))
  overlap = class_splits.load_split_spec(_spec_file(tmp_path, {"train": ["Greek"],
                                                               "test": ["Greek/c1"]}))
  with pytest.raises(errors.DataError, match="'Greek/c1' is selected by both train and test"):
    class_splits.assign_classes(classes, overlap)
  unmatched = class_splits.load_split_spec(
      _spec_file(tmp_path, {"train": ["Greek"], "val": ["Hebrew"]}))
  with pytest.raises(errors.DataError, match="'Hebrew' matches no class"):
    class_splits.assign_classes(classes, unmatched)
  with pytest.raises(errors.DataError, match="no such split file"):
    class_splits.load_split_spec(str(tmp_path / "missing.json"))


def test_empty_class_is_an_error():
  with pytest.raises(errors.DataError, match="'Greek/c1' \\(train\\) has no images"):
    class_splits.check_nonempty({"train": ["Greek/c1"]}, {"Greek/c1": []}, "split.json")


def _mini_imagenet(root, rows_by_split):
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for split, rows in rows_by_split.items():
    with open(os.path.join(root, f"{split}.csv"), "w") as handle:
      handle.write("filename,label\n")
      for file_name, label in rows:
        handle.write(f"{file_name},{label}\n")
        path = os.path.join(root, "images", file_name)
        if not os.path.exists(path):
          Image.new("RGB", (84, 84), (10, 200, 30)).save(path)


def test_mini_imagenet_csvs_give_records_and_the_class_split(tmp_path):
  root = str(tmp_path / "mini")
  _mini_imagenet(root, {
      "train": [("n0153282900000001.jpg", "n01532829"), ("n0153282900000002.jpg", "n01532829"),
                ("n0155846700000001.jpg", "n01558467")],
      "val": [("n0185567200000001.jpg", "n01855672")],
      "test": [("n0198148600000001.jpg", "n01981486")]})
  by_class, split_classes, origin = class_splits.load_labelled_splits([f"csv:{root}"], "csv")
  assert split_classes == {"train": ["n01532829", "n01558467"], "val": ["n01855672"],
                           "test": ["n01981486"]}
  assert len(by_class["n01532829"]) == 2 and origin == f"{root}/*.csv"
  images, _, _ = images_lib.load_arrays(by_class["n01532829"], images_lib.DecodeOptions(84, 3))
  assert images.shape == (2, 84, 84, 3) and images[0, 0, 0, 1] == 200


def test_mini_imagenet_csv_errors_name_the_file(tmp_path):
  root = str(tmp_path / "mini")
  _mini_imagenet(root, {"train": [("a1.jpg", "a")], "val": [("a2.jpg", "a")],
                        "test": [("c1.jpg", "c")]})
  with pytest.raises(errors.DataError, match=r"val\.csv:2: class 'a' is also in train\.csv"):
    image_sources.scan_csv_splits(root)
  _mini_imagenet(root, {"val": [("b1.jpg", "b")]})
  os.remove(os.path.join(root, "images", "c1.jpg"))
  with pytest.raises(errors.DataError, match=r"test\.csv: 1 listed image\(s\) are missing"):
    image_sources.scan_csv_splits(root)
  with open(os.path.join(root, "test.csv"), "w") as handle:
    handle.write("path;class\nx;y\n")
  with pytest.raises(errors.DataError, match=r"test\.csv: the first line must be"):
    image_sources.scan_csv_splits(root)


def test_tfds_source_by_name_offline_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    records = image_sources.scan_source("tfds:omniglot:train")
  assert len(records) == 6 and records[0].origin == "tfds:omniglot/train[0]"
  images, _, _ = images_lib.load_arrays(records, images_lib.DecodeOptions(28, 1))
  assert images.shape == (6, 28, 28, 1)
  with pytest.raises(errors.DataError, match="TFDS dataset 'no_such_dataset_xyz'"):
    image_sources.scan_tfds("no_such_dataset_xyz")


@pytest.mark.integration
def test_real_omniglot_archives_union_and_protocol(omniglot_archives):
  records = image_sources.collect(omniglot_archives)
  by_class = image_sources.group_by_class(records)
  # README: 8 alphabets, 242 characters, 4,840 images after de-duplication.
  assert len(records) == 4840 and len(by_class) == 242
  assert {c.split("/")[0] for c in by_class} == {
      "Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "Japanese_(katakana)",
      "Sanskrit", "Tagalog"}
  assert all(len(v) == 20 for v in by_class.values())
  spec = class_splits.load_split_spec("omniglot_small", os.path.dirname(omniglot_archives[0]))
  assigned = class_splits.assign_classes(list(by_class), spec)
  assert {k: len(v) for k, v in assigned.items()} == {"train": 177, "val": 39, "test": 26}
  options = images_lib.DecodeOptions(28, 1, (105, 105), ("1", "L"))
  images, _, _ = images_lib.load_arrays(by_class["Latin/character01"], options)
  # Black strokes on white: mostly white, some dark pixels in every drawing.
  assert images.shape == (20, 28, 28, 1)
  assert np.median(images) == 255 and (images.reshape(20, -1).min(axis=1) < 100).all()
