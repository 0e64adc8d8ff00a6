"""The input pipeline: augmentations against detectron2's formulas and PIL, targets against numpy, determinism and
resumption, padding, per-process shards, and the error messages for bad data; on in-memory examples with the
features of TFDS `coco/2017_panoptic`, and on the built-in `maskformer_shapes/tiny` dataset."""
import colorsys
import hashlib
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import common
from maskformer_jax.data import pipeline, transforms
from maskformer_jax.data.builders import shapes

IGNORE = 255
NUM_CLASSES = 5
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def small_config(**overrides):
  """A data config at the scale of the tests: 40x48 training images, at most 6 targets."""
  data = common.data_config(
      dataset="synthetic", task="panoptic", num_classes=NUM_CLASSES, crop_type="absolute", crop_size=(32, 32),
      min_size_train=(24, 32, 40), max_size_train=80, color_aug_ssd=True, size_divisibility=32,
      train_image_size=(40, 48), max_segments=6)
  data.update(overrides)
  return data


def id2rgb(ids: np.ndarray) -> np.ndarray:
  return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
  return tf.io.encode_png(array).numpy()


def make_example(image_id: int, ids: np.ndarray, segments, image: np.ndarray | None = None) -> dict:
  """An example as TFDS `coco/2017_panoptic` gives it with SkipDecoding on both images; `segments` is a list of
  (id, label, is_crowd); the image defaults to seeded noise."""
  if image is None:
    image = np.random.default_rng(image_id).integers(0, 256, (*ids.shape, 3), np.uint8)
  segment_ids = np.array([s[0] for s in segments], np.int64)
  return {
      "image": png(image), "image/id": np.int64(image_id), "panoptic_image": png(id2rgb(ids)),
      "panoptic_objects": {
          "id": segment_ids, "label": np.array([s[1] for s in segments], np.int64),
          "is_crowd": np.array([s[2] for s in segments], bool),
          "area": np.array([np.sum(ids == i) for i in segment_ids], np.int64),
          "bbox": np.zeros((len(segments), 4), np.float32)},
  }


def as_dataset(examples) -> tf.data.Dataset:
  """In-memory examples of differing shapes as one dataset (what `read_split` returns)."""
  datasets = [tf.data.Dataset.from_tensors(example) for example in examples]
  ds = datasets[0]
  for other in datasets[1:]:
    ds = ds.concatenate(other)
  return ds


