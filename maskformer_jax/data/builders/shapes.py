"""`maskformer_shapes`: a procedurally generated, deterministic panoptic dataset with the features of TFDS
`coco/2017_panoptic`, so that one input pipeline serves both.

Each image is a landscape of stuff (sky on top, ground and water below with wavy boundaries, each with its own
texture) on which thing instances are drawn in order, later ones on top: circles, squares, triangles, rings and
crosses of random size, rotation and colour. With `color_by_class` (the default) a thing's hue lies within
CLASS_HUE_JITTER of its class's hue (saturation and brightness vary freely), so colour hints at the class and shape
confirms it; without it colours are uniform and only the shape tells the class. Instances are often placed
against an earlier one, so that they touch or occlude it, two instances of a class in similar colours. Features of one example:
  image             uint8 `[S, S, 3]` PNG, S = config.image_size
  image/id          int64, unique over the splits of a config
  panoptic_image    uint8 `[S, S, 3]` PNG, segment id R + 256 G + 256^2 B per pixel, 0 = void
  panoptic_objects  Sequence of N segments: id int64 (distinct, in [1, 256^3)), area int64 (pixel count),
                    bbox float32 `[4]` (TFDS's normalised ymin, xmin, ymax, xmax of the mask's pixels),
                    label int64 (index into CLASS_NAMES), is_crowd bool

Segments follow COCO panoptic: one per thing instance and at most one per stuff class, every segment at least
`min_area` pixels (an instance occluded below that is removed, so what it covered shows through), every pixel in
one segment except void. Void is a thin border of some images and the rare stuff remnant below min_area. Some
images hold one crowd segment: a cluster of small shapes of one class marked is_crowd.

Example i of a split comes from `np.random.default_rng([config.seed, split seed, i])` alone, so the dataset is the
same whatever the order or parallelism of generation. Nothing is downloaded. Importing this module registers the
builder with TFDS: `tfds.builder("maskformer_shapes/tiny", data_dir=...)`.
"""
import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from maskformer_jax.data import panoptic

# Label order as in TFDS coco/2017_panoptic: things first, then stuff.
THING_SHAPES = ("circle", "square", "triangle", "ring", "cross")
STUFF_CLASSES = ("sky", "ground", "water")
CLASS_NAMES = [*THING_SHAPES, *STUFF_CLASSES]
CATEGORIES = [{"id": label, "name": name, "isthing": int(name in THING_SHAPES)}
              for label, name in enumerate(CLASS_NAMES)]
STUFF_LABEL = {name: CLASS_NAMES.index(name) for name in STUFF_CLASSES}

# Mean RGB of each stuff class; every image shifts it by up to config.stuff_color_jitter per channel.
STUFF_COLORS = {"sky": (120, 175, 230), "ground": (125, 100, 60), "water": (35, 95, 145)}
# A thing's colour is drawn again (up to MAX_COLOR_DRAWS times) while it is closer than this (RGB Euclidean) to the
# stuff colours or to an earlier instance's colour, so that edges between segments stay visible.
MIN_COLOR_DISTANCE = 70.0
MAX_COLOR_DRAWS = 20
# Hue (degrees) of each thing class with color_by_class, away from the stuff hues (blue sky and water, brown
# ground), and how far an instance's hue may stray from it.
CLASS_HUES = {"circle": 0.0, "square": 60.0, "triangle": 120.0, "ring": 165.0, "cross": 290.0}
CLASS_HUE_JITTER = 12.0
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
# image/id = split seed x IMAGE_ID_STRIDE + index keeps ids unique over the splits.
IMAGE_ID_STRIDE = 1_000_000


