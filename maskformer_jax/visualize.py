"""Pictures of segmentations and files of label maps, with numpy and PIL only.

`draw_prediction` lays out one picture: a row of panels per source (the prediction, then the ground truth if given),
each panel with a title strip above it, and a legend of the classes present to their right:

  input          | predicted semantic    | predicted panoptic    | legend
  (blank)        | ground-truth semantic | ground-truth panoptic |

The panoptic column is there only if some row has a panoptic segmentation (C = 3 columns, else C = 2); a row
without one leaves its cell blank. Panels show the image upscaled (nearest neighbour) by the integer factor
s = max(1, ceil(MIN_PANEL_SIDE / min(H, W))) so that labels and outlines stay readable on small images. With R rows,
panel j of row r has its top-left corner at
  x = MARGIN + j (s W + MARGIN),  y = MARGIN + TITLE_HEIGHT + r (TITLE_HEIGHT + s H + MARGIN),
the picture is MARGIN + R (TITLE_HEIGHT + s H + MARGIN) pixels high, and the legend starts at
x = MARGIN + C (s W + MARGIN); its width depends on the names it lists.

`save_label_maps` writes a semantic PNG, a COCO panoptic PNG and its COCO-style segments JSON.

End to end: `predict_files` (scripts/predict.py) runs weights on image files and writes a picture and the label maps
of each; `validation_pictures` (the trainer, after training) does so for the first examples of a dataset split,
with their ground truth drawn below.
"""
import colorsys
import json
import os

import ml_collections
import numpy as np
import tqdm
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from maskformer_jax import checkpoint, inference
from maskformer_jax.data import pipeline
from maskformer_jax.data.panoptic import id2rgb
from maskformer_jax.models import build_model

# Semantic label of void pixels, as are negative labels (so no category may have this id); void is drawn
# uncoloured.
IGNORE_LABEL = 255
# Short side, in pixels, that panels are upscaled to at least.
MIN_PANEL_SIDE = 256
MARGIN = 8  # around and between panels
TITLE_HEIGHT = 22  # strip above each panel holding its title
FONT_SIZE = 14
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
OUTLINE_COLOR = (255, 255, 255)
LABEL_STROKE = (0, 0, 0)
SWATCH_SIDE = 14  # legend colour squares
LEGEND_ROW_HEIGHT = 20
MAX_NAME_WIDTH = 180  # longer class names are cut in the legend
# Hues of the palette's candidate grid, 10 degrees apart (see `category_colors`).
_PALETTE_HUES = 36
# Lightness steps of the instances of one class, in turn (see `_instance_shade`).
_INSTANCE_STEPS = (0, -1, 1, -2, 2)
_INSTANCE_STEP_SIZE = 0.25