def random_examples(count: int) -> list:
  """Noise images of varying size with three rectangular segments of random classes, the third one crowd."""
  examples = []
  for i in range(count):
    rng = np.random.default_rng(100 + i)
    h, w = rng.integers(24, 60, size=2)
    ids = np.zeros((h, w), np.int32)
    ids[: h // 2, : w // 2], ids[: h // 2, w // 2:], ids[h // 2:, : w // 3] = 3, 300, 70_000
    segments = [(3, rng.integers(NUM_CLASSES), False), (300, rng.integers(NUM_CLASSES), False),
                (70_000, rng.integers(NUM_CLASSES), True)]
    examples.append(make_example(i, ids, segments))
  return examples


# A 30x44 example: ids 3 and 1000 (label 2 and 4), a crowd segment 70000 (label 2), id 12 (label 0), void elsewhere.
HAND_IDS = np.zeros((30, 44), np.int32)
HAND_IDS[2:12, 3:20] = 3
HAND_IDS[15:30, 0:10] = 1000
HAND_IDS[0:8, 30:44] = 70_000
HAND_IDS[20:28, 25:40] = 12
HAND_SEGMENTS = [(3, 2, False), (70_000, 2, True), (1000, 4, False), (12, 0, False)]


def eval_one(data, example) -> dict:
  """The single example through the evaluation pipeline, as numpy (batch of one)."""
  ds = pipeline.eval_batches(as_dataset([example]), data, batch_size=1, num_batches=1)
  return next(pipeline.Batches(ds, "synthetic:validation"))


def batches(data, examples, count: int, **kwargs) -> list:
  """The first `count` training batches of the in-memory `examples`."""
  iterator = pipeline.Batches(pipeline.train_batches(as_dataset(examples), data, **kwargs), "synthetic:train")
  return [next(iterator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Augmentations.
# ---------------------------------------------------------------------------------------------------------------

def detectron2_resized_shape(h: int, w: int, short: int, max_size: int) -> tuple:
  scale = short / min(h, w)
  if max(h, w) * scale > max_size:
    scale = max_size / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def test_resized_shape_is_detectron2s():
  for h, w, short, max_size in [(480, 640, 512, 2048), (640, 480, 256, 2048), (375, 500, 1024, 2048),
                                (100, 1000, 512, 2048), (1000, 100, 800, 1333), (427, 640, 800, 1333),
                                (333, 333, 307, 1024), (720, 1280, 972, 4096), (17, 3, 51, 256), (64, 64, 51, 256)]:
    got = transforms.resized_shape(h, w, short, max_size)
    assert tuple(int(x) for x in got) == detectron2_resized_shape(h, w, short, max_size), (h, w, short, max_size)
  assert tuple(int(x) for x in transforms.resized_shape(100, 1000, 600, None)) == (600, 6000)


def test_random_resize_picks_a_choice_and_matches_pil():
  rng = np.random.default_rng(0)
  image = np.asarray(Image.fromarray(rng.integers(0, 256, (31, 43, 3), np.uint8)).resize((129, 97)))
  label = rng.integers(0, 1000, (97, 129)).astype(np.int32)
  choices, max_size = (24, 48, 120, 200), 300
  allowed = {c: detectron2_resized_shape(97, 129, c, max_size) for c in choices}
  seen = set()
  for i in range(12):
    out_image, out_label = transforms.random_resize_shortest_edge(tf.constant(image, tf.float32), tf.constant(label),
                                                                  tf.constant([0, i]), choices, max_size)
    size = tuple(out_label.shape)
    assert size in allowed.values() and out_image.shape == (*size, 3)
    seen.add(size)
    # The reference resizes uint8 images with PIL (bilinear, antialiased when shrinking) and labels with NEAREST.
    expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR), np.float32)
    np.testing.assert_allclose(out_image.numpy(), expected, atol=1.0)
    np.testing.assert_array_equal(out_label, np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST)))
  assert len(seen) >= 3