@dataclasses.dataclass(eq=False, kw_only=True)
class MaskformerShapesConfig(tfds.core.BuilderConfig):
  """Size and difficulty of a `maskformer_shapes` variant. Sizes of things are fractions of image_size."""
  image_size: int  # side of the square images, pixels
  num_train: int
  num_validation: int
  num_test: int
  max_things: int  # thing instances per image are drawn uniformly from [min_things, max_things]
  max_stuff: int  # stuff classes per image are drawn uniformly from [1, max_stuff] (at most len(STUFF_CLASSES))
  min_things: int = 1
  thing_size: tuple[float, float] = (0.2, 0.42)  # range of an instance's diameter
  touch_prob: float = 0.35  # chance that an instance is placed against an earlier one (touching or overlapping)
  min_area: int = 8  # smallest segment, pixels: an instance occluded below this is removed
  texture_noise: float = 10.0  # std of the per-pixel noise on every region, in 0-255 units
  stuff_color_jitter: float = 25.0
  crowd_prob: float = 0.02  # chance that an image holds one crowd segment
  void_prob: float = 0.1  # chance that an image has a void border (1-2 pixels on some sides)
  color_by_class: bool = True  # thing hues near their class's CLASS_HUES entry; False: uniform random colours
  seed: int = 0


class MaskformerShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural COCO-panoptic-style shapes on textured landscapes (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Thing colours by class (color_by_class)."}
  BUILDER_CONFIGS = [
      MaskformerShapesConfig(
          name="default", description="64x64 images, 1,000 train / 100 validation / 100 test.",
          image_size=64, num_train=1000, num_validation=100, num_test=100, max_things=5, max_stuff=3),
      MaskformerShapesConfig(
          name="tiny", description="32x32 images, 16 / 8 / 8, crowd and void made common for tests.",
          image_size=32, num_train=16, num_validation=8, num_test=8, max_things=5, max_stuff=3, crowd_prob=0.25,
          void_prob=0.25),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")
    panoptic_image = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": image,
            "image/id": np.int64,
            "panoptic_image": panoptic_image,
            "panoptic_objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "is_crowd": np.bool_,
            }),
        }),
        metadata=tfds.core.MetadataDict(categories=CATEGORIES),
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
    return {split: self._generate_examples(split, count) for split, count in sizes.items()}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    if count > IMAGE_ID_STRIDE:
      raise ValueError(f"At most {IMAGE_ID_STRIDE} examples per split keep image/id unique; {split} asks {count}.")
    for index in range(count):
      rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], index])
      example = generate_example(rng, config)
      example["image/id"] = SPLIT_SEEDS[split] * IMAGE_ID_STRIDE + index
      yield index, example


# ---------------------------------------------------------------------------------------------------------------
# Generation of one example: plain numpy, a function of the generator's state and the config only.
# ---------------------------------------------------------------------------------------------------------------

def _wavy_boundary(rng: np.random.Generator, positions: np.ndarray, level: float, amplitude: float) -> np.ndarray:
  """A boundary `level + amplitude * sin(...)` over pixel-centre `positions` `[S]`: two random sine waves."""
  wave = np.zeros_like(positions)
  for _ in range(2):
    frequency = rng.uniform(0.5, 2.5) * 2 * np.pi / len(positions)
    wave += rng.uniform(0.3, 1.0) * np.sin(frequency * positions + rng.uniform(0, 2 * np.pi))
  return level + amplitude * wave / 2


