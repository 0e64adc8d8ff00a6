"""Pictures of segmentations (`draw_prediction`), the class palette and the label-map files (`save_label_maps`)."""
import json

import numpy as np
import pytest
from PIL import Image

from maskformer_jax import visualize as vis

# Arbitrary, non-contiguous ids; "water" is absent from the synthetic segmentation.
CATEGORIES = [{"id": 3, "name": "square", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0},
              {"id": 9, "name": "water", "isthing": 0}]
SIZE = 64
SCALE = 4  # vis.MIN_PANEL_SIDE / SIZE
PANEL = SIZE * SCALE
IMAGE_RGB = (90, 140, 200)
GRAY = 132  # rint(0.299 * 90 + 0.587 * 140 + 0.114 * 200)
# Source pixels (row, column) well inside a region and away from where labels go.
IN_A, IN_B, IN_SKY, IN_VOID = (20, 12), (20, 52), (4, 4), (55, 9)


def synthetic(void_label=255):
  """A constant image with two touching squares of one thing class (ids 2 and 3) on sky (id 1) and a void patch."""
  image = np.broadcast_to(np.array(IMAGE_RGB, np.uint8), (SIZE, SIZE, 3)).copy()
  panoptic = np.ones((SIZE, SIZE), np.int32)
  panoptic[16:40, 8:32] = 2
  panoptic[16:40, 32:56] = 3
  panoptic[50:60, 4:14] = 0
  semantic = np.full((SIZE, SIZE), 7)
  semantic[16:40, 8:56] = 3
  semantic[50:60, 4:14] = void_label
  segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 3, "isthing": True},
              {"id": 3, "category_id": 3, "isthing": True}]
  return image, {"semantic": semantic, "panoptic": panoptic, "segments": segments}


def panel_pixel(picture, row, column, pixel, offset=(1, 1)):
  """The picture's RGB at a source pixel (row, column) of panel `column` of row `row` (see the module layout)."""
  top = vis.MARGIN + vis.TITLE_HEIGHT + row * (vis.TITLE_HEIGHT + PANEL + vis.MARGIN)
  left = vis.MARGIN + column * (PANEL + vis.MARGIN)
  return picture[top + pixel[0] * SCALE + offset[0], left + pixel[1] * SCALE + offset[1]].astype(int)


def blend(color, alpha=0.5):
  return np.rint((1 - alpha) * GRAY + alpha * np.array(color)).astype(int)


@pytest.mark.parametrize("void_label", [255, -1])
def test_draw_prediction_panels(void_label):
  image, prediction = synthetic(void_label)
  colors = vis.category_colors(CATEGORIES)
  out = vis.draw_prediction(image, prediction, CATEGORIES)
  legend_left = vis.MARGIN + 3 * (PANEL + vis.MARGIN)
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  assert out.shape[0] == vis.MARGIN + vis.TITLE_HEIGHT + PANEL + vis.MARGIN and out.shape[1] > legend_left

  np.testing.assert_array_equal(panel_pixel(out, 0, 0, IN_A), IMAGE_RGB)
  # Semantic panel: the documented blend of the grey image and the class colour; void stays grey.
  np.testing.assert_array_equal(panel_pixel(out, 0, 1, IN_A), blend(colors[3]))
  np.testing.assert_array_equal(panel_pixel(out, 0, 1, IN_SKY), blend(colors[7]))
  np.testing.assert_array_equal(panel_pixel(out, 0, 1, IN_VOID), [GRAY] * 3)

  # Panoptic panel: the two instances of one class get different coloured fills; void stays grey.
  fill_a, fill_b = panel_pixel(out, 0, 2, IN_A), panel_pixel(out, 0, 2, IN_B)
  assert np.any(fill_a != fill_b)
  assert np.any(fill_a != GRAY) and np.any(fill_b != GRAY)
  np.testing.assert_array_equal(panel_pixel(out, 0, 2, IN_SKY), blend(colors[7]))
  np.testing.assert_array_equal(panel_pixel(out, 0, 2, IN_VOID), [GRAY] * 3)
  # Outline on both sides of the edge between the instances (source columns 31 | 32), same row as the interiors.
  assert np.any(panel_pixel(out, 0, 2, (IN_A[0], 31), (1, SCALE - 1)) != fill_a)
  assert np.any(panel_pixel(out, 0, 2, (IN_A[0], 32), (1, 0)) != fill_b)
  # Labels are drawn (white text) inside the panoptic panel but not in the semantic one.
  top = vis.MARGIN + vis.TITLE_HEIGHT
  semantic_panel = out[top:top + PANEL, vis.MARGIN + PANEL + vis.MARGIN:][:, :PANEL]
  panoptic_panel = out[top:top + PANEL, vis.MARGIN + 2 * (PANEL + vis.MARGIN):][:, :PANEL]
  assert not np.all(semantic_panel == 255, axis=-1).any()
  assert np.all(panoptic_panel[SCALE * 24:SCALE * 32, SCALE * 12:SCALE * 28] == 255, axis=-1).any()

  # Legend: a swatch of each class present, none of the absent one.
  legend = out[:, legend_left:]
  for category_id in (3, 7):
    assert np.all(legend == colors[category_id], axis=-1).sum() >= (vis.SWATCH_SIDE - 2)**2
  assert not np.all(legend == colors[9], axis=-1).any()


