"""Test-time preprocessing and MaskFormer's inference: semantic, panoptic and (Mask2Former-style) instance.

Shapes: Q queries, K real classes (the class head has K + 1 outputs, the last one "no object"); mask logits come
from the model at stride 4 of the padded input (`pred_masks [B, Q, H_pad/4, W_pad/4]`).

The pipeline of the reference (`mask_former/mask_former_model.py`) for one image:
  1. `postprocess_mask_logits`: upsample the mask logits to the padded input, crop the padding away and resize to
     the original image size (Detectron2's `sem_seg_postprocess`).
  2. `semantic_inference` (a `[K, H, W]` score map) and/or `panoptic_inference` (a segment-id map) on those masks.
`predict` runs all of it on one uint8 image.
"""
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from maskformer_jax.models import SIZE_DIVISIBILITY, MaskFormer, compiler_options, normalize_images
from maskformer_jax.models.layers import resize_bilinear

# Mask logits are predicted at 1/4 of the padded input resolution.
MASK_STRIDE = 4
# MaskFormer's COCO-panoptic thresholds, used when a test config leaves them at 0 (the semantic-only configs).
DEFAULT_OBJECT_MASK_THRESHOLD = 0.8
DEFAULT_OVERLAP_THRESHOLD = 0.8


def resize_shortest_edge(image: np.ndarray, short_side: int, max_size: int) -> np.ndarray:
  """Detectron2's `ResizeShortestEdge` at test time: scale so the short side is `short_side` unless the long side
  would exceed `max_size`; bilinear (PIL), rounded sizes. `[H, W, 3]` uint8 -> `[H', W', 3]` uint8."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected an RGB uint8 image [H, W, 3]; got {image.dtype} {image.shape}.")
  h, w = image.shape[:2]
  scale = short_side / min(h, w)
  if max(h, w) * scale > max_size:
    scale = max_size / max(h, w)
  new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def prepare_image(image: np.ndarray, short_side: int = 512, max_size: int = 2048
                  ) -> tuple[np.ndarray, tuple[int, int]]:
  """Resize, normalise with the reference mean/std and zero-pad bottom/right to a multiple of 32.

  Returns the model input `[1, H_pad, W_pad, 3]` float32 and the resized image size `(H, W)` before padding.
  """
  resized = resize_shortest_edge(image, short_side, max_size)
  h, w = resized.shape[:2]
  padded = np.zeros((1, -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) *
                     SIZE_DIVISIBILITY, 3), np.float32)
  padded[0, :h, :w] = normalize_images(resized)
  return padded, (h, w)


# ----------------------------------------------------------------------------------------------------------------
# Mask post-processing.
# ----------------------------------------------------------------------------------------------------------------

def _check_size(name: str, size) -> tuple[int, int]:
  if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
    raise ValueError(f"{name} must be a (height, width) pair of positive ints; got {size!r}.")
  return int(size[0]), int(size[1])


def sem_seg_postprocess(maps: jax.Array, image_size: tuple[int, int], output_size: tuple[int, int]) -> jax.Array:
  """Detectron2's `sem_seg_postprocess`: crop `[..., H_pad, W_pad]` maps to the resized image `image_size` (the
  padding is bottom/right) and resize them bilinearly (PyTorch, align_corners=False) to `output_size`, the original
  image size. Returns `[..., *output_size]`. Jittable with static sizes."""
  (h, w), output_size = _check_size("image_size", image_size), _check_size("output_size", output_size)
  if maps.ndim < 2 or h > maps.shape[-2] or w > maps.shape[-1]:
    raise ValueError(f"image_size {image_size} must fit inside the padded maps [..., H_pad, W_pad]; got maps of "
                     f"shape {maps.shape}. Pass the resized image size before padding (from prepare_image).")
  return resize_bilinear(maps[..., :h, :w], output_size)


def postprocess_mask_logits(mask_logits: jax.Array, image_size: tuple[int, int], output_size: tuple[int, int]
                            ) -> jax.Array:
  """Mask logits at stride 4 of the padded input -> logits at the original image size, in MaskFormer's order:
  bilinear upsampling to the padded input (4h x 4w), then `sem_seg_postprocess` (crop to `image_size`, the resized
  image before padding, and resize to `output_size`).

  Args:
    mask_logits: `[..., h, w]` (usually `[Q, h, w]`) float.
    image_size: `(H, W)` of the resized image inside the padded input, `H <= 4h`, `W <= 4w`.
    output_size: `(H_out, W_out)`, the original image size.

  Returns:
    `[..., H_out, W_out]` logits. Jittable with static sizes.
  """
  if mask_logits.ndim < 2:
    raise ValueError(f"mask_logits must be [..., h, w] (e.g. [Q, h, w]); got shape {mask_logits.shape}.")
  padded_size = (MASK_STRIDE * mask_logits.shape[-2], MASK_STRIDE * mask_logits.shape[-1])
  return sem_seg_postprocess(resize_bilinear(mask_logits, padded_size), image_size, output_size)


# ----------------------------------------------------------------------------------------------------------------
# Semantic, panoptic and instance inference for one image.
# ----------------------------------------------------------------------------------------------------------------

def _check_logits(class_logits, mask_logits) -> tuple[int, int]:
  """Validates one image's predictions; returns (Q, K)."""
  if class_logits.ndim != 2 or mask_logits.ndim != 3:
    raise ValueError(f"Expected one image's class_logits [Q, K+1] and mask_logits [Q, H, W]; got shapes "
                     f"{class_logits.shape} and {mask_logits.shape}. Index the batch (outputs['pred_logits'][i]) "
                     "or jax.vmap over it.")
  if class_logits.shape[0] != mask_logits.shape[0]:
    raise ValueError(f"class_logits and mask_logits must have the same number of queries Q; got "
                     f"{class_logits.shape[0]} and {mask_logits.shape[0]}. Pass both from the same model output.")
  if class_logits.shape[1] < 2:
    raise ValueError(f"class_logits must have K+1 >= 2 columns (K classes and 'no object'); got "
                     f"{class_logits.shape[1]}.")
  for name, x in (("class_logits", class_logits), ("mask_logits", mask_logits)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be float logits; got dtype {x.dtype}. Pass the raw model outputs.")
  return class_logits.shape[0], class_logits.shape[1] - 1


def _check_is_thing(is_thing, num_classes: int) -> np.ndarray:
  is_thing = np.asarray(is_thing)
  if is_thing.shape != (num_classes,) or is_thing.dtype != bool:
    raise ValueError(f"is_thing must be {num_classes} booleans, one per class (K = class_logits.shape[1] - 1); got "
                     f"{is_thing.dtype} {is_thing.shape}.")
  return is_thing


def semantic_inference(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
  """MaskFormer's "semantic inference": per-pixel class scores marginalised over the queries.

  Args:
    class_logits: `[Q, K+1]`.
    mask_logits: `[Q, H, W]`.

  Returns:
    `[K, H, W]` float32, `sum_q softmax(class_logits)[q, c] * sigmoid(mask_logits)[q]` with the "no object"
    column dropped after the softmax. Jittable; `jax.vmap` it over a batch.
  """
  _check_logits(class_logits, mask_logits)
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
  mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  # Full float32: TPUs would otherwise multiply in bfloat16 and flip near-tied pixels.
  return jnp.einsum("qc,qhw->chw", class_probs, mask_probs, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _panoptic_core(class_logits: jax.Array, mask_logits: jax.Array, object_mask_threshold: jax.Array):
  """The per-pixel work of `panoptic_inference`, with static shapes: kept queries are masked instead of gathered.

  Returns keep `[Q]` bool, labels `[Q]`, mask_ids `[H, W]` (the winning query of each pixel), mask_area `[Q]`
  (pixels each query wins; meaningful for kept queries only) and original_area `[Q]` (pixels with sigmoid >= 0.5).
  """
  num_classes = class_logits.shape[-1] - 1
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  scores, labels = probs.max(-1), probs.argmax(-1)
  keep = (labels != num_classes) & (scores > object_mask_threshold)
  mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  # Score-weighted masks are >= 0, so -inf guarantees a dropped query never wins a pixel; argmax takes the first
  # of tied queries, and kept queries keep their relative order, so ties resolve as in the reference's gathered
  # argmax. With nothing kept every pixel points at query 0, which the caller maps to void.
  prob_masks = jnp.where(keep[:, None, None], scores[:, None, None] * mask_probs, -jnp.inf)
  mask_ids = prob_masks.argmax(0).astype(jnp.int32)
  mask_area = jnp.bincount(mask_ids.ravel(), length=class_logits.shape[0])
  original_area = (mask_probs >= 0.5).sum((1, 2))
  return keep, labels, mask_ids, mask_area, original_area


def panoptic_inference(class_logits: jax.Array, mask_logits: jax.Array, is_thing: Sequence[bool],
                       object_mask_threshold: float = DEFAULT_OBJECT_MASK_THRESHOLD,
                       overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD) -> tuple[np.ndarray, list[dict]]:
  """MaskFormer's panoptic ("general") inference, rule for rule as `MaskFormer.panoptic_inference`.

  A query is kept if its most likely class is not "no object" and that probability exceeds
  `object_mask_threshold`; each pixel goes to the kept query with the highest score x sigmoid(mask). Kept queries
  are then visited in query order: one that wins no pixel or has no pixel with sigmoid >= 0.5 is skipped silently
  (its pixels stay void), one whose won area is less than `overlap_threshold` of its sigmoid >= 0.5 area is
  dropped (void too); a stuff class reuses the id of its first segment (merged, listed once); a thing gets a new id.

  Args:
    class_logits: `[Q, K+1]`.
    mask_logits: `[Q, H, W]`, usually already at the original image size (`postprocess_mask_logits`).
    is_thing: K booleans, True for thing classes.
    object_mask_threshold: minimum class probability of a kept query (strictly greater).
    overlap_threshold: minimum fraction of a query's own mask it must win.

  Returns:
    panoptic `[H, W]` int32 numpy segment ids (0 = void, segments from 1) and a list with one
    `{"id", "category_id", "isthing"}` per segment; `category_id` is the class index in [0, K).
  """
  _, num_classes = _check_logits(class_logits, mask_logits)
  is_thing = _check_is_thing(is_thing, num_classes)
  keep, labels, mask_ids, mask_area, original_area = jax.device_get(
      _panoptic_core(class_logits, mask_logits, jnp.float32(object_mask_threshold)))
  # Segment id of each query (0: void); the id loop is tiny and sequential, so it runs on the host.
  segment_of_query = np.zeros(len(keep), np.int32)
  segments, stuff_ids = [], {}
  for q in np.flatnonzero(keep):
    area, own_area = int(mask_area[q]), int(original_area[q])
    if area == 0 or own_area == 0 or area / own_area < overlap_threshold:
      continue
    category = int(labels[q])
    if not is_thing[category] and category in stuff_ids:
      segment_of_query[q] = stuff_ids[category]
      continue
    segment_of_query[q] = len(segments) + 1
    if not is_thing[category]:
      stuff_ids[category] = segment_of_query[q]
    segments.append({"id": int(segment_of_query[q]), "category_id": category, "isthing": bool(is_thing[category])})
  return segment_of_query[mask_ids], segments


@functools.partial(jax.jit, static_argnames="top_k")
def _instance_core(class_logits: jax.Array, mask_logits: jax.Array, top_k: int):
  """Scores `[top_k]`, labels `[top_k]` int32 and binary masks `[top_k, H, W]` of the best (query, class) pairs."""
  num_classes = class_logits.shape[-1] - 1
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
  scores, index = jax.lax.top_k(class_probs.ravel(), top_k)  # sorted by class score, ties to the lower index
  masks = mask_logits[index // num_classes].astype(jnp.float32)
  binary = masks > 0
  mask_scores = (jax.nn.sigmoid(masks) * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
  return scores * mask_scores, index % num_classes, binary


def instance_inference(class_logits: jax.Array, mask_logits: jax.Array, top_k: int = 100,
                       is_thing: Optional[Sequence[bool]] = None) -> dict:
  """Mask2Former's `instance_inference` (MaskFormer itself has none).

  The `Q x K` (query, class) pairs are ranked by class probability (softmax, "no object" dropped) and the top
  `min(top_k, Q*K)` kept; each gets its query's mask binarised at logit > 0 and the score
  `class probability x mean sigmoid inside the binary mask`.

  Args:
    class_logits: `[Q, K+1]`.
    mask_logits: `[Q, H, W]`, usually at the original image size (`postprocess_mask_logits`).
    top_k: the number of detections (`test.detections_per_image`).
    is_thing: optional K booleans; when given, detections of stuff classes are removed after the top-k, as
      Mask2Former does when panoptic inference is also on (so fewer than `top_k` may remain).

  Returns:
    numpy `scores [k]` float32, `labels [k]` int32 and `masks [k, H, W]` bool, ordered by class probability
    (not by final score, as in the reference).
  """
  num_queries, num_classes = _check_logits(class_logits, mask_logits)
  if top_k < 1:
    raise ValueError(f"top_k must be positive; got {top_k}.")
  scores, labels, masks = jax.device_get(
      _instance_core(class_logits, mask_logits, min(top_k, num_queries * num_classes)))
  result = {"scores": scores, "labels": labels, "masks": masks}
  if is_thing is not None:
    thing = _check_is_thing(is_thing, num_classes)[labels]
    result = {name: value[thing] for name, value in result.items()}
  return result


# ----------------------------------------------------------------------------------------------------------------
# End to end on one image.
# ----------------------------------------------------------------------------------------------------------------

def _apply(model: MaskFormer, variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  outputs = model.apply(variables, images, train=False, aux_outputs=False)
  return outputs["pred_logits"][0], outputs["pred_masks"][0]


@functools.cache
def _jitted_apply() -> Callable:
  """`_apply` jitted on first use (the compiler options depend on the backend, known once JAX has started); jit
  caches one compilation per (model, padded shape): Flax modules hash by their configuration."""
  return jax.jit(_apply, static_argnums=0, compiler_options=compiler_options())


@functools.partial(jax.jit, static_argnames=("image_size", "output_size", "postprocess_before_inference",
                                             "return_masks"))
def _semantic_and_masks(class_logits, mask_logits, image_size, output_size, postprocess_before_inference,
                        return_masks):
  """Semantic argmax map `[H, W]` int32, and the mask logits at the original size `[Q, H, W]` if `return_masks`
  (else None: a semantic-only prediction never makes them)."""
  masks = None
  if postprocess_before_inference or return_masks:
    masks = postprocess_mask_logits(mask_logits, image_size, output_size)
  if postprocess_before_inference:
    semantic = semantic_inference(class_logits, masks)
  else:
    # The reference's semantic default: marginalise at the padded input resolution, then crop and resize the
    # K-channel score map (bilinear resizing does not commute with the sigmoid, so the maps differ slightly).
    padded = resize_bilinear(mask_logits, (MASK_STRIDE * mask_logits.shape[-2], MASK_STRIDE * mask_logits.shape[-1]))
    semantic = sem_seg_postprocess(semantic_inference(class_logits, padded), image_size, output_size)
  return semantic.argmax(0).astype(jnp.int32), masks if return_masks else None


def predict(model: MaskFormer, variables: dict, image: np.ndarray, test_config: ml_collections.ConfigDict,
            is_thing: Optional[Sequence[bool]] = None) -> dict:
  """Runs MaskFormer on one image as the reference evaluator does.

  The image is resized (short side `test_config.min_size_test`, long side at most `max_size_test`), normalised
  and padded to /32; the model runs jitted (compiled once per padded shape and model); the mask logits are brought
  back to the original image size. The semantic map follows `test_config.sem_seg_postprocess_before_inference`
  like the reference; panoptic inference uses `test_config.object_mask_threshold` / `overlap_threshold`
  (MaskFormer's 0.8 / 0.8 where those are 0).

  Args:
    model: a MaskFormer from `build_model`.
    variables: its variables.
    image: `[H, W, 3]` uint8 RGB.
    test_config: `config.test`.
    is_thing: K booleans (True for thing classes); panoptic inference runs only when given.

  Returns:
    `{"semantic": [H, W] int32 class indices}`, plus `"panoptic": [H, W] int32` segment ids and `"segments"` (see
    `panoptic_inference`) when `is_thing` is given. All numpy.
  """
  images, image_size = prepare_image(image, test_config.min_size_test, test_config.max_size_test)
  class_logits, mask_logits = _jitted_apply()(model, variables, jnp.asarray(images))
  semantic, masks = _semantic_and_masks(class_logits, mask_logits, image_size, image.shape[:2],
                                        bool(test_config.sem_seg_postprocess_before_inference), is_thing is not None)
  result = {"semantic": np.asarray(semantic)}
  if is_thing is not None:
    result["panoptic"], result["segments"] = panoptic_inference(
        class_logits, masks, is_thing,
        object_mask_threshold=test_config.object_mask_threshold or DEFAULT_OBJECT_MASK_THRESHOLD,
        overlap_threshold=test_config.overlap_threshold or DEFAULT_OVERLAP_THRESHOLD)
  return result