def _stuff_layout(rng: np.random.Generator, config: MaskformerShapesConfig, y: np.ndarray,
                  x: np.ndarray) -> np.ndarray:
  """Stuff label of each pixel, int `[S, S]`, for 1 to config.max_stuff classes: sky above a wavy horizon, ground
  and water below it, split by a wavy line that runs across or down the image."""
  size = config.image_size
  count = rng.integers(1, min(config.max_stuff, len(STUFF_CLASSES)) + 1)
  present = [STUFF_CLASSES[i] for i in sorted(rng.choice(len(STUFF_CLASSES), count, replace=False))]
  below = [name for name in present if name != "sky"]
  if not below:
    return np.full((size, size), STUFF_LABEL["sky"])
  top = np.zeros(size)  # the upper edge of ground and water in each column
  if "sky" in present:
    top = _wavy_boundary(rng, x[0], rng.uniform(0.25, 0.55) * size, rng.uniform(0, 0.1) * size)
  layout = np.full((size, size), STUFF_LABEL[below[0]])
  if len(below) == 2:
    order = rng.permutation(2)
    if rng.random() < 0.5:  # the line runs across: one class nearer, one further
      line = _wavy_boundary(rng, x[0], top + rng.uniform(0.3, 0.7) * (size - top), rng.uniform(0, 0.1) * size)
      in_second = y >= line[None, :]
    else:  # the line runs down: one class on either side
      line = _wavy_boundary(rng, y[:, 0], rng.uniform(0.3, 0.7) * size, rng.uniform(0, 0.1) * size)
      in_second = x >= line[:, None]
    layout = np.where(in_second, STUFF_LABEL[below[order[1]]], STUFF_LABEL[below[order[0]]])
  return np.where(y < top[None, :], STUFF_LABEL["sky"], layout)


def _stuff_texture(rng: np.random.Generator, config: MaskformerShapesConfig, name: str, y: np.ndarray,
                   x: np.ndarray) -> np.ndarray:
  """RGB float `[S, S, 3]` of stuff class `name` over the whole image: jittered base colour and a pattern typical
  of the class (sky: brighter toward the horizon, ground: blotches, water: horizontal ripples)."""
  size = config.image_size
  color = np.array(STUFF_COLORS[name], float) + rng.uniform(-1, 1, 3) * config.stuff_color_jitter
  if name == "sky":
    pattern = (y / size * rng.uniform(20, 50))[..., None]
  elif name == "ground":
    # Noise on a grid of 8-pixel cells, interpolated bilinearly.
    cells = rng.normal(0, 1, (size // 8 + 2, size // 8 + 2))
    position = (np.arange(size) + 0.5) / 8
    cell = np.floor(position).astype(int)
    fraction = position - cell
    rows = cells[cell] * (1 - fraction)[:, None] + cells[cell + 1] * fraction[:, None]
    pattern = (20 * (rows[:, cell] * (1 - fraction) + rows[:, cell + 1] * fraction))[..., None]
  else:
    period = rng.uniform(3, 7)
    pattern = (18 * np.sin(2 * np.pi * (y + 1.5 * np.sin(x / rng.uniform(4, 9))) / period))[..., None]
  return color + pattern + rng.normal(0, config.texture_noise, (size, size, 3))


def _thing_color(rng: np.random.Generator, avoid: list, hue: float | None) -> np.ndarray:
  """A random RGB colour float `[3]` (with `hue`: that hue in degrees, +-CLASS_HUE_JITTER, at a random saturation
  and brightness), redrawn while it is within MIN_COLOR_DISTANCE of a colour in `avoid`."""
  for _ in range(MAX_COLOR_DRAWS):
    if hue is None:
      color = rng.uniform(0, 255, 3)
    else:
      h = (hue + rng.uniform(-CLASS_HUE_JITTER, CLASS_HUE_JITTER)) % 360 / 360
      color = 255 * np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)))
    if all(np.linalg.norm(color - other) >= MIN_COLOR_DISTANCE for other in avoid):
      break
  return color


def _class_hue(config: "MaskformerShapesConfig", label: int) -> float | None:
  return CLASS_HUES[THING_SHAPES[label]] if config.color_by_class else None


