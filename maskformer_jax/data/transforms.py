"""Training augmentations of the reference mappers as TensorFlow functions (graph mode, for `tf.data.Dataset.map`).

Every function takes an image float32 `[H, W, 3]` on the 0..255 scale (RGB) and a label map int32 `[H, W]` (a
panoptic segment-id map or a semantic map) and transforms both together. All randomness is stateless and comes from
a per-example `seed` (int32 or int64 `[2]`), which each step folds with its own constant, so an example's
augmentation depends on its seed only, not on the order in which a parallel map visits examples.

The two recipes (reference section 4):
  `semantic_mapper_augment`  MaskFormer's semantic and ADE20K-panoptic mappers: resize the short side to a random
                             choice, random crop, SSD colour jitter, horizontal flip.
  `detr_augment`             MaskFormer's COCO-panoptic (DETR) mapper: flip, then with some probability a resize
                             and an 'absolute_range' crop, then the random short-side resize.
`augment` picks the recipe from `data.crop_type`; `pad_to_size` then pads bottom/right to the static training size.
"""
import tensorflow as tf

# Streams of the per-example seed, one per random decision, so that adding a step never shifts another's draws.
_RESIZE, _CROP, _COLOR, _FLIP, _DETR_BRANCH, _DETR_RESIZE, _DETR_CROP = range(7)

# PointRend's ColorAugSSDTransform defaults (the values MaskFormer uses).
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units: 180 per full turn of the colour wheel


def _fold(seed: tf.Tensor, stream: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, stream, alg="philox")


def _uniform(seed: tf.Tensor, minval, maxval, dtype=tf.float32) -> tf.Tensor:
  """A scalar from [minval, maxval); Philox so that draws do not depend on the device TF picks."""
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval, dtype=dtype, alg="philox")


def _coin(seed: tf.Tensor) -> tf.Tensor:
  """True with probability 0.5."""
  return _uniform(seed, 0.0, 1.0) < 0.5


def resized_shape(height: tf.Tensor, width: tf.Tensor, short_edge: tf.Tensor, max_size: int | None
                  ) -> tuple[tf.Tensor, tf.Tensor]:
  """Detectron2's `ResizeShortestEdge` output size: scale = short_edge / min(h, w), lowered to max_size / max(h, w)
  if the long side would exceed `max_size` (None: no cap); each side int(x * scale + 0.5). Int32 scalars.

  Computed in float64, as the reference does in Python, so that sizes agree exactly at the rounding boundary.
  """
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = tf.cast(short_edge, tf.float64) / tf.minimum(h, w)
  if max_size is not None:
    scale = tf.where(tf.maximum(h, w) * scale > max_size, max_size / tf.maximum(h, w), scale)
  new_h = tf.cast(tf.floor(h * scale + 0.5), tf.int32)
  new_w = tf.cast(tf.floor(w * scale + 0.5), tf.int32)
  return new_h, new_w


def resize_window(image: tf.Tensor, label: tf.Tensor, size, window) -> tuple[tf.Tensor, tf.Tensor]:
  """The `window` (y0, x0, h, w) of image and label map resized to `size` (h, w), computing that window only.

  Image bilinear: the reference resizes uint8 images with PIL, whose bilinear filter widens with the downscale
  factor (antialiasing); TF's antialiased triangle kernel (what `tf.image.resize(..., antialias=True)` runs) is the
  same filter, and translating it by the window's corner evaluates only the pixels a following crop keeps. Label
  map: half-pixel-centred nearest neighbours, as PIL's NEAREST and TF's nearest resize.
  """
  y0, x0, window_h, window_w = window
  shape = tf.shape(label)
  scale = tf.cast(tf.stack(size), tf.float32) / tf.cast(shape, tf.float32)
  corner = tf.cast(tf.stack([y0, x0]), tf.float32)
  image = tf.raw_ops.ScaleAndTranslate(images=image[None], size=tf.stack([window_h, window_w]), scale=scale,
                                       translation=-corner, kernel_type="triangle", antialias=True)[0]

  def sources(start, count, axis):  # source index of each output pixel along `axis`, in TF's float32 arithmetic
    centres = tf.cast(start + tf.range(count), tf.float32) + 0.5
    step = tf.cast(shape[axis], tf.float32) / tf.cast(size[axis], tf.float32)
    return tf.minimum(tf.cast(tf.floor(centres * step), tf.int32), shape[axis] - 1)

  label = tf.gather(tf.gather(label, sources(y0, window_h, 0)), sources(x0, window_w, 1), axis=1)
  return image, label


def resize(image: tf.Tensor, label: tf.Tensor, size) -> tuple[tf.Tensor, tf.Tensor]:
  """Image bilinear (antialiased, as PIL), label map nearest, to `size` (h, w); see `resize_window`."""
  return resize_window(image, label, size, (0, 0, *size))