def test_draw_prediction_ground_truth_row():
  image, prediction = synthetic()
  colors = vis.category_colors(CATEGORIES)
  ground_truth = {"panoptic": prediction["panoptic"], "segments": prediction["segments"]}  # semantic derived
  out = vis.draw_prediction(image, prediction, CATEGORIES, ground_truth=ground_truth, alpha=0.75)
  assert out.shape[0] == vis.MARGIN + 2 * (vis.TITLE_HEIGHT + PANEL + vis.MARGIN)
  np.testing.assert_array_equal(panel_pixel(out, 1, 1, IN_A), blend(colors[3], 0.75))
  np.testing.assert_array_equal(panel_pixel(out, 1, 1, IN_SKY), blend(colors[7], 0.75))
  np.testing.assert_array_equal(panel_pixel(out, 1, 1, IN_VOID), [GRAY] * 3)
  np.testing.assert_array_equal(panel_pixel(out, 1, 0, IN_A), vis.BACKGROUND)  # no second input panel
  np.testing.assert_array_equal(panel_pixel(out, 1, 2, IN_SKY), panel_pixel(out, 0, 2, IN_SKY))


def test_draw_prediction_errors():
  image, prediction = synthetic()
  with pytest.raises(ValueError, match="image size"):
    vis.draw_prediction(image[:32], prediction, CATEGORIES)
  with pytest.raises(ValueError, match=r"labels \[5\] missing from categories"):
    vis.draw_prediction(image, {**prediction, "semantic": np.where(prediction["semantic"] == 7, 5, 3)}, CATEGORIES)
  with pytest.raises(ValueError, match=r"category ids \[4\]"):
    vis.draw_prediction(image, {**prediction, "segments": [{"id": 1, "category_id": 4}]}, CATEGORIES)
  with pytest.raises(ValueError, match="'panoptic' with 'segments'"):
    vis.draw_prediction(image, {"panoptic": prediction["panoptic"]}, CATEGORIES)
  with pytest.raises(ValueError, match="'panoptic' with 'segments'"):
    vis.draw_prediction(image, {}, CATEGORIES)