def _shape_mask(rng: np.random.Generator, shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
  """Pixels bool `[S, S]` of `shape` centred where the offsets `dy`, `dx` `[S, S]` are 0, about `2 * radius`
  across, at a random rotation. Sizes are set so that all shapes of one radius cover similar areas."""
  angle = rng.uniform(0, 2 * np.pi)
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  if shape == "circle":
    return u**2 + v**2 <= radius**2
  if shape == "ring":
    squared = u**2 + v**2
    return (squared <= radius**2) & (squared >= (rng.uniform(0.45, 0.6) * radius)**2)
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.9 * radius
  if shape == "triangle":
    # A regular triangle: inside all three edges, whose normals are 120 degrees apart at distance inradius.
    inradius = 0.65 * radius
    edges = [u * np.cos(2 * np.pi * k / 3) + v * np.sin(2 * np.pi * k / 3) for k in range(3)]
    return np.max(edges, axis=0) <= inradius
  half_width = rng.uniform(0.28, 0.38) * radius
  return ((np.abs(u) <= radius) & (np.abs(v) <= half_width)) | ((np.abs(v) <= radius) & (np.abs(u) <= half_width))


def _paint(rng: np.random.Generator, config: MaskformerShapesConfig, color: np.ndarray, y: np.ndarray,
           x: np.ndarray) -> np.ndarray:
  """RGB float `[S, S, 3]` of one thing over the whole image: its colour, a linear shading and noise."""
  size = config.image_size
  direction = rng.uniform(0, 2 * np.pi)
  shading = (np.cos(direction) * x + np.sin(direction) * y) / size * rng.uniform(0, 30)
  return color + shading[..., None] + rng.normal(0, config.texture_noise, (size, size, 3))


def _things(rng: np.random.Generator, config: MaskformerShapesConfig, y: np.ndarray, x: np.ndarray,
            stuff_colors: list) -> list:
  """Thing layers in drawing order, each `(mask bool [S, S], rgb float [S, S, 3], label, is_crowd)`."""
  size = config.image_size
  layers, centres, radii, colors = [], [], [], []
  for _ in range(rng.integers(config.min_things, config.max_things + 1)):
    label = int(rng.integers(len(THING_SHAPES)))
    radius = rng.uniform(*config.thing_size) * size / 2
    if centres and rng.random() < config.touch_prob:
      # Against an earlier instance: 0.55-1.05 of the sum of the radii apart, from overlapping to just touching.
      other = rng.integers(len(centres))
      direction = rng.uniform(0, 2 * np.pi)
      distance = rng.uniform(0.55, 1.05) * (radii[other] + radius)
      centre = np.clip(centres[other] + distance * np.array([np.sin(direction), np.cos(direction)]), 0, size)
    else:
      centre = rng.uniform(radius / 2, size - radius / 2, 2)
    # Instances of one class are alike in colour with color_by_class: only the stuff is kept at a distance.
    color = _thing_color(rng, stuff_colors if config.color_by_class else stuff_colors + colors,
                         _class_hue(config, label))
    mask = _shape_mask(rng, THING_SHAPES[label], y - centre[0], x - centre[1], radius)
    layers.append((mask, _paint(rng, config, color, y, x), label, False))
    centres.append(centre)
    radii.append(radius)
    colors.append(color)
  if rng.random() < config.crowd_prob:
    layers.insert(rng.integers(len(layers) + 1), _crowd(rng, config, y, x, stuff_colors))
  return layers


def _crowd(rng: np.random.Generator, config: MaskformerShapesConfig, y: np.ndarray, x: np.ndarray,
           stuff_colors: list) -> tuple:
  """One crowd layer: 4-7 small shapes of one class clustered around a point, each in its own colour (of the
  class's hue with color_by_class)."""
  size = config.image_size
  label = int(rng.integers(len(THING_SHAPES)))
  centre = rng.uniform(0.2, 0.8, 2) * size
  mask = np.zeros((size, size), bool)
  rgb = np.zeros((size, size, 3))
  for _ in range(rng.integers(4, 8)):
    piece_centre = centre + rng.normal(0, 0.08 * size, 2)
    piece = _shape_mask(rng, THING_SHAPES[label], y - piece_centre[0], x - piece_centre[1],
                        rng.uniform(0.05, 0.08) * size)
    rgb[piece] = _paint(rng, config, _thing_color(rng, stuff_colors, _class_hue(config, label)), y, x)[piece]
    mask |= piece
  return mask, rgb, label, True


def _void_border(rng: np.random.Generator, config: MaskformerShapesConfig) -> np.ndarray:
  """Void pixels bool `[S, S]`: with probability config.void_prob a 1-2 pixel border on some of the sides."""
  size = config.image_size
  void = np.zeros((size, size), bool)
  if rng.random() < config.void_prob:
    width = rng.integers(1, 3)
    sides = rng.random(4) < 0.5
    sides[rng.integers(4)] = True
    void[:width] |= sides[0]
    void[-width:] |= sides[1]
    void[:, :width] |= sides[2]
    void[:, -width:] |= sides[3]
  return void


def _owners(layers: list, shape: tuple) -> np.ndarray:
  """Index of the topmost layer covering each pixel, int `[S, S]`; -1 where no layer does."""
  owner = np.full(shape, -1)
  for index, (mask, _, _, _) in enumerate(layers):
    owner[mask] = index
  return owner


def _bbox(mask: np.ndarray) -> np.ndarray:
  """TFDS's normalised (ymin, xmin, ymax, xmax) float32 `[4]` of the pixels of `mask` bool `[H, W]`: the box
  from the first pixel's top-left corner to the last pixel's bottom-right corner."""
  rows = np.flatnonzero(mask.any(1))
  cols = np.flatnonzero(mask.any(0))
  height, width = mask.shape
  return np.array([rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width], np.float32)


def generate_example(rng: np.random.Generator, config: MaskformerShapesConfig) -> dict:
  """One example without image/id: image uint8 `[S, S, 3]`, panoptic_image uint8 `[S, S, 3]` and
  panoptic_objects (see the module docstring), things in drawing order followed by stuff in label order."""
  size = config.image_size
  y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
  layout = _stuff_layout(rng, config, y, x)
  stuff_labels = np.unique(layout).tolist()
  stuff_rgb = {label: _stuff_texture(rng, config, CLASS_NAMES[label], y, x) for label in stuff_labels}
  layers = _things(rng, config, y, x, [np.array(STUFF_COLORS[CLASS_NAMES[label]], float) for label in stuff_labels])
  void = _void_border(rng, config)

  # Removing a layer only uncovers pixels, so the layers that remain keep at least min_area each.
  owner = _owners(layers, layout.shape)
  layers = [layer for index, layer in enumerate(layers) if np.sum((owner == index) & ~void) >= config.min_area]
  owner = _owners(layers, layout.shape)

  image = np.zeros((size, size, 3))
  for label, rgb in stuff_rgb.items():
    image[layout == label] = rgb[layout == label]
  for mask, rgb, _, _ in layers:
    image[mask] = rgb[mask]

  segments = [((owner == index) & ~void, label, is_crowd) for index, (_, _, label, is_crowd) in enumerate(layers)]
  for label in stuff_labels:
    # A stuff remnant below min_area is left unlabelled (void), as COCO leaves slivers unlabelled.
    stuff = (layout == label) & (owner < 0) & ~void
    if stuff.sum() >= config.min_area:
      segments.append((stuff, label, False))

  ids = rng.choice(panoptic.ID_LIMIT - 1, len(segments), replace=False) + 1
  id_map = np.zeros((size, size), np.int64)
  for segment_id, (mask, _, _) in zip(ids, segments):
    id_map[mask] = segment_id
  return {
      "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
      "panoptic_image": panoptic.id2rgb(id_map),
      "panoptic_objects": {
          "id": ids.astype(np.int64),
          "area": np.array([mask.sum() for mask, _, _ in segments], np.int64),
          "bbox": np.stack([_bbox(mask) for mask, _, _ in segments]),
          "label": np.array([label for _, label, _ in segments], np.int64),
          "is_crowd": np.array([is_crowd for _, _, is_crowd in segments], bool),
      },
  }