def random_short_edge_size(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, short_edges, max_size: int | None
                           ) -> tuple[tf.Tensor, tf.Tensor]:
  """The size `ResizeShortestEdge` "choice" resizes to: the short side a uniform choice of `short_edges`, the long
  side capped at `max_size`."""
  short_edge = tf.constant(short_edges, tf.int32)[_uniform(seed, 0, len(short_edges), tf.int32)]
  return resized_shape(height, width, short_edge, max_size)


def random_resize_shortest_edge(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, short_edges, max_size: int | None
                                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Resize to `random_short_edge_size`."""
  shape = tf.shape(label)
  return resize(image, label, random_short_edge_size(shape[0], shape[1], seed, short_edges, max_size))


def crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, crop_type: str, crop_size) -> tuple:
  """Detectron2's `RandomCrop` of an image of `height` x `width`: `(y0, x0, crop_h, crop_w)`, never larger than it.

  crop_type 'absolute': crop `crop_size` (h, w), each side clipped to the image. 'absolute_range': `crop_size` is
  (min, max); the crop's height and width are drawn independently and uniformly from [min, max] (integers), each
  range clipped to the image side. The offset is uniform over the valid positions.
  """
  size_seed, y_seed, x_seed = (_fold(seed, i) for i in range(3))
  if crop_type == "absolute":
    crop_h, crop_w = tf.minimum(crop_size[0], height), tf.minimum(crop_size[1], width)
  elif crop_type == "absolute_range":
    low, high = crop_size
    crop_h = _uniform(_fold(size_seed, 0), tf.minimum(height, low), tf.minimum(height, high) + 1, tf.int32)
    crop_w = _uniform(_fold(size_seed, 1), tf.minimum(width, low), tf.minimum(width, high) + 1, tf.int32)
  else:
    raise ValueError(f"data.crop_type must be 'absolute' or 'absolute_range'; got {crop_type!r}.")
  y0 = _uniform(y_seed, 0, height - crop_h + 1, tf.int32)
  x0 = _uniform(x_seed, 0, width - crop_w + 1, tf.int32)
  return y0, x0, crop_h, crop_w


def random_crop(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, crop_type: str, crop_size
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Crop image and label map to `crop_window`."""
  shape = tf.shape(label)
  y0, x0, crop_h, crop_w = crop_window(shape[0], shape[1], seed, crop_type, crop_size)
  return image[y0:y0 + crop_h, x0:x0 + crop_w], label[y0:y0 + crop_h, x0:x0 + crop_w]


def random_resize_and_crop(image: tf.Tensor, label: tf.Tensor, resize_seed: tf.Tensor, crop_seed: tf.Tensor,
                           short_edges, max_size: int | None, crop_type: str, crop_size) -> tuple[tf.Tensor, tf.Tensor]:
  """`random_resize_shortest_edge` then `random_crop`, with the same draws, resizing only the pixels the crop keeps
  (up to 5x fewer for ADE20K's 2x scales)."""
  shape = tf.shape(label)
  size = random_short_edge_size(shape[0], shape[1], resize_seed, short_edges, max_size)
  return resize_window(image, label, size, crop_window(*size, crop_seed, crop_type, crop_size))


def ssd_color_params(seed: tf.Tensor) -> dict:
  """The random draws of `color_aug_ssd` for `seed`, as scalar tensors: for each step whether it applies and its
  amount (`hue` in OpenCV units), and whether contrast comes first."""
  seeds = [_fold(seed, i) for i in range(9)]
  return {
      "brightness_on": _coin(seeds[0]), "brightness": _uniform(seeds[1], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
      "contrast_on": _coin(seeds[2]), "contrast": _uniform(seeds[3], *CONTRAST_RANGE),
      "saturation_on": _coin(seeds[4]), "saturation": _uniform(seeds[5], *SATURATION_RANGE),
      "hue_on": _coin(seeds[6]), "hue": _uniform(seeds[7], -HUE_DELTA, HUE_DELTA + 1, tf.int32),
      "contrast_first": _coin(seeds[8]),
  }


def apply_ssd_color(image: tf.Tensor, params: dict) -> tf.Tensor:
  """PointRend's `ColorAugSSDTransform` with the draws `params` (see `ssd_color_params`) on float32 `[H, W, 3]`.

  brightness  x + delta, delta ~ U(-32, 32)
  contrast    x * alpha, alpha ~ U(0.5, 1.5): a plain scale, unlike tf.image.adjust_contrast (about the mean)
  saturation  HSV S * alpha, alpha ~ U(0.5, 1.5), S clipped to its range (tf.image.adjust_saturation)
  hue         HSV H + k, k an integer in [-18, 18] OpenCV units of 2 degrees, wrapped (tf.image.adjust_hue, whose
              delta is a fraction of the full turn: k / 180)
  Each applies with probability 0.5 and clips to 0..255; brightness first, then contrast, saturation, hue or
  saturation, hue, contrast. The reference rounds down to uint8 after every step; the image stays float here,
  which differs by less than a grey level per step. TF's HSV conversion is scale-invariant in H and S and linear
  in V, so it runs on the 0..255 scale directly.
  """
  def maybe(on, fn, x):
    return tf.cond(on, lambda: tf.clip_by_value(fn(x), 0.0, 255.0), lambda: x)

  def contrast(x):
    return maybe(params["contrast_on"], lambda y: y * params["contrast"], x)

  image = maybe(params["brightness_on"], lambda y: y + params["brightness"], image)
  image = tf.cond(params["contrast_first"], lambda: contrast(image), lambda: image)
  image = maybe(params["saturation_on"], lambda y: tf.image.adjust_saturation(y, params["saturation"]), image)
  image = maybe(params["hue_on"], lambda y: tf.image.adjust_hue(y, tf.cast(params["hue"], tf.float32) / 180.0),
                image)
  return tf.cond(params["contrast_first"], lambda: image, lambda: contrast(image))


def color_aug_ssd(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """SSD colour jitter of float32 `[H, W, 3]` (0..255) with the draws of `seed` (see `apply_ssd_color`)."""
  return apply_ssd_color(image, ssd_color_params(seed))


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Horizontal flip of image and label map together, with probability 0.5."""
  return tf.cond(_coin(seed), lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))


def semantic_mapper_augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, data) -> tuple[tf.Tensor, tf.Tensor]:
  """MaskFormer's semantic (and ADE20K-panoptic) training mapper: resize, crop, colour jitter, flip."""
  image, label = random_resize_and_crop(image, label, _fold(seed, _RESIZE), _fold(seed, _CROP), data.min_size_train,
                                        data.max_size_train, data.crop_type, data.crop_size)
  if data.color_aug_ssd:
    image = color_aug_ssd(image, _fold(seed, _COLOR))
  if data.random_flip:
    image, label = random_flip(image, label, _fold(seed, _FLIP))
  return image, label


def detr_augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, data) -> tuple[tf.Tensor, tf.Tensor]:
  """MaskFormer's COCO-panoptic (DETR) training mapper.

  Flip; with probability `data.detr_crop_prob` resize the short side to a choice of `data.detr_crop_min_sizes`
  (no cap on the long side, as the reference) and take a random 'absolute_range' crop of `data.crop_size`; then
  resize the short side to a choice of `data.min_size_train`, the long side capped at `data.max_size_train`.
  """
  if data.random_flip:
    image, label = random_flip(image, label, _fold(seed, _FLIP))

  def crop_branch(x, y):
    return random_resize_and_crop(x, y, _fold(seed, _DETR_RESIZE), _fold(seed, _DETR_CROP), data.detr_crop_min_sizes,
                                  None, data.crop_type, data.crop_size)

  take_branch = _uniform(_fold(seed, _DETR_BRANCH), 0.0, 1.0) < data.detr_crop_prob
  image, label = tf.cond(take_branch, lambda: crop_branch(image, label), lambda: (image, label))
  image, label = random_resize_shortest_edge(image, label, _fold(seed, _RESIZE), data.min_size_train,
                                             data.max_size_train)
  if data.color_aug_ssd:
    image = color_aug_ssd(image, _fold(seed, _COLOR))
  return image, label


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, data) -> tuple[tf.Tensor, tf.Tensor]:
  """The training augmentation of `data` (a data config): 'absolute' crops follow the semantic mapper,
  'absolute_range' crops the DETR mapper (the only reference recipe that uses them).

  Returns image float32 `[h, w, 3]` (0..255) and label int32 `[h, w]` of the augmented size.
  """
  if data.crop_type == "absolute":
    return semantic_mapper_augment(image, label, seed, data)
  if data.crop_type == "absolute_range":
    return detr_augment(image, label, seed, data)
  raise ValueError(f"data.crop_type must be 'absolute' or 'absolute_range'; got {data.crop_type!r}.")


def pad_to_size(image: tf.Tensor, label: tf.Tensor, size, *, image_pad_value: float, label_pad_value: int,
                too_large: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Pad bottom/right to exactly `size` (h, w): image `[h, w, 3]` with `image_pad_value` (before normalisation, as
  the reference), label `[h, w]` with `label_pad_value`. Returns `[H, W, 3]` and `[H, W]` of static shape.

  An image larger than `size` fails with a tf.errors.InvalidArgumentError whose message is the string tensor
  `too_large` followed by the image's size (the caller says there which example and which config fields).
  """
  shape = tf.shape(label)
  fits = tf.logical_and(shape[0] <= size[0], shape[1] <= size[1])
  with tf.control_dependencies([tf.debugging.Assert(fits, [too_large, "image size (h, w):", shape])]):
    pad = [[0, size[0] - shape[0]], [0, size[1] - shape[1]]]
    image = tf.pad(image, pad + [[0, 0]], constant_values=image_pad_value)
    label = tf.pad(label, pad, constant_values=label_pad_value)
  return tf.ensure_shape(image, (*size, 3)), tf.ensure_shape(label, tuple(size))