def position_pair(h: int, w: int) -> tuple:
  """An image whose channels hold each pixel's row and column, and the label map row * 1000 + column."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)
  return tf.constant(image), tf.constant((rows * 1000 + cols).astype(np.int32))


@pytest.mark.parametrize("crop_type, crop_size", [("absolute", (20, 30)), ("absolute", (50, 10)),
                                                  ("absolute_range", (12, 36))])
def test_random_crop_sizes_and_alignment(crop_type, crop_size):
  image, label = position_pair(40, 33)
  sizes, offsets = set(), set()
  for i in range(20):
    out_image, out_label = transforms.random_crop(image, label, tf.constant([1, i]), crop_type, crop_size)
    h, w = out_label.shape
    if crop_type == "absolute":
      assert (h, w) == (min(crop_size[0], 40), min(crop_size[1], 33))
    else:
      assert min(crop_size[0], 40) <= h <= min(crop_size[1], 40)
      assert min(crop_size[0], 33) <= w <= min(crop_size[1], 33)
    np.testing.assert_array_equal(out_label, out_image[..., 0] * 1000 + out_image[..., 1])
    sizes.add((h, w))
    offsets.add((int(out_image[0, 0, 0]), int(out_image[0, 0, 1])))
  assert len(offsets) > 5 and (crop_type == "absolute" or len(sizes) > 5)


@pytest.mark.parametrize("crop_type, crop_size", [("absolute", (30, 40)), ("absolute_range", (10, 50))])
def test_resize_and_crop_is_the_crop_of_the_resize(crop_type, crop_size):
  rng = np.random.default_rng(1)
  image = tf.constant(rng.uniform(0, 255, (37, 52, 3)), tf.float32)
  label = tf.constant(rng.integers(0, 100, (37, 52)), tf.int32)
  for i in range(10):
    resize_seed, crop_seed = tf.constant([6, i]), tf.constant([7, i])
    fused = transforms.random_resize_and_crop(image, label, resize_seed, crop_seed, (20, 37, 64, 90), 120,
                                              crop_type, crop_size)
    resized = transforms.random_resize_shortest_edge(image, label, resize_seed, (20, 37, 64, 90), 120)
    separate = transforms.random_crop(*resized, crop_seed, crop_type, crop_size)
    np.testing.assert_allclose(fused[0], separate[0], atol=1e-3)
    np.testing.assert_array_equal(fused[1], separate[1])


def test_flip_moves_image_and_label_together():
  image, label = position_pair(6, 9)
  flipped = 0
  for i in range(16):
    out_image, out_label = transforms.random_flip(image, label, tf.constant([2, i]))
    np.testing.assert_array_equal(out_label, out_image[..., 0] * 1000 + out_image[..., 1])
    flipped += int(out_image[0, 0, 1]) == 8
  assert 0 < flipped < 16


def reference_color_aug(image: np.ndarray, p: dict) -> np.ndarray:
  """PointRend's ColorAugSSDTransform with the draws `p`, written from its source (colorsys for OpenCV's HSV:
  the same H, S = (max - min) / max and V = max; OpenCV's 0..180 hue is colorsys' 0..1 times 180)."""
  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x * alpha + beta, 0, 255)

  def in_hsv(x, fn):
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:2]):
      out[index] = colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*x[index])))
    return out

  def contrast(x):
    return convert(x, alpha=p["contrast"]) if p["contrast_on"] else x

  x = image.astype(np.float64)
  if p["brightness_on"]:
    x = convert(x, beta=p["brightness"])
  if p["contrast_first"]:
    x = contrast(x)
  if p["saturation_on"]:
    x = in_hsv(x, lambda h, s, v: (h, min(s * p["saturation"], 1.0), v))
  if p["hue_on"]:
    x = in_hsv(x, lambda h, s, v: ((h * 180 + p["hue"]) % 180 / 180, s, v))
  if not p["contrast_first"]:
    x = contrast(x)
  return x


def test_color_aug_ssd_matches_the_reference():
  image = np.random.default_rng(3).uniform(0, 255, (6, 7, 3)).astype(np.float32)
  drawn = []
  for i in range(24):
    params = {k: v.numpy() for k, v in transforms.ssd_color_params(tf.constant([4, i])).items()}
    assert -32 <= params["brightness"] <= 32 and 0.5 <= params["contrast"] <= 1.5
    assert 0.5 <= params["saturation"] <= 1.5 and -18 <= params["hue"] <= 18
    out = transforms.apply_ssd_color(tf.constant(image), params).numpy()
    np.testing.assert_allclose(out, reference_color_aug(image, params), atol=2e-3)
    drawn.append(params)
  for flag in ("brightness_on", "contrast_on", "saturation_on", "hue_on", "contrast_first"):
    assert 0 < sum(p[flag] for p in drawn) < len(drawn), flag
  seed = tf.constant([4, 0])
  assert np.array_equal(transforms.color_aug_ssd(tf.constant(image), seed),
                        transforms.apply_ssd_color(tf.constant(image), transforms.ssd_color_params(seed)))


def test_detr_recipe_bounds_the_image():
  data = small_config(crop_type="absolute_range", crop_size=(16, 30), min_size_train=(24, 32), max_size_train=48,
                      color_aug_ssd=False, train_image_size=(48, 48))
  data.detr_crop_prob, data.detr_crop_min_sizes = 0.5, (30, 40)
  image, label = position_pair(30, 60)
  sizes = set()
  for i in range(16):
    out_image, out_label = transforms.augment(image, label, tf.constant([5, i]), data)
    sizes.add(tuple(out_label.shape))
    assert max(out_label.shape) <= 48 and min(out_label.shape) <= 32
  assert len(sizes) > 3  # both branches and several scales


# ---------------------------------------------------------------------------------------------------------------
# Targets, padding, batches.
# ---------------------------------------------------------------------------------------------------------------

def test_panoptic_targets_of_a_hand_built_example():
  image = np.random.default_rng(0).integers(0, 256, (30, 44, 3), np.uint8)
  out = eval_one(small_config(), make_example(7, HAND_IDS, HAND_SEGMENTS, image))
  assert out["labels"].dtype == np.int32 and out["masks"].dtype == np.uint8 and out["valid"].dtype == bool
  np.testing.assert_array_equal(out["valid"][0], [True, True, True, False, False, False])
  np.testing.assert_array_equal(out["labels"][0, :3], [2, 4, 0])  # crowd 70000 dropped, objects order kept
  expected = np.zeros((6, 40, 48), np.uint8)
  for slot, segment_id in enumerate([3, 1000, 12]):
    expected[slot, :30, :44] = HAND_IDS == segment_id
  np.testing.assert_array_equal(out["masks"][0], expected)
  # Padding: 128 before normalisation, outside every mask.
  images = out["images"][0]
  np.testing.assert_allclose(images[:30, :44], (image - MEAN) / STD, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(images[30:], np.broadcast_to((128 - MEAN) / STD, (10, 48, 3)), rtol=1e-6)
  np.testing.assert_allclose(images[:, 44:], np.broadcast_to((128 - MEAN) / STD, (40, 4, 3)), rtol=1e-6)
  np.testing.assert_array_equal(out["example_valid"], [True])


def test_semantic_targets_of_a_hand_built_example():
  out = eval_one(small_config(task="semantic"), make_example(7, HAND_IDS, HAND_SEGMENTS))
  label_of = {0: IGNORE, 3: 2, 70_000: 2, 1000: 4, 12: 0}  # crowd pixels keep their class; void -> ignore
  semantic = np.vectorize(label_of.get)(HAND_IDS)
  classes = [c for c in np.unique(semantic) if c != IGNORE]
  np.testing.assert_array_equal(out["labels"][0, :3], classes)
  np.testing.assert_array_equal(out["valid"][0], [True] * 3 + [False] * 3)
  expected = np.zeros((6, 40, 48), np.uint8)
  for slot, c in enumerate(classes):
    expected[slot, :30, :44] = semantic == c
  np.testing.assert_array_equal(out["masks"][0], expected)


def test_an_example_without_segments():
  out = eval_one(small_config(task="semantic"), make_example(1, np.zeros((20, 20), np.int32), []))
  assert not out["valid"].any() and not out["masks"].any()


def test_train_batch_shapes_and_dtypes():
  for task in ("panoptic", "semantic"):
    batch, = batches(small_config(task=task), random_examples(5), 1, batch_size=3)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "images": ((3, 40, 48, 3), np.float32), "labels": ((3, 6), np.int32),
        "masks": ((3, 6, 40, 48), np.uint8), "valid": ((3, 6), bool)}
    masks, valid = batch["masks"], batch["valid"]
    assert not masks[~valid].any() and valid.any()
    assert not masks[:, :, 32:].any() and not masks[:, :, :, 32:].any()  # crops are at most 32x32
    assert (masks.sum(1) <= 1).all()  # one target per pixel


def test_train_masks_follow_the_image_through_flips():
  """With an identity resize and crop and no colour jitter, every mask must cover exactly the pixels of its
  segment's colour, whichever way the image was flipped."""
  ids = np.zeros((24, 32), np.int32)
  ids[:, :10], ids[5:20, 20:] = 4, 9
  colours = {0: (0, 0, 0), 4: (200, 10, 10), 9: (10, 200, 10)}
  image = np.array([[colours[i] for i in row] for row in ids], np.uint8)
  data = small_config(min_size_train=(24,), crop_size=(24, 32), color_aug_ssd=False, train_image_size=(24, 32))
  batch, = batches(data, [make_example(0, ids, [(4, 1, False), (9, 3, False)], image)] * 8, 1, batch_size=8)
  pixels = batch["images"] * STD + MEAN
  for b in range(8):
    for slot, segment_id in enumerate([4, 9]):
      np.testing.assert_allclose(pixels[b][batch["masks"][b, slot] == 1], np.broadcast_to(colours[segment_id],
                                 (np.sum(ids == segment_id), 3)), atol=1e-3)
  assert len({batch["masks"][b, 0, 0, 0] for b in range(8)}) == 2  # both flipped and unflipped seen


