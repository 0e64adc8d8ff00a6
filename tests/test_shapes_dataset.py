"""The built-in `maskformer_shapes` dataset, built as its "tiny" config through TFDS: segments against the panoptic
PNGs, COCO panoptic conventions, determinism, and the panoptic id encoding against its formula."""
import colorsys
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from maskformer_jax.data import panoptic
from maskformer_jax.data.builders import shapes

SPLITS = ("train", "validation", "test")


def formula_rgb2id(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def build_tiny(data_dir) -> tuple[tfds.core.DatasetBuilder, dict]:
  """The prepared tiny builder and its examples decoded to numpy, split -> list in stored order."""
  builder = shapes.MaskformerShapes(config="tiny", data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder, {split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in SPLITS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return build_tiny(tmp_path_factory.mktemp("tfds"))


def all_examples(tiny) -> list:
  return [example for split in SPLITS for example in tiny[1][split]]


def test_features_are_those_of_coco_panoptic(tiny):
  builder, _ = tiny
  features = builder.info.features
  assert set(features.keys()) == {"image", "image/id", "panoptic_image", "panoptic_objects"}
  for name in ("image", "panoptic_image"):
    assert features[name].shape == (None, None, 3) and features[name].np_dtype == np.uint8
    assert features[name].encoding_format == "png"
  objects = features["panoptic_objects"].feature
  assert set(objects.keys()) == {"id", "area", "bbox", "label", "is_crowd"}
  assert isinstance(objects["bbox"], tfds.features.BBoxFeature)
  assert objects["label"].names == shapes.CLASS_NAMES == [category["name"] for category in shapes.CATEGORIES]
  assert [category["id"] for category in shapes.CATEGORIES] == list(range(len(shapes.CLASS_NAMES)))
  assert builder.info.metadata["categories"] == shapes.CATEGORIES
  assert {category["isthing"] for category in shapes.CATEGORIES} == {0, 1}


def test_splits_hold_the_configured_counts(tiny):
  builder, examples = tiny
  config = builder.builder_config
  expected = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
  for split in SPLITS:
    assert len(examples[split]) == builder.info.splits[split].num_examples == expected[split]
  image_ids = [int(example["image/id"]) for example in all_examples(tiny)]
  assert len(set(image_ids)) == len(image_ids)


def test_segments_agree_with_the_panoptic_png(tiny):
  builder, _ = tiny
  size = builder.builder_config.image_size
  isthing = np.array([category["isthing"] for category in shapes.CATEGORIES], bool)
  for example in all_examples(tiny):
    assert example["image"].shape == example["panoptic_image"].shape == (size, size, 3)
    ids = formula_rgb2id(example["panoptic_image"])
    objects = example["panoptic_objects"]
    assert len(set(objects["id"].tolist())) == len(objects["id"]) and np.all(objects["id"] > 0)
    assert set(np.unique(ids[ids > 0]).tolist()) == set(objects["id"].tolist())
    for segment_id, area, bbox in zip(objects["id"], objects["area"], objects["bbox"]):
      mask = ids == segment_id
      rows, cols = np.nonzero(mask)
      assert area == mask.sum() >= builder.builder_config.min_area
      expected = [rows.min() / size, cols.min() / size, (rows.max() + 1) / size, (cols.max() + 1) / size]
      np.testing.assert_allclose(bbox, expected, atol=1e-6)
    assert np.all((objects["label"] >= 0) & (objects["label"] < len(shapes.CLASS_NAMES)))
    stuff = objects["label"][~isthing[objects["label"]]]
    assert len(stuff) == len(set(stuff.tolist())) >= 1
    assert not np.any(objects["is_crowd"] & ~isthing[objects["label"]])


def test_instances_repeat_touch_and_occlude_and_crowd_and_void_occur(tiny):
  isthing = np.array([category["isthing"] for category in shapes.CATEGORIES], bool)
  repeated = touching = crowd = void = 0
  for example in all_examples(tiny):
    objects = example["panoptic_objects"]
    things = objects["label"][isthing[objects["label"]]]
    repeated += len(things) > len(set(things.tolist()))
    crowd += objects["is_crowd"].sum()
    ids = formula_rgb2id(example["panoptic_image"])
    void += np.any(ids == 0)
    thing_ids = np.where(np.isin(ids, objects["id"][isthing[objects["label"]]]), ids, -1)
    # Two different instances in neighbouring pixels: they touch, or one occludes the other.
    for a, b in ((thing_ids[1:], thing_ids[:-1]), (thing_ids[:, 1:], thing_ids[:, :-1])):
      touching += np.any((a >= 0) & (b >= 0) & (a != b))
  assert repeated >= 3 and touching >= 3 and crowd >= 1 and void >= 1


def test_examples_depend_only_on_their_index(tiny):
  builder, examples = tiny
  config = builder.builder_config
  for split in SPLITS:
    for example in examples[split][:3]:
      index = int(example["image/id"]) - shapes.SPLIT_SEEDS[split] * shapes.IMAGE_ID_STRIDE
      expected = shapes.generate_example(np.random.default_rng([config.seed, shapes.SPLIT_SEEDS[split], index]),
                                         config)
      tf.nest.map_structure(np.testing.assert_array_equal, expected, {k: example[k] for k in expected})


def test_building_twice_gives_the_same_dataset(tiny, tmp_path):
  builder, examples = tiny
  again, examples_again = build_tiny(tmp_path)
  for split in SPLITS:
    tf.nest.map_structure(np.testing.assert_array_equal, examples[split], examples_again[split])
  files = sorted(path.name for path in builder.data_path.glob("*.tfrecord*"))
  assert files == sorted(path.name for path in again.data_path.glob("*.tfrecord*")) and files
  for name in files:
    assert (builder.data_path / name).read_bytes() == (again.data_path / name).read_bytes()


def test_rgb2id_and_id2rgb_follow_the_formula():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256**3, (7, 9))
  ids[0, :4] = [0, 255, 65535, 256**3 - 1]
  assert np.sum(ids > 65535) > 10
  rgb = panoptic.id2rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
  np.testing.assert_array_equal(formula_rgb2id(rgb), ids)
  np.testing.assert_array_equal(panoptic.rgb2id(rgb), ids)
  np.testing.assert_array_equal(panoptic.id2rgb_tf(tf.constant(ids)).numpy(), rgb)
  decoded = panoptic.rgb2id_tf(tf.constant(rgb))
  assert decoded.dtype == tf.int32
  np.testing.assert_array_equal(decoded.numpy(), ids)
  for bad in (-1, 256**3):
    with pytest.raises(ValueError, match="Segment ids must lie in"):
      panoptic.id2rgb(np.array([bad]))


def _segment_hues(examples) -> list[tuple[str, float]]:
  """(class name, hue in degrees of the median colour) of every non-crowd thing segment."""
  hues = []
  for example in examples:
    ids = formula_rgb2id(example["panoptic_image"])
    objects = example["panoptic_objects"]
    for segment_id, label, crowd in zip(objects["id"], objects["label"], objects["is_crowd"]):
      name = shapes.CLASS_NAMES[label]
      if name in shapes.THING_SHAPES and not crowd:
        rgb = np.median(example["image"][ids == segment_id], axis=0) / 255
        hues.append((name, 360 * colorsys.rgb_to_hsv(*rgb)[0]))
  return hues


def _hue_distance(a: float, b: float) -> float:
  return min(abs(a - b), 360 - abs(a - b))


def test_thing_hues_follow_their_class_only_with_color_by_class(tiny):
  builder, _ = tiny
  by_class = _segment_hues(all_examples(tiny))
  assert len(by_class) > 20 and {name for name, _ in by_class} == set(shapes.THING_SHAPES)
  for name, hue in by_class:  # class hue +-12 degrees, plus what noise and shading do to the median
    assert _hue_distance(hue, shapes.CLASS_HUES[name]) < 25, (name, hue)
  config = dataclasses.replace(builder.builder_config, color_by_class=False)
  uniform = _segment_hues(shapes.generate_example(np.random.default_rng([0, i]), config) for i in range(40))
  near = [_hue_distance(hue, shapes.CLASS_HUES[name]) < 25 for name, hue in uniform]
  assert len(near) > 40 and np.mean(near) < 0.4  # uniform hues land within 25 degrees about 14% of the time