def category_colors(categories: list[dict]) -> dict[int, tuple[int, int, int]]:
  """Colour (r, g, b) of each category id, fixed by the category's position in the list.

  Colours come from a grid of _PALETTE_HUES hues at saturations (0.9, 0.65) and values (0.95, 0.75, 0.55): no greys,
  which void and outlines use, and no pale colours, which fade when blended. Each category in turn gets the
  candidate farthest from the colours already given (by the "redmean" approximation of perceived distance), the
  first one red. So the first classes get the most distinct colours, and a list's colours do not depend on the
  categories after it, unless there are more than 6 x _PALETTE_HUES of them and the grid grows finer.
  """
  ids = [category["id"] for category in categories]
  if len(set(ids)) != len(ids):
    raise ValueError(f"Category ids must be unique; got {ids}.")
  hues = max(_PALETTE_HUES, -(-len(ids) // 6))
  candidates = np.rint(255 * np.array([colorsys.hsv_to_rgb(hue / hues, saturation, value)
                                       for value in (0.95, 0.75, 0.55) for saturation in (0.9, 0.65)
                                       for hue in range(hues)]))
  chosen = []
  distance = np.full(len(candidates), np.inf)  # from each candidate to the nearest colour given
  for _ in ids:
    pick = candidates[int(np.argmax(distance))]
    chosen.append(tuple(int(channel) for channel in pick))
    distance = np.minimum(distance, _redmean_distance(candidates, pick))
  return dict(zip(ids, chosen))


def _redmean_distance(colors: np.ndarray, color: np.ndarray) -> np.ndarray:
  """Approximate perceived distance float `[N]` from colors float `[N, 3]` to color float `[3]`, RGB in [0, 255]:
  Euclidean with channel weights that depend on the mean red."""
  red = (colors[:, 0] + color[0]) / 2
  difference = colors - color
  return np.sqrt((2 + red / 256) * difference[:, 0]**2 + 4 * difference[:, 1]**2
                 + (2 + (255 - red) / 256) * difference[:, 2]**2)


def draw_prediction(image: np.ndarray, prediction: dict, categories: list[dict], ground_truth: dict | None = None,
                    alpha: float = 0.5) -> np.ndarray:
  """Picture uint8 `[H', W', 3]` of a segmentation of `image` (see the module docstring for the layout and size).

  Args:
    image: uint8 `[H, W, 3]` RGB.
    prediction: a segmentation of the image, as `inference.predict` returns it: a dict of
      semantic  integer `[H, W]` category ids; negative labels and IGNORE_LABEL are void. Optional when panoptic
                is given (then derived from panoptic and segments).
      panoptic  integer `[H, W]` segment ids, optional; pixels whose id has no segment (0 or -1, say) are void.
      segments  with panoptic: list of {"id", "category_id", "isthing" (optional, else the category's, else
                stuff)}.
    categories: [{"id", "name", "isthing" (optional)}, ...]; their order fixes the colours (`category_colors`).
    ground_truth: a dict like `prediction`, drawn on a second row.
    alpha: opacity of the class colours.

  The semantic and panoptic panels draw on a grey copy of the image, `gray = rint(0.299 R + 0.587 G + 0.114 B)`, so
  that the image's own colours neither shift nor mimic the class colours. Semantic panels show
  `rint((1 - alpha) gray + alpha colour)` on the pixels of each class. Panoptic panels fill each segment likewise
  with a shade of its class colour that differs between instances of a class, outline segments with 2 px lines of
  OUTLINE_COLOR and label them with the class name (things also with "#" and their index in the class). Void
  pixels stay grey.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected an RGB uint8 image [H, W, 3]; got {image.dtype} {image.shape}.")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")
  colors = category_colors(categories)
  by_id = {category["id"]: category for category in categories}
  rows = [("predicted", _check_segmentation(prediction, image.shape[:2], by_id, "prediction"))]
  if ground_truth is not None:
    rows.append(("ground-truth", _check_segmentation(ground_truth, image.shape[:2], by_id, "ground_truth")))

  height, width = image.shape[:2]
  scale = max(1, -(-MIN_PANEL_SIDE // min(height, width)))
  panel_height, panel_width = scale * height, scale * width
  font = ImageFont.load_default(size=FONT_SIZE)

  present = set()
  for _, (semantic, panoptic, segments) in rows:
    present.update(np.unique(semantic[_valid(semantic)]).tolist())
    if panoptic is not None:
      present.update(segment["category_id"] for segment in segments if np.any(panoptic == segment["id"]))
  columns = 3 if any(panoptic is not None for _, (_, panoptic, _) in rows) else 2
  canvas_height = MARGIN + len(rows) * (TITLE_HEIGHT + panel_height + MARGIN)
  legend = _legend([category["name"] for category in categories if category["id"] in present],
                   [colors[category["id"]] for category in categories if category["id"] in present],
                   canvas_height - 2 * MARGIN, font)

  canvas = Image.new("RGB", (MARGIN + columns * (panel_width + MARGIN) + legend.width, canvas_height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  gray = np.rint(image @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=-1).astype(np.uint8)
  for row, (kind, (semantic, panoptic, segments)) in enumerate(rows):
    panels = [("input", _upscale(image, scale)) if row == 0 else None,
              (f"{kind} semantic", _semantic_panel(gray, semantic, colors, alpha, scale))]
    if panoptic is not None:
      panels.append((f"{kind} panoptic", _panoptic_panel(gray, panoptic, segments, by_id, colors, alpha, scale, font)))
    top = MARGIN + row * (TITLE_HEIGHT + panel_height + MARGIN)
    for column, panel in enumerate(panels):
      if panel is None:
        continue
      left = MARGIN + column * (panel_width + MARGIN)
      draw.text((left, top + TITLE_HEIGHT // 2), panel[0], fill=TEXT_COLOR, font=font, anchor="lm")
      canvas.paste(Image.fromarray(panel[1]), (left, top + TITLE_HEIGHT))
  canvas.paste(legend, (MARGIN + columns * (panel_width + MARGIN), MARGIN))
  return np.asarray(canvas)


def save_label_maps(output_dir: str, stem: str, semantic: np.ndarray, panoptic: np.ndarray | None = None,
                    segments: list[dict] | None = None) -> dict[str, str]:
  """Write a segmentation as `<stem>_semantic.png` and, when `panoptic` is given, `<stem>_panoptic.png` and
  `<stem>_segments.json`.

  Args:
    output_dir: created if missing.
    semantic: integer `[H, W]` category ids in [0, 65535] (void as IGNORE_LABEL), saved as an 8-bit PNG when all
      labels are at most 255, else as a 16-bit one.
    panoptic: integer `[H, W]` segment ids in [0, 256^3), 0 = void, saved with the COCO panoptic RGB encoding
      (id = R + 256 G + 256^2 B).
    segments: [{"id", "category_id", "isthing" (optional)}, ...], one per nonzero id of `panoptic`.

  The JSON holds {"segments_info": [{"id", "category_id", "isthing" (if given), "area"}, ...]}, with each area the
  segment's pixel count in `panoptic`. Returns the paths written, keyed "semantic", "panoptic" and "segments".
  """
  semantic = np.asarray(semantic)
  maps = {"semantic": semantic}
  if panoptic is not None:
    maps["panoptic"] = panoptic = np.asarray(panoptic)
    if segments is None:
      raise ValueError("panoptic needs its segments: pass the list of {'id', 'category_id'} dicts too.")
  for name, array in maps.items():
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name} must be an integer map [H, W]; got {array.dtype} {array.shape}.")
  if panoptic is not None and semantic.shape != panoptic.shape:
    raise ValueError(f"semantic {semantic.shape} and panoptic {panoptic.shape} must have the same size.")
  if semantic.size and semantic.min() < 0:
    raise ValueError(f"semantic has negative labels (min {semantic.min()}); map void to {IGNORE_LABEL} first.")
  if semantic.size and semantic.max() > np.iinfo(np.uint16).max:
    raise ValueError(f"semantic has labels up to {semantic.max()}, more than a 16-bit PNG holds (65535).")
  if panoptic is not None:
    ids = [segment["id"] for segment in segments]
    if len(set(ids)) != len(ids) or (ids and min(ids) < 1):
      raise ValueError(f"Segment ids must be unique and at least 1 (0 is void in COCO panoptic PNGs); got {ids}.")
    map_ids, areas = np.unique(panoptic, return_counts=True)
    unlisted = sorted(set(map_ids.tolist()) - set(ids) - {0})
    if unlisted:
      raise ValueError(f"panoptic holds ids {unlisted[:10]} without a segment; add their segments or set them to 0.")
    area = dict(zip(map_ids.tolist(), areas.tolist()))

  os.makedirs(output_dir, exist_ok=True)
  kinds = (("semantic", "png"),) + ((("panoptic", "png"), ("segments", "json")) if panoptic is not None else ())
  paths = {kind: os.path.join(output_dir, f"{stem}_{kind}.{ext}") for kind, ext in kinds}
  dtype = np.uint8 if semantic.max(initial=0) <= 255 else np.uint16
  Image.fromarray(semantic.astype(dtype)).save(paths["semantic"])
  if panoptic is None:
    return paths
  Image.fromarray(id2rgb(panoptic)).save(paths["panoptic"])
  info = []
  for segment in segments:
    entry = {"id": int(segment["id"]), "category_id": int(segment["category_id"])}
    if "isthing" in segment:
      entry["isthing"] = int(bool(segment["isthing"]))
    entry["area"] = int(area.get(segment["id"], 0))
    info.append(entry)
  with open(paths["segments"], "w") as f:
    json.dump({"segments_info": info}, f, indent=1)
  return paths


def _check_segmentation(segmentation: dict, size: tuple[int, int], by_id: dict, name: str
                        ) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
  """(semantic, panoptic or None, segments) of a `draw_prediction` dict, validated against the image size and
  categories."""
  if ("panoptic" in segmentation) != ("segments" in segmentation) or not {"semantic", "panoptic"} & set(segmentation):
    raise ValueError(f"{name} needs 'semantic', or 'panoptic' with 'segments', or all three; got "
                     f"{sorted(segmentation)}.")
  panoptic = np.asarray(segmentation["panoptic"]) if "panoptic" in segmentation else None
  segments = list(segmentation.get("segments", []))
  unknown = sorted({segment["category_id"] for segment in segments} - set(by_id))
  if unknown:
    raise ValueError(f"{name} has segments of category ids {unknown} missing from categories; pass the categories "
                     "the model was trained with.")
  if "semantic" in segmentation:
    semantic = np.asarray(segmentation["semantic"])
  else:
    semantic = np.full(panoptic.shape, IGNORE_LABEL, np.int64)
    for segment in segments:
      semantic[panoptic == segment["id"]] = segment["category_id"]
  for key, array in (("semantic", semantic), ("panoptic", panoptic)):
    if array is not None and (array.shape != size or not np.issubdtype(array.dtype, np.integer)):
      raise ValueError(f"{name}['{key}'] must be an integer map of the image size {size}; got {array.dtype} "
                       f"{array.shape}. Resize label maps to the image with nearest-neighbour interpolation.")
  unknown = sorted(set(np.unique(semantic[_valid(semantic)]).tolist()) - set(by_id))
  if unknown:
    raise ValueError(f"{name}['semantic'] has labels {unknown[:10]} missing from categories; pass the categories the "
                     f"model was trained with, or mark void as {IGNORE_LABEL} or a negative label.")
  return semantic, panoptic, segments


def _valid(semantic: np.ndarray) -> np.ndarray:
  """bool `[H, W]`: the non-void pixels of a semantic map."""
  return (semantic >= 0) & (semantic != IGNORE_LABEL)


def _upscale(array: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscaling of `[H, W, ...]` to `[scale H, scale W, ...]`."""
  return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _blend(image: np.ndarray, fill: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
  """`image` uint8 `[H, W, 3]` with `rint((1 - alpha) image + alpha fill)` on the pixels of `mask` bool `[H, W]`."""
  out = image.copy()
  out[mask] = np.rint((1 - alpha) * image[mask] + alpha * fill[mask]).astype(np.uint8)
  return out


def _semantic_panel(image: np.ndarray, semantic: np.ndarray, colors: dict, alpha: float, scale: int) -> np.ndarray:
  """`image` uint8 `[H, W, 3]` with class colours blended on, upscaled: uint8 `[sH, sW, 3]`."""
  valid = _valid(semantic)
  fill = np.zeros(image.shape, np.float64)
  for label in np.unique(semantic[valid]).tolist():
    fill[semantic == label] = colors[label]
  return _upscale(_blend(image, fill, valid, alpha), scale)


def _instance_shade(color: tuple, index: int) -> np.ndarray:
  """Colour float `[3]` of the index-th instance of a class: its class colour moved toward white or black by a
  step that alternates in sign and grows, so that touching instances of one class differ."""
  step = _INSTANCE_STEP_SIZE * _INSTANCE_STEPS[index % len(_INSTANCE_STEPS)]
  color = np.asarray(color, np.float64)
  return color + (255 - color) * step if step > 0 else color * (1 + step)


def _panoptic_panel(image: np.ndarray, panoptic: np.ndarray, segments: list[dict], by_id: dict, colors: dict,
                    alpha: float, scale: int, font: ImageFont.FreeTypeFont) -> np.ndarray:
  """`image` uint8 `[H, W, 3]` with segments filled, outlined and labelled, upscaled: uint8 `[sH, sW, 3]`."""
  # Segment k+1 (in list order) per pixel, 0 where void, so that every void convention outlines alike.
  index = np.zeros(panoptic.shape, np.int64)
  for k, segment in enumerate(segments):
    index[panoptic == segment["id"]] = k + 1
  fill = np.zeros(image.shape, np.float64)
  labels = []  # (text, bool mask of the segment)
  instances = {}  # things drawn so far per category
  for k, segment in enumerate(segments):
    mask = index == k + 1
    if not mask.any():
      continue
    category = by_id[segment["category_id"]]
    text = category["name"]
    if segment.get("isthing", category.get("isthing", 0)):
      count = instances.get(category["id"], 0)
      instances[category["id"]] = count + 1
      fill[mask] = _instance_shade(colors[category["id"]], count)
      text = f"{text} #{count + 1}"
    else:
      fill[mask] = colors[category["id"]]
    labels.append((text, mask))

  panel = _blend(image, fill, index > 0, alpha)
  panel = _upscale(panel, scale)
  panel[_boundaries(_upscale(index, scale))] = OUTLINE_COLOR
  picture = Image.fromarray(panel)
  draw = ImageDraw.Draw(picture)
  depth = _depth(index)
  placed = []  # boxes (left, top, right, bottom) of the labels drawn so far
  for text, mask in labels:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="mm", stroke_width=2)
    # Label centres, clamped so that the whole label stays inside the panel.
    centres = [(min(max((column + 0.5) * scale, -left), picture.width - right),
                min(max((row + 0.5) * scale, -top), picture.height - bottom))
               for row, column in _label_candidates(mask, depth)]
    # The deepest centre whose label covers no other label, else the deepest.
    x, y = next((centre for centre in centres if not any(
        _overlap((centre[0] + left, centre[1] + top, centre[0] + right, centre[1] + bottom), other)
        for other in placed)), centres[0])
    placed.append((x + left, y + top, x + right, y + bottom))
    draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm", stroke_width=2, stroke_fill=LABEL_STROKE)
  return np.asarray(picture)


def _label_candidates(mask: np.ndarray, depth: np.ndarray, count: int = 64) -> np.ndarray:
  """Up to `count` pixels (row, column) int `[N, 2]` of `mask` bool `[H, W]` for a label, deepest first: spread over
  those at least half as deep as the deepest, so that a label can move away from one it would cover."""
  rows, columns = np.nonzero(mask)
  depths = depth[rows, columns]
  order = np.argsort(-depths, kind="stable")
  order = order[:max(1, np.count_nonzero(depths >= depths.max() / 2))]
  order = order[np.linspace(0, len(order) - 1, min(count, len(order))).astype(int)]
  return np.stack([rows[order], columns[order]], axis=-1)


def _overlap(a: tuple, b: tuple) -> bool:
  """Whether boxes (left, top, right, bottom) intersect."""
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _boundaries(ids: np.ndarray) -> np.ndarray:
  """bool `[H, W]`: pixels whose right or bottom neighbour has another id, and those neighbours, so that each edge
  between segments gets a line 2 px wide, one on each side."""
  edge = np.zeros(ids.shape, bool)
  across = ids[:, 1:] != ids[:, :-1]
  edge[:, 1:] |= across
  edge[:, :-1] |= across
  down = ids[1:] != ids[:-1]
  edge[1:] |= down
  edge[:-1] |= down
  return edge


def _depth(ids: np.ndarray) -> np.ndarray:
  """Approximate distance int `[H, W]` of each pixel to the edge of its segment in `ids` integer `[H, W]`: the least
  number of steps left, right, up or down to a pixel of another id or out of the image. Its maximum over a
  segment is a point well inside it, where a label covers the segment rather than its neighbours."""
  def steps_to_run_start(a: np.ndarray) -> np.ndarray:
    # 1 + distance, along the last axis, to the first pixel of the run of equal ids holding each pixel.
    positions = np.arange(a.shape[-1])
    starts = np.ones(a.shape, bool)
    starts[..., 1:] = a[..., 1:] != a[..., :-1]
    return positions - np.maximum.accumulate(np.where(starts, positions, 0), axis=-1) + 1

  return np.minimum.reduce([steps_to_run_start(ids), steps_to_run_start(ids[:, ::-1])[:, ::-1],
                            steps_to_run_start(ids.T).T, steps_to_run_start(ids.T[:, ::-1])[:, ::-1].T])


def _legend(names: list[str], colors: list[tuple], height: int, font: ImageFont.FreeTypeFont) -> Image.Image:
  """Legend image `height` pixels high: a title strip, then a swatch and name per class, in as many columns as
  they need."""
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  names = [_fit(measure, name, font, MAX_NAME_WIDTH) for name in names]
  text_width = max([measure.textlength(name, font=font) for name in names], default=0)
  column_width = SWATCH_SIDE + 6 + int(np.ceil(text_width)) + 2 * MARGIN
  per_column = max(1, (height - TITLE_HEIGHT) // LEGEND_ROW_HEIGHT)
  columns = -(-len(names) // per_column)
  width = max(columns * column_width, int(np.ceil(measure.textlength("classes", font=font))) + MARGIN)
  legend = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(legend)
  draw.text((0, TITLE_HEIGHT // 2), "classes", fill=TEXT_COLOR, font=font, anchor="lm")
  for k, (name, color) in enumerate(zip(names, colors)):
    left = (k // per_column) * column_width
    top = TITLE_HEIGHT + (k % per_column) * LEGEND_ROW_HEIGHT
    draw.rectangle([left, top, left + SWATCH_SIDE - 1, top + SWATCH_SIDE - 1], fill=color, outline=TEXT_COLOR)
    draw.text((left + SWATCH_SIDE + 6, top + SWATCH_SIDE // 2), name, fill=TEXT_COLOR, font=font, anchor="lm")
  return legend


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
  """`text`, cut and ended with "..." if it is wider than `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


# ----------------------------------------------------------------------------------------------------------------
# Pictures of a model's predictions, end to end.
# ----------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def save_prediction(output_dir: str, stem: str, image: np.ndarray, prediction: dict, categories: list[dict],
                    ground_truth: dict | None = None) -> dict[str, str]:
  """Writes `<stem>.png` (`draw_prediction`) and the label maps (`save_label_maps`); returns the paths, the picture
  under "picture"."""
  os.makedirs(output_dir, exist_ok=True)
  picture = os.path.join(output_dir, f"{stem}.png")
  Image.fromarray(draw_prediction(image, prediction, categories, ground_truth)).save(picture)
  paths = save_label_maps(output_dir, stem, prediction["semantic"], prediction.get("panoptic"),
                          prediction.get("segments"))
  return {"picture": picture, **paths}


def _categories(config: ml_collections.ConfigDict) -> tuple[list[dict], bool]:
  """The dataset's categories and whether things are known; without the dataset at hand (e.g. converted official
  weights on a machine without ADE20K), numbered class names and semantic pictures only."""
  try:
    return pipeline.dataset_categories(config.data, config.data.data_dir or None), True
  except ValueError as error:  # a dataset that is not prepared here, or has no category metadata
    logging.warning("No class names or thing/stuff split (%s); drawing semantic maps with numbered classes.", error)
    return [{"id": i, "name": f"class {i}", "isthing": 0} for i in range(config.data.num_classes)], False


def _image_files(input_path: str) -> list[str]:
  if os.path.isdir(input_path):
    files = sorted(os.path.join(input_path, name) for name in os.listdir(input_path)
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise FileNotFoundError(f"{input_path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"{input_path} does not exist; pass an image file or a directory of images.")
  return [input_path]


def _read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError) as error:  # PIL's errors for unreadable or damaged files
    raise ValueError(f"Cannot read {path} as an image ({error}); pass PNG or JPEG files.") from error


def predict_files(config: ml_collections.ConfigDict, weights: str, input_path: str, output_dir: str,
                  step: int | None = None) -> list[dict[str, str]]:
  """`scripts/predict.py`: runs the weights in `weights` (a training workdir, at `step` or its latest, or a model
  directory) on an image file or every image of a directory, and writes `<name>.png`, `<name>_semantic.png` and,
  when the dataset's things are known, `<name>_panoptic.png` and `<name>_segments.json` into `output_dir`.
  `config` gives the test settings and the dataset whose class names and thing/stuff split are used."""
  files = _image_files(input_path)
  model_config, variables = checkpoint.load_variables(weights, step)
  model = build_model(model_config)
  categories, things_known = _categories(config)
  is_thing = [bool(category["isthing"]) for category in categories] if things_known else None
  written = []
  for path in tqdm.tqdm(files, desc="predict", unit="image", dynamic_ncols=True):
    image = _read_image(path)
    prediction = inference.predict(model, variables, image, config.test, is_thing)
    stem = os.path.splitext(os.path.basename(path))[0]
    written.append(save_prediction(output_dir, stem, image, prediction, categories))
  return written


def validation_pictures(model, variables: dict, config: ml_collections.ConfigDict, output_dir: str, count: int,
                        split: str | None = None) -> list[dict[str, str]]:
  """Pictures (prediction above, ground truth below) and label maps of the first `count` examples of `split`
  (default `config.data.eval_split`), named by their image id."""
  split = split or config.data.eval_split
  categories = pipeline.dataset_categories(config.data, config.data.data_dir or None)
  is_thing = [bool(category["isthing"]) for category in categories]
  examples, _ = pipeline.ground_truth_examples(config.data, split, data_dir=config.data.data_dir or None)
  written = []
  for _, example in zip(range(count), examples):
    prediction = inference.predict(model, variables, example["image"], config.test, is_thing)
    ground_truth = {"panoptic": example["panoptic"], "segments": example["segments"]}
    written.append(save_prediction(output_dir, f"{split}_{example['image_id']}", example["image"], prediction,
                                   categories, ground_truth))
  return written
