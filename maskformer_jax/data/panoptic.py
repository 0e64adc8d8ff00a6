"""COCO panoptic segment-id encoding: a panoptic PNG stores segment id R + 256 G + 256^2 B per pixel, 0 = void.

numpy versions for builders and evaluation, a TF version for the input pipeline.
"""
import numpy as np
import tensorflow as tf

# Largest id the three 8-bit channels can hold, plus one.
ID_LIMIT = 256**3


def rgb2id(rgb: np.ndarray) -> np.ndarray:
  """Segment ids int32 `[..., H, W]` of an RGB-encoded panoptic image, integer `[..., H, W, 3]`."""
  rgb = np.asarray(rgb).astype(np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
  """RGB encoding uint8 `[..., H, W, 3]` of segment ids, integer `[..., H, W]` in [0, 256^3)."""
  ids = np.asarray(ids).astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= ID_LIMIT):
    raise ValueError(f"Segment ids must lie in [0, {ID_LIMIT}); got [{ids.min()}, {ids.max()}].")
  return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def rgb2id_tf(rgb: tf.Tensor) -> tf.Tensor:
  """Segment ids int32 `[..., H, W]` of a decoded panoptic PNG, uint8 `[..., H, W, 3]`."""
  rgb = tf.cast(rgb, tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb_tf(ids: tf.Tensor) -> tf.Tensor:
  """RGB encoding uint8 `[..., H, W, 3]` of segment ids, integer `[..., H, W]` in [0, 256^3)."""
  ids = tf.cast(ids, tf.int32)
  return tf.cast(tf.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1), tf.uint8)
