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


def _mask_losses(logits: jax.Array, targets: jax.Array, focal_alpha: float, focal_gamma: float,
                 grad_weights: tuple[float, float] | None = None) -> tuple:
  """Per-mask sigmoid focal loss (mean over pixels) and dice loss (+1 smoothing), and optionally the gradient of
  their weighted sum.

  Args:
    logits: float32 `[..., h, w]` mask logits, bilinearly upsampled to the targets' size first.
    targets: bool or uint8 `[..., H, W]` (broadcast against the logits' leading axes).
    grad_weights: `(focal weight, dice weight)`, or None for the losses alone.

  Returns:
    `(focal, dice)` `[...]`, plus, with `grad_weights`, the gradient of `focal weight * focal + dice weight * dice`
    w.r.t. `logits` `[..., h, w]`. It is written out because each mask's loss depends on its own logits only,
    which lets the loss keep a per-mask gradient instead of differentiating through its loop.
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
  if grad_weights is None:
    return focal, dice
  # d/dx with dp/dx = p (1 - p), d bce/dx = p - t and d wrong/dx = (1 - 2t) p (1 - p).
  slope = prob * (1 - prob)
  focal_grad = alpha_t * (prob - t) * wrong ** focal_gamma
  if focal_gamma:
    focal_grad += alpha_t * bce * focal_gamma * wrong ** (focal_gamma - 1) * (1 - 2 * t) * slope
  dice_grad = (numerator[..., None, None] - 2 * t * denominator[..., None, None]) / denominator[..., None, None] ** 2
  focal_weight, dice_weight = grad_weights
  _, upsample_transpose = jax.vjp(upsample, logits)  # linear: the transpose maps pixel gradients back to h x w
  (grad,) = upsample_transpose(focal_weight / num_pixels * focal_grad + dice_weight * dice_grad * slope)
  return (focal, dice), grad


def _real_slot_order(valid: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`(order, live)` `[B, M + chunk]`: `order[b, p]` is the index of image b's p-th real slot (clipped to M - 1
  past the last one) and `live[b, p]` whether there is one."""
  num_slots = valid.shape[1]
  seen = jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # [B, M]: real slots up to and including each slot
  position = jnp.arange(num_slots + chunk, dtype=jnp.int32)
  order = jnp.minimum(jnp.sum(seen[:, None, :] <= position[None, :, None], axis=-1, dtype=jnp.int32), num_slots - 1)
  return order, position < seen[:, -1:]


def _chunked_mask_losses(pred_masks, query_index, masks, valid, grad_weights, focal_alpha, focal_gamma):
  """Focal and dice of every real slot's matched query, `[B, L, M]` each (0 for padded slots), and with
  `grad_weights` the gradient of their weighted sum w.r.t. the matched logits, `[B, L, M + chunk, h, w]` by
  position in `_real_slot_order` (zeros past the real slots).

  A while loop visits the real slots of every image, `MASK_CHUNK` at a time, for all L layers at once (each target
  is read once per chunk); padded slots and unmatched queries are never upsampled.
  """
  num_slots = valid.shape[1]
  chunk = min(MASK_CHUNK, num_slots)
  order, live = _real_slot_order(valid, chunk)
  slots = jnp.arange(num_slots, dtype=jnp.int32)

  def body(state):
    start = state["chunk"] * chunk
    index = jax.lax.dynamic_slice_in_dim(order, start, chunk, axis=1)  # [B, C] slots
    chunk_live = jax.lax.dynamic_slice_in_dim(live, start, chunk, axis=1)  # [B, C]
    query = jnp.take_along_axis(query_index, index[:, None, :], axis=2)  # [B, L, C]
    logits = jnp.take_along_axis(pred_masks, jnp.maximum(query, 0)[..., None, None], axis=2)  # [B, L, C, h, w]
    targets = jnp.take_along_axis(masks, index[..., None, None], axis=1)[:, None]  # [B, 1, C, H, W]
    out = _mask_losses(logits.astype(jnp.float32), targets, focal_alpha, focal_gamma, grad_weights)
    losses, grad = out if grad_weights else (out, None)
    scatter = (chunk_live[..., None] & (index[..., None] == slots)).astype(jnp.float32)  # [B, C, M]: chunk -> slot
    state = dict(state, chunk=state["chunk"] + 1)
    for name, value in zip(("focal", "dice"), losses):
      state[name] = state[name] + jnp.einsum("blc,bcm->blm", value, scatter)
    if grad is not None:
      grad = jnp.where(chunk_live[:, None, :, None, None], grad, 0)
      state["grad"] = jax.lax.dynamic_update_slice_in_dim(state["grad"], grad, start, axis=2)
    return state

  zeros = jnp.zeros(query_index.shape, jnp.float32)
  state = {"chunk": jnp.int32(0), "focal": zeros, "dice": zeros}
  if grad_weights:
    state["grad"] = jnp.zeros((*query_index.shape[:2], order.shape[1], *pred_masks.shape[3:]), jnp.float32)
  num_chunks = (jnp.max(jnp.sum(valid, axis=1, dtype=jnp.int32)) + chunk - 1) // chunk
  return jax.lax.while_loop(lambda s: s["chunk"] < num_chunks, body, state)