def test_draw_prediction_semantic_only():
  """A semantic-only prediction (as `inference.predict` gives without is_thing) drops the panoptic column, unless
  the ground truth has one; then the prediction's panoptic cell stays blank."""
  image, prediction = synthetic()
  colors = vis.category_colors(CATEGORIES)
  out = vis.draw_prediction(image, {"semantic": prediction["semantic"]}, CATEGORIES)
  legend = out[:, vis.MARGIN + 2 * (PANEL + vis.MARGIN):]
  np.testing.assert_array_equal(panel_pixel(out, 0, 1, IN_A), blend(colors[3]))
  for category_id in (3, 7):
    assert np.all(legend == colors[category_id], axis=-1).sum() >= (vis.SWATCH_SIDE - 2)**2

  both = vis.draw_prediction(image, {"semantic": prediction["semantic"]}, CATEGORIES, ground_truth=prediction)
  assert both.shape[1] > out.shape[1]
  np.testing.assert_array_equal(panel_pixel(both, 0, 2, IN_A), vis.BACKGROUND)
  np.testing.assert_array_equal(panel_pixel(both, 1, 2, IN_SKY), blend(colors[7]))


def test_category_colors_distinct_and_deterministic():
  categories = [{"id": 1000 + 7 * i, "name": f"class {i}"} for i in range(150)]
  colors = vis.category_colors(categories)
  assert list(colors) == [category["id"] for category in categories]
  assert colors == vis.category_colors(categories)
  assert vis.category_colors(categories[:10]) == {key: colors[key] for key in list(colors)[:10]}
  rgb = np.array(list(colors.values()), float)
  assert rgb.min() >= 0 and rgb.max() <= 255
  distance = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.diag(np.full(len(rgb), np.inf))
  assert distance.min() > 15
  # The first classes, as in a small dataset, are far apart.
  assert distance[:8, :8].min() > 100
  with pytest.raises(ValueError, match="unique"):
    vis.category_colors([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


def read_panoptic_ids(path):
  rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@pytest.mark.parametrize("max_label, mode", [(255, "L"), (300, "I;16")])
def test_save_label_maps_round_trip(tmp_path, max_label, mode):
  rng = np.random.default_rng(0)
  semantic = rng.integers(0, max_label + 1, (20, 30))
  semantic[0, 0] = max_label
  panoptic = np.zeros((20, 30), np.int64)
  panoptic[:, :10] = 1
  panoptic[5:, 10:20] = 300  # needs the green channel
  panoptic[:8, 20:] = 70_001  # needs the blue channel
  segments = [{"id": 1, "category_id": 2}, {"id": 300, "category_id": 0, "isthing": True},
              {"id": 70_001, "category_id": 5, "isthing": False}, {"id": 9, "category_id": 1}]
  paths = vis.save_label_maps(str(tmp_path / "out"), "img7", semantic, panoptic, segments)
  assert paths == {kind: str(tmp_path / "out" / f"img7_{kind}.{ext}")
                   for kind, ext in (("semantic", "png"), ("panoptic", "png"), ("segments", "json"))}

  written = Image.open(paths["semantic"])
  assert written.mode == mode
  np.testing.assert_array_equal(np.asarray(written), semantic)
  np.testing.assert_array_equal(read_panoptic_ids(paths["panoptic"]), panoptic)
  with open(paths["segments"]) as f:
    info = json.load(f)["segments_info"]
  assert [(s["id"], s["category_id"]) for s in info] == [(s["id"], s["category_id"]) for s in segments]
  assert [s["area"] for s in info] == [np.count_nonzero(panoptic == s["id"]) for s in segments]
  assert [s.get("isthing") for s in info] == [None, 1, 0, None]


def test_save_label_maps_errors(tmp_path):
  panoptic = np.ones((4, 4), np.int64)
  segments = [{"id": 1, "category_id": 0}]
  with pytest.raises(ValueError, match="negative"):
    vis.save_label_maps(str(tmp_path), "a", np.full((4, 4), -1), panoptic, segments)
  with pytest.raises(ValueError, match="16-bit"):
    vis.save_label_maps(str(tmp_path), "a", np.full((4, 4), 70_000), panoptic, segments)
  with pytest.raises(ValueError, match="without a segment"):
    vis.save_label_maps(str(tmp_path), "a", np.zeros((4, 4), int), panoptic * 2, segments)
  with pytest.raises(ValueError, match="same size"):
    vis.save_label_maps(str(tmp_path), "a", np.zeros((4, 5), int), panoptic, segments)
  assert not list(tmp_path.iterdir())