def test_same_seed_same_stream_and_different_seed_different_stream():
  examples = random_examples(10)
  first = batches(small_config(), examples, 4, batch_size=4)  # 16 examples: crosses an epoch
  again = batches(small_config(), examples, 4, batch_size=4)
  other = batches(small_config(seed=1), examples, 4, batch_size=4)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(a["images"], b["images"]) for a, b in zip(first, other))


def test_start_example_resumes_the_stream():
  examples = random_examples(7)
  full = batches(small_config(), examples, 5, batch_size=4)
  resumed = batches(small_config(), examples, 3, batch_size=4, start_example=6)
  for key in full[0]:
    stream = np.concatenate([b[key] for b in full])
    np.testing.assert_array_equal(np.concatenate([b[key] for b in resumed]), stream[6:18])


def test_eval_pads_the_last_batch():
  data = small_config(train_image_size=(64, 64))
  ds = pipeline.eval_batches(as_dataset(random_examples(5)), data, batch_size=2, num_batches=4)
  out = list(pipeline.Batches(ds, ""))
  assert len(out) == 4
  np.testing.assert_array_equal(np.concatenate([b["example_valid"] for b in out]), [True] * 5 + [False] * 3)
  assert not out[-1]["valid"].any() and not out[-1]["masks"].any()
  single = [eval_one(data, example) for example in random_examples(5)]
  for i, example in enumerate(single):
    np.testing.assert_array_equal(out[i // 2]["masks"][i % 2], example["masks"][0])
  with pytest.raises(ValueError, match="2 batches of 2 cannot hold the 5 examples"):
    pipeline.eval_batches(as_dataset(random_examples(5)), data, batch_size=2, num_batches=2)


# ---------------------------------------------------------------------------------------------------------------
# Bad data.
# ---------------------------------------------------------------------------------------------------------------

def good_example(**changes) -> dict:
  example = make_example(7, HAND_IDS, HAND_SEGMENTS)
  example.update(changes)
  return example


@pytest.mark.parametrize("example, data, message", [
    (good_example(image=b"<html>not found</html>"), {}, "image/id 7: the image feature is not a PNG or JPEG file"),
    (good_example(panoptic_image=good_example()["image"][:40]), {}, "Input pipeline of synthetic:validation failed"),
    (make_example(7, HAND_IDS, HAND_SEGMENTS[1:]), {},
     "image/id 7: panoptic_image has segment id(s) [3] that are not in panoptic_objects/id"),
    (make_example(7, HAND_IDS, HAND_SEGMENTS + [(3, 1, False)]), {},
     "image/id 7: panoptic_objects/id [3 70000 1000 12 3] repeats an id"),
    (make_example(7, HAND_IDS, HAND_SEGMENTS[:3] + [(12, NUM_CLASSES, False)]), {},
     "image/id 7: segment label(s) [5] outside [0, 5); set data.num_classes"),
    (good_example(), {"max_segments": 2}, "image/id 7: 3 non-crowd segments but data.max_segments is 2; raise "
                                          "data.max_segments"),
    (good_example(), {"max_segments": 2, "task": "semantic"}, "image/id 7: 3 classes but data.max_segments is 2"),
    (good_example(), {"train_image_size": (30, 40)}, "image/id 7 is larger than data.train_image_size (30, 40): "
                                                      "raise data.train_image_size"),
    (make_example(7, np.zeros((30, 45), np.int32), [], np.zeros((30, 44, 3), np.uint8)), {},
     "image/id 7: the image is [30 44] (h, w) but its panoptic_image is [30 45]"),
])
def test_bad_data_fails_with_a_message_naming_it(example, data, message):
  with pytest.raises(ValueError) as error:
    eval_one(small_config(**data), example)
  assert "synthetic:validation" in str(error.value) and message in str(error.value)


def test_training_images_larger_than_the_static_size_name_the_crop():
  data = small_config(crop_size=(48, 48), min_size_train=(60,))
  with pytest.raises(ValueError, match=r"raise data.train_image_size \(or lower data.crop_size\)"):
    batches(data, random_examples(2), 1, batch_size=1)


# ---------------------------------------------------------------------------------------------------------------
# The built-in dataset through TFDS.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(data config, data_dir) of a freshly built `maskformer_shapes/tiny`."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = shapes.MaskformerShapes(config="tiny", data_dir=data_dir)
  builder.download_and_prepare()
  data = common.shapes_config().data
  data.dataset = "maskformer_shapes/tiny"
  data.num_classes = builder.info.features["panoptic_objects"]["label"].num_classes
  return data, data_dir, builder.info.splits


def test_tiny_train_batches_are_reproducible_and_resumable(tiny):
  data, data_dir, _ = tiny
  make = lambda start: pipeline.make_train_dataset(data, batch_size=4, start_example=start,  # noqa: E731
                                                   data_dir=data_dir)
  first, again, resumed = make(0), make(0), make(4)
  a = [next(first) for _ in range(3)]
  b = [next(again) for _ in range(3)]
  c = [next(resumed) for _ in range(2)]
  h, w = data.train_image_size
  assert a[0]["images"].shape == (4, h, w, 3) and a[0]["masks"].shape == (4, data.max_segments, h, w)
  for key in a[0]:
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x[key], y[key])
    np.testing.assert_array_equal(np.concatenate([x[key] for x in a[1:]]), np.concatenate([x[key] for x in c]))


def test_tiny_processes_read_disjoint_shares(tiny):
  data, data_dir, splits = tiny
  for split, shuffle in ((data.train_split, True), (data.eval_split, False)):
    shares = []
    for index in range(2):
      examples, largest = pipeline.read_split(data, split, shuffle=shuffle, process_index=index, process_count=2,
                                              data_dir=data_dir)
      shares.append([int(e["image/id"]) for e in examples.as_numpy_iterator()])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(set(shares[0] + shares[1]))
    assert len(shares[0]) + len(shares[1]) == splits[split].num_examples and max(map(len, shares)) == largest


def test_tiny_eval_covers_the_split_once_per_process_in_lockstep(tiny):
  data, data_dir, splits = tiny
  num_examples = splits[data.eval_split].num_examples
  seen, lengths = [], []
  for index in range(2):
    out = list(pipeline.make_eval_dataset(data, split=data.eval_split, batch_size=3, process_index=index,
                                          process_count=2, data_dir=data_dir))
    lengths.append(len(out))
    for batch in out:
      seen += [hashlib.sha1(image.tobytes()).hexdigest() for image in batch["images"][batch["example_valid"]]]
  assert lengths[0] == lengths[1] == math.ceil(math.ceil(num_examples / 2) / 3)
  assert len(seen) == len(set(seen)) == num_examples