def _weighted(state: dict, grad_weights: tuple[float, float]) -> tuple:
  """`(weighted, (focal, dice))` from the loop's state."""
  focal_weight, dice_weight = grad_weights
  return focal_weight * state["focal"] + dice_weight * state["dice"], (state["focal"], state["dice"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _weighted_mask_losses(pred_masks, query_index, masks, valid, grad_weights, focal_alpha, focal_gamma):
  state = _chunked_mask_losses(pred_masks, query_index, masks, valid, None, focal_alpha, focal_gamma)
  return _weighted(state, grad_weights)


def _weighted_mask_losses_fwd(pred_masks, query_index, masks, valid, grad_weights, focal_alpha, focal_gamma):
  state = _chunked_mask_losses(pred_masks, query_index, masks, valid, grad_weights, focal_alpha, focal_gamma)
  return _weighted(state, grad_weights), (state["grad"], pred_masks.shape[2], query_index, masks, valid)


def _weighted_mask_losses_bwd(grad_weights, focal_alpha, focal_gamma, residuals, cotangents):
  del grad_weights, focal_alpha, focal_gamma  # baked into the stored gradient
  position_grad, num_queries, query_index, masks, valid = residuals
  cotangent, _ = cotangents  # the (focal, dice) outputs are diagnostics: the public wrapper stops their gradient
  order, live = _real_slot_order(valid, position_grad.shape[2] - valid.shape[1])
  slot_cotangent = jnp.take_along_axis(cotangent, order[:, None, :], axis=2)  # [B, L, P]
  query = jnp.take_along_axis(query_index, order[:, None, :], axis=2)  # [B, L, P]
  # Each position's gradient goes to its matched query: a one-hot product (queries are matched at most once).
  route = (live[:, None, :, None] & (query[..., None] == jnp.arange(num_queries))) * slot_cotangent[..., None]
  grad = jnp.einsum("blpq,blphw->blqhw", route, position_grad, precision=jax.lax.Precision.HIGHEST)
  # query_index, masks and valid are integer or bool: their cotangents are the float0 zeros JAX expects.
  return (grad, *(np.zeros(x.shape, jax.dtypes.float0) for x in (query_index, masks, valid)))


_weighted_mask_losses.defvjp(_weighted_mask_losses_fwd, _weighted_mask_losses_bwd)


def matched_mask_losses(pred_masks: jax.Array, query_index: jax.Array, masks: jax.Array, valid: jax.Array, *,
                        mask_weight: float, dice_weight: float, focal_alpha: float, focal_gamma: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sigmoid focal (mean over pixels) and dice loss of each target slot's matched query, in every layer.

  Args:
    pred_masks: float `[B, L, Q, h, w]` mask logits of L decoder layers.
    query_index: int32 `[B, L, M]` the query matched to each slot in each layer (-1 for padded slots).
    masks: bool or uint8 `[B, M, H, W]` target masks; predictions are bilinearly upsampled to H x W.
    valid: bool `[B, M]`.

  Returns:
    `(weighted, focal, dice)`, float32 `[B, L, M]` each, 0 for padded slots, with `weighted = mask_weight * focal
    + dice_weight * dice`. Only `weighted` carries a gradient (w.r.t. `pred_masks`): a custom VJP keeps the
    gradient of each matched mask, computed in the loop, since a while loop cannot be differentiated in reverse
    mode; one weighted gradient per mask halves the full-resolution work of keeping focal and dice apart.
  """
  weighted, diagnostics = _weighted_mask_losses(pred_masks, query_index, masks, valid, (mask_weight, dice_weight),
                                                focal_alpha, focal_gamma)
  return (weighted, *jax.lax.stop_gradient(diagnostics))


def _layer_terms(pred_logits, pred_masks, query_index, targets, *, num_classes, no_object_weight, mask_weight,
                 dice_weight, focal_alpha, focal_gamma, num_masks) -> tuple[jax.Array, dict]:
  """The weighted mask loss summed over layers and the three unweighted terms `[L]` of every decoder layer,
  given predictions `[B, L, Q, ...]` and the matching `query_index` `[B, L, M]`."""
  labels, valid = targets["labels"], targets["valid"]
  num_queries = pred_logits.shape[2]

  # Classification: matched queries learn their target's class, all others "no object" (the last class).
  matched = valid[:, None, :, None] & (query_index[..., None] == jnp.arange(num_queries))  # [B, L, M, Q]
  target_class = jnp.where(matched.any(2), jnp.sum(matched * labels[:, None, :, None], axis=2), num_classes)
  log_probs = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]  # [B, L, Q]
  weight = jnp.where(target_class == num_classes, no_object_weight, 1.0)
  loss_ce = jnp.sum(weight * nll, axis=(0, 2)) / jnp.sum(weight, axis=(0, 2))  # PyTorch's weighted mean

  # Masks: each real slot's matched prediction against its target.
  weighted, focal, dice = matched_mask_losses(pred_masks, query_index, targets["masks"], valid,
                                              mask_weight=mask_weight, dice_weight=dice_weight,
                                              focal_alpha=focal_alpha, focal_gamma=focal_gamma)
  terms = {"loss_ce": loss_ce, "loss_mask": jnp.sum(focal, axis=(0, 2)) / num_masks,
           "loss_dice": jnp.sum(dice, axis=(0, 2)) / num_masks}
  return jnp.sum(weighted) / num_masks, terms


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
    `loss_ce_i`, `loss_mask_i`, `loss_dice_i` of auxiliary output i (0 = first decoder layer), for logging (no
    gradient flows through them); `total` is their weighted sum, and the one to differentiate.
  """
  layers = [*outputs.get("aux_outputs", []), outputs]
  check_targets(targets, num_classes, outputs["pred_logits"].shape[0])
  if outputs["pred_logits"].shape[-1] != num_classes + 1:
    raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes; expected num_classes + 1 = "
                     f"{num_classes + 1} (the last is 'no object').")
  targets = {"labels": targets["labels"], "masks": targets["masks"], "valid": targets["valid"].astype(bool)}
  # All layers are matched and scored together, stacked after the batch axis (the layout in which the model
  # computes the masks): one matching cost in which each layer's queries are more queries of the same image, one
  # solver loop and one mask-loss loop for all layers, and no per-layer vmap to move the large tensors around.
  pred_logits = jnp.stack([layer["pred_logits"] for layer in layers], axis=1)  # [B, L, Q, K+1]
  pred_masks = jnp.stack([layer["pred_masks"] for layer in layers], axis=1)  # [B, L, Q, h, w]
  batch, num_layers, num_queries = pred_masks.shape[:3]
  num_masks = jnp.maximum(jnp.sum(targets["valid"]), 1).astype(jnp.float32)

  cost = matching.matching_cost(
      jax.lax.stop_gradient(pred_logits).reshape(batch, num_layers * num_queries, -1),
      jax.lax.stop_gradient(pred_masks).reshape(batch, num_layers * num_queries, *pred_masks.shape[3:]),
      targets["labels"], targets["masks"], targets["valid"],
      class_weight=class_weight if match_class_weight is None else match_class_weight, mask_weight=mask_weight,
      dice_weight=dice_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
  query_index = matching.match_queries(cost.reshape(batch * num_layers, num_queries, -1),
                                       jnp.repeat(targets["valid"], num_layers, axis=0), backend=matcher)
  mask_total, stacked = _layer_terms(pred_logits, pred_masks, query_index.reshape(batch, num_layers, -1), targets,
                                     num_classes=num_classes, no_object_weight=no_object_weight,
                                     mask_weight=mask_weight, dice_weight=dice_weight, focal_alpha=focal_alpha,
                                     focal_gamma=focal_gamma, num_masks=num_masks)
  terms = {}
  for i in range(len(layers)):
    suffix = "" if i == len(layers) - 1 else f"_{i}"
    terms.update({name + suffix: jax.lax.stop_gradient(stacked[name][i]) for name in TERMS})
  return class_weight * stacked["loss_ce"].sum() + mask_total, terms
