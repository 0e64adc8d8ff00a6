"""MaskFormer's training objective: Hungarian matching, then cross-entropy, sigmoid focal and dice losses, at the
final decoder layer and at every auxiliary one (facebookresearch/MaskFormer `mask_former/modeling/criterion.py`).

Targets are padded to a static number of segments per image:
  labels  int32 `[B, M]`            class of each segment, in [0, num_classes)
  masks   bool or uint8 `[B, M, H, W]`  binary masks at the (padded) input resolution
  valid   bool `[B, M]`             which slots hold real segments
Padded slots take part in nothing: they are never matched and add nothing to any term.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax import matching
from maskformer_jax.models.layers import resize_bilinear

TERMS = ("loss_ce", "loss_mask", "loss_dice")


# Matched masks are upsampled and scored this many per image at a time, so the work grows with the number of real
# segments (rounded up to a chunk), not with the padded `max_segments`.
MASK_CHUNK = 8


def _mask_losses(logits: jax.Array, targets: jax.Array, focal_alpha: float, focal_gamma: float, with_grads: bool
                 ) -> tuple:
  """Per-mask sigmoid focal loss (mean over pixels) and dice loss (+1 smoothing), and optionally their gradients.

  Args:
    logits: float32 `[..., h, w]` mask logits, bilinearly upsampled to the targets' size first.
    targets: bool or uint8 `[..., H, W]`.

  Returns:
    `(focal, dice)` `[...]`, plus `(focal_grad, dice_grad)` w.r.t. `logits` `[..., h, w]` if `with_grads`. The
    gradients are written out because each mask's loss depends on its own logits only, which lets the loss keep a
    per-mask gradient instead of differentiating through its loop (`matched_mask_losses`).
  """
  upsample = functools.partial(resize_bilinear, size=targets.shape[-2:])
  x = upsample(logits)
  t = targets.astype(jnp.float32)
  num_pixels = t.shape[-1] * t.shape[-2]
  pixels = (-2, -1)
  prob, softplus = matching.sigmoid_and_softplus(x)
  bce = softplus - x * t
  wrong = prob + t - 2 * prob * t  # 1 - p_t, the probability given to the wrong answer
  alpha_t = (1 - focal_alpha) + (2 * focal_alpha - 1) * t
  focal = jnp.sum(alpha_t * bce * wrong ** focal_gamma, pixels) / num_pixels
  numerator = 2 * jnp.sum(prob * t, pixels) + 1
  denominator = jnp.sum(prob, pixels) + jnp.sum(t, pixels) + 1
  dice = 1 - numerator / denominator
  if not with_grads:
    return focal, dice
  # d/dx with dp/dx = p (1 - p), d bce/dx = p - t and d wrong/dx = (1 - 2t) p (1 - p).
  slope = prob * (1 - prob)
  focal_grad = alpha_t * (prob - t) * wrong ** focal_gamma
  if focal_gamma:
    focal_grad += alpha_t * bce * focal_gamma * wrong ** (focal_gamma - 1) * (1 - 2 * t) * slope
  dice_grad = (numerator[..., None, None] - 2 * t * denominator[..., None, None]) / denominator[..., None, None] ** 2
  _, upsample_transpose = jax.vjp(upsample, logits)  # linear: the transpose maps pixel gradients back to h x w
  grads = jax.vmap(lambda g: upsample_transpose(g)[0])(jnp.stack([focal_grad / num_pixels, dice_grad * slope]))
  return (focal, dice), (grads[0], grads[1])


def _chunked_mask_losses(chosen, masks, valid, focal_alpha, focal_gamma, with_grads):
  """Per-slot focal and dice `[B, M]` (0 for padded slots) and, if asked, their gradients w.r.t. `chosen`.

  A while loop visits the real slots of every image, `MASK_CHUNK` at a time; padded slots are never upsampled.
  """
  batch, num_slots = valid.shape
  chunk = min(MASK_CHUNK, num_slots)
  count = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]
  # order[b, p]: index of the p-th real slot of image b (the number of slots before it), for p < count[b].
  seen = jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # [B, M]
  position = jnp.arange(num_slots + chunk, dtype=jnp.int32)
  order = jnp.minimum(jnp.sum(seen[:, None, :] <= position[None, :, None], axis=-1, dtype=jnp.int32), num_slots - 1)
  slots = jnp.arange(num_slots, dtype=jnp.int32)

  def body(state):
    start = state["chunk"] * chunk
    index = jax.lax.dynamic_slice_in_dim(order, start, chunk, axis=1)  # [B, C]
    live = start + jnp.arange(chunk) < count[:, None]
    scatter = (live[..., None] & (index[..., None] == slots)).astype(jnp.float32)  # [B, C, M]: chunk -> slot
    logits = jnp.take_along_axis(chosen, index[..., None, None], axis=1)
    targets = jnp.take_along_axis(masks, index[..., None, None], axis=1)
    out = _mask_losses(logits, targets, focal_alpha, focal_gamma, with_grads)
    losses, grads = out if with_grads else (out, ())
    state = dict(state, chunk=state["chunk"] + 1)
    for name, value in zip(("focal", "dice"), losses):
      state[name] = state[name] + jnp.einsum("bc,bcm->bm", value, scatter)
    for name, grad in zip(("focal_grad", "dice_grad"), grads):
      state[name] = state[name] + jnp.einsum("bcm,bchw->bmhw", scatter, grad, precision=jax.lax.Precision.HIGHEST)
    return state

  zeros = jnp.zeros_like(valid, jnp.float32)
  state = {"chunk": jnp.int32(0), "focal": zeros, "dice": zeros}
  if with_grads:
    state.update(focal_grad=jnp.zeros_like(chosen), dice_grad=jnp.zeros_like(chosen))
  num_chunks = (jnp.max(count) + chunk - 1) // chunk
  return jax.lax.while_loop(lambda s: s["chunk"] < num_chunks, body, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def matched_mask_losses(chosen: jax.Array, masks: jax.Array, valid: jax.Array, focal_alpha: float,
                        focal_gamma: float) -> tuple[jax.Array, jax.Array]:
  """Sigmoid focal (mean over pixels) and dice loss of each target slot's matched prediction.

  Args:
    chosen: float32 `[B, M, h, w]` mask logits of the query matched to each slot (anything for padded slots).
    masks: bool or uint8 `[B, M, H, W]` target masks; predictions are bilinearly upsampled to H x W.
    valid: bool `[B, M]`.

  Returns:
    `(focal, dice)`, float32 `[B, M]` each, 0 for padded slots. A while loop over the real slots cannot be
    differentiated in reverse mode, so a custom VJP keeps each slot's gradient, computed chunk by chunk.
  """
  state = _chunked_mask_losses(chosen, masks, valid, focal_alpha, focal_gamma, with_grads=False)
  return state["focal"], state["dice"]


def _matched_mask_losses_fwd(chosen, masks, valid, focal_alpha, focal_gamma):
  state = _chunked_mask_losses(chosen, masks, valid, focal_alpha, focal_gamma, with_grads=True)
  return (state["focal"], state["dice"]), (state["focal_grad"], state["dice_grad"], masks, valid)


def _matched_mask_losses_bwd(focal_alpha, focal_gamma, residuals, cotangents):
  del focal_alpha, focal_gamma  # baked into the stored gradients
  focal_grad, dice_grad, masks, valid = residuals
  focal_cotangent, dice_cotangent = cotangents
  grad = focal_cotangent[..., None, None] * focal_grad + dice_cotangent[..., None, None] * dice_grad
  # masks and valid are integer or bool: their cotangents are the float0 zeros JAX expects.
  return grad, np.zeros(masks.shape, jax.dtypes.float0), np.zeros(valid.shape, jax.dtypes.float0)


matched_mask_losses.defvjp(_matched_mask_losses_fwd, _matched_mask_losses_bwd)


def _layer_terms(pred_logits, pred_masks, query_index, targets, *, num_classes, no_object_weight, focal_alpha,
                 focal_gamma, num_masks) -> dict:
  """The three unweighted terms of one decoder layer, given its matching `query_index` `[B, M]`."""
  labels, valid = targets["labels"], targets["valid"]
  num_queries = pred_logits.shape[1]

  # Classification: matched queries learn their target's class, all others "no object" (the last class).
  matched = valid[..., None] & (query_index[..., None] == jnp.arange(num_queries))  # [B, M, Q]
  target_class = jnp.where(matched.any(1), jnp.sum(matched * labels[..., None], axis=1), num_classes)  # [B, Q]
  log_probs = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
  weight = jnp.where(target_class == num_classes, no_object_weight, 1.0)
  loss_ce = jnp.sum(weight * nll) / jnp.sum(weight)  # PyTorch's weighted mean

  # Masks: each real slot's matched prediction against its target.
  chosen = jnp.take_along_axis(pred_masks, jnp.maximum(query_index, 0)[..., None, None], axis=1)  # [B, M, h, w]
  focal, dice = matched_mask_losses(chosen.astype(jnp.float32), targets["masks"], valid, focal_alpha, focal_gamma)
  return {"loss_ce": loss_ce, "loss_mask": jnp.sum(focal) / num_masks, "loss_dice": jnp.sum(dice) / num_masks}


def check_targets(targets: dict, num_classes: int, batch_size: int) -> None:
  """Raises a ValueError naming the problem if `targets` does not follow the padded target format."""
  missing = sorted({"labels", "masks", "valid"} - set(targets))
  if missing:
    raise ValueError(f"targets is missing {missing}; expected labels [B, M], masks [B, M, H, W], valid [B, M].")
  labels, masks, valid = targets["labels"], targets["masks"], targets["valid"]
  if labels.ndim != 2 or valid.shape != labels.shape or masks.shape[:2] != labels.shape or masks.ndim != 4:
    raise ValueError(f"targets must be labels [B, M], masks [B, M, H, W], valid [B, M]; got labels {labels.shape}, "
                     f"masks {masks.shape}, valid {valid.shape}.")
  if labels.shape[0] != batch_size:
    raise ValueError(f"targets hold {labels.shape[0]} images but the predictions {batch_size}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"targets['labels'] must be integers; got {labels.dtype}.")
  if masks.dtype not in (jnp.bool_, jnp.uint8):
    raise ValueError(f"targets['masks'] must be bool or uint8 (binary masks); got {masks.dtype}.")
  if not isinstance(labels, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer):
    real = np.asarray(labels)[np.asarray(valid, bool)]
    if real.size and (real.min() < 0 or real.max() >= num_classes):
      raise ValueError(f"targets['labels'] has values in [{real.min()}, {real.max()}] for real segments but "
                       f"num_classes is {num_classes}: labels must lie in [0, {num_classes}). Map ignored regions "
                       "to no segment at all rather than to a label.")


def maskformer_loss(outputs: dict, targets: dict, *, num_classes: int, class_weight: float = 1.0,
                    mask_weight: float = 20.0, dice_weight: float = 1.0, no_object_weight: float = 0.1,
                    focal_alpha: float = 0.25, focal_gamma: float = 2.0, matcher: str = "device",
                    match_class_weight: float | None = None) -> tuple[jax.Array, dict]:
  """MaskFormer's loss for the model's output dict and padded targets (see the module docstring).

  Args:
    outputs: `pred_logits` `[B, Q, K+1]`, `pred_masks` `[B, Q, H/4, W/4]` and `aux_outputs`, a (possibly empty)
      list of such dicts for decoder layers 1..L-1, as `MaskFormer.__call__` returns.
    targets: `labels`, `masks`, `valid` as above; `masks` at the padded input resolution H x W.
    num_classes: K, the number of real classes.
    class_weight, mask_weight, dice_weight: weights of the cross-entropy, focal and dice terms, in the loss and in
      the matching cost alike.
    no_object_weight: cross-entropy weight of the "no object" class (real classes weigh 1).
    match_class_weight: weight of the class term in the matching cost alone; None (MaskFormer) ties it to
      class_weight. DETR keeps the two apart; raising class_weight alone strengthens classification while the
      matching stays driven by the masks.
    matcher: 'device' or 'host', see `matching.match_queries`.

  Every decoder layer is matched on its own (no gradient flows through the matching). Focal and dice are summed
  over the matched pairs of the whole (global) batch and divided by its number of real segments (at least 1); the
  cross-entropy is the weighted mean over all queries.

  Returns:
    `(total, terms)`: `terms` holds the unweighted `loss_ce`, `loss_mask`, `loss_dice` of the final layer and
    `loss_ce_i`, `loss_mask_i`, `loss_dice_i` of auxiliary output i (0 = first decoder layer); `total` is their
    weighted sum.
  """
  layers = [*outputs.get("aux_outputs", []), outputs]
  check_targets(targets, num_classes, outputs["pred_logits"].shape[0])
  if outputs["pred_logits"].shape[-1] != num_classes + 1:
    raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes; expected num_classes + 1 = "
                     f"{num_classes + 1} (the last is 'no object').")
  targets = {"labels": targets["labels"], "masks": targets["masks"], "valid": targets["valid"].astype(bool)}
  # All layers are matched and scored together, stacked on a leading axis: one solver loop for all of them.
  pred_logits = jnp.stack([layer["pred_logits"] for layer in layers])  # [L, B, Q, K+1]
  pred_masks = jnp.stack([layer["pred_masks"] for layer in layers])  # [L, B, Q, h, w]
  num_masks = jnp.maximum(jnp.sum(targets["valid"]), 1).astype(jnp.float32)

  def layer_terms(logits, masks):
    cost = matching.matching_cost(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(masks), targets["labels"],
                                  targets["masks"], targets["valid"],
                                  class_weight=class_weight if match_class_weight is None else match_class_weight,
                                  mask_weight=mask_weight, dice_weight=dice_weight,
                                  focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    query_index = matching.match_queries(cost, targets["valid"], backend=matcher)
    return _layer_terms(logits, masks, query_index, targets, num_classes=num_classes,
                        no_object_weight=no_object_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                        num_masks=num_masks)

  stacked = jax.vmap(layer_terms)(pred_logits, pred_masks)
  terms = {}
  for i in range(len(layers)):
    suffix = "" if i == len(layers) - 1 else f"_{i}"
    terms.update({name + suffix: stacked[name][i] for name in TERMS})
  weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
  total = sum(weights[name] * stacked[name].sum() for name in TERMS)
  return total, terms
