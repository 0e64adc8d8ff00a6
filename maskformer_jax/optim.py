"""MaskFormer's optimizer: full-model gradient clipping, then AdamW with per-parameter groups and a warmup + poly
(or multi-step) learning-rate schedule (facebookresearch/MaskFormer `train_net.py` `build_optimizer` and
`build_lr_scheduler`, with the detectron2 pieces they use).

Everything is driven by `config.solver` (`configs/common.py` `solver_config`):
  `learning_rate_schedule(solver)`        step -> base learning rate (float32 scalar)
  `parameter_groups(params)`              pytree of group labels with the structure of `params`
  `group_hyperparameters(solver, label)`  (lr multiplier, weight decay) of a group
  `make_optimizer(solver, params)`        the optax transformation

The step counter is the number of optimizer updates applied so far: detectron2 steps its scheduler after every
iteration, so the first update uses `lr(0)`.

The optimizer state is a pure pytree (optax NamedTuples of arrays, no Python-side state): it can be jitted,
replicated or sharded like the parameters. Group labels are computed from parameter names when the optimizer is
built, so they cost nothing at run time.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"
# Weight-decay kinds of trainable parameters, each with its own decay value.
DECAY, NORM, EMBED, POSITION = "decay", "norm", "embed", "position"

# Frozen batch norm (detectron2's `FrozenBatchNorm2d`, `models/layers.py` `FrozenBatchNorm`): the `norm` of every
# ResNet conv, `backbone/stem/conv1/norm` and `backbone/res{s}_{i}/{conv1,conv2,conv3,shortcut}/norm`. Its
# `scale`/`bias` sit in `params` only to mirror PyTorch's parameter counts; the reference stores them as buffers.
_FROZEN_BN = re.compile(r"(^|/)backbone/(stem|res\d+_\d+)/(conv\d+|shortcut)/norm/(scale|bias)$")
# Every LayerNorm and GroupNorm is a module named `norm` or `norm<k>` (`models/layers.py` `layer_norm`,
# `group_norm`): Swin's block `norm1`/`norm2`, `patch_embed/norm`, `downsample/norm` and per-stage `norm0..norm3`;
# the transformers' `norm1..norm3` and the decoder's shared `norm`; the pixel decoder's GroupNorms `.../norm`.
_NORM = re.compile(r"(^|/)norm\d*/(scale|bias)$")
# `nn.Embed`'s table: the predictor's `query_embed/embedding` (detectron2's `nn.Embedding` rule).
_EMBED_LEAVES = ("embedding",)
# Swin's position parameters, excluded from decay by name in the reference (`absolute_pos_embed` only exists with
# absolute position embeddings, which MaskFormer does not use).
_POSITION_LEAVES = ("relative_position_bias_table", "absolute_pos_embed")
# Weights and biases of linear, conv and attention layers: all decayed (the reference decays biases too).
_DECAY_LEAVES = ("kernel", "bias", "in_proj_kernel", "in_proj_bias")

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6).
_CLIP_EPS = 1e-6


def learning_rate_schedule(solver: ml_collections.ConfigDict) -> optax.Schedule:
  """detectron2's `WarmupPolyLR` (`lr_schedule='poly'`) or `WarmupMultiStepLR` (`'step'`) as an optax schedule.

  `lr(step) = base_lr * warmup(step) * decay(step)` with
    warmup(step) = warmup_factor * (1 - a) + a, a = step / warmup_steps, while step < warmup_steps; 1 after
                   (detectron2's "linear" warmup);
    decay(step)  = max(1 - step / max_steps, 0) ** poly_power  for 'poly' (0 past max_steps, where detectron2
                   would fail), or gamma ** (number of milestones in `steps` that are <= step) for 'step'
                   (detectron2's `bisect_right`: the drop applies from the milestone step itself).
  The returned function takes an integer step (Python int or int array, traceable) and returns a float32 scalar.
  """
  if solver.lr_schedule not in ("poly", "step"):
    raise ValueError(f"solver.lr_schedule must be 'poly' or 'step'; got {solver.lr_schedule!r}")
  base_lr, warmup_steps, warmup_factor = float(solver.base_lr), int(solver.warmup_steps), float(solver.warmup_factor)
  max_steps, poly_power = int(solver.max_steps), float(solver.poly_power)
  milestones, gamma = tuple(int(s) for s in solver.steps), float(solver.gamma)

  def schedule(count):
    count = jnp.asarray(count)
    step = count.astype(jnp.float32)
    warmup = jnp.float32(1.0)
    if warmup_steps > 0:
      alpha = step / warmup_steps
      warmup = jnp.where(count < warmup_steps, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    if solver.lr_schedule == "poly":
      # (max_steps - step) / max_steps rather than 1 - step / max_steps: exact to float32 rounding near the end,
      # where the latter would lose most digits of a tiny difference.
      decay = (jnp.maximum(max_steps - count, 0).astype(jnp.float32) / max_steps) ** poly_power
    else:
      passed = sum((count >= m).astype(jnp.int32) for m in milestones)
      decay = jnp.float32(gamma) ** passed
    return (base_lr * warmup * decay).astype(jnp.float32)

  return schedule


def _classify(path: str) -> str:
  """The weight-decay kind of the parameter at `path` ("a/b/leaf"), or FROZEN; rules in `parameter_groups`."""
  leaf = path.rsplit("/", 1)[-1]
  if _FROZEN_BN.search(path):
    return FROZEN
  if _NORM.search(path):
    return NORM
  if leaf in _EMBED_LEAVES:
    return EMBED
  if leaf in _POSITION_LEAVES:
    return POSITION
  if leaf in _DECAY_LEAVES:
    return DECAY
  raise ValueError(f"parameter_groups: no rule classifies parameter {path!r} (leaf name {leaf!r}); name it like "
                   f"the existing layers or add a rule in maskformer_jax/optim.py")


def parameter_groups(params) -> dict:
  """The optimizer group of every parameter, as a pytree of strings with the structure of `params`.

  Mirrors MaskFormer's `build_optimizer` (one torch param group per parameter), keyed on the Flax names:
    * "frozen": the frozen batch norms' `scale`/`bias` (`backbone/stem/conv1/norm/*` and
      `backbone/res{s}_{i}/{conv<k>,shortcut}/norm/*`). Constants in the reference, so no update, no optimizer
      state and no part in the clipping norm.
    * every other parameter is "<where>/<kind>": `where` is "backbone" if its path contains "backbone" (lr and,
      through it, decoupled decay scaled by `backbone_multiplier`), else "head"; `kind` picks the weight decay:
        "norm"      `scale`/`bias` of a module named `norm` or `norm<k>` (LayerNorm, GroupNorm): weight_decay_norm
        "embed"     `embedding` (the query `nn.Embed`): weight_decay_embed
        "position"  `relative_position_bias_table`, `absolute_pos_embed` (Swin): 0
        "decay"     `kernel`, `bias`, `in_proj_kernel`, `in_proj_bias` (linear, conv, attention): weight_decay
  Any other parameter raises a ValueError naming it, so a new layer cannot silently land in the wrong group.
  Leaves may be arrays or `jax.ShapeDtypeStruct`s: only the paths are read.
  """

  def label(key_path, _):
    path = jax.tree_util.keystr(key_path, simple=True, separator="/")
    kind = _classify(path)
    if kind == FROZEN:
      return FROZEN
    module_path = path.rsplit("/", 1)[0] if "/" in path else ""
    return f"{'backbone' if 'backbone' in module_path else 'head'}/{kind}"

  return jax.tree_util.tree_map_with_path(label, params)


def group_hyperparameters(solver: ml_collections.ConfigDict, label: str) -> tuple[float, float]:
  """`(lr multiplier, weight decay)` of a trainable group label from `parameter_groups`."""
  where, kind = label.split("/")
  decays = {DECAY: solver.weight_decay, NORM: solver.weight_decay_norm, EMBED: solver.weight_decay_embed,
            POSITION: 0.0}
  return (float(solver.backbone_multiplier) if where == "backbone" else 1.0), float(decays[kind])


def clip_by_global_norm_torch(max_norm: float, include) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_` over the leaves where `include` (a bool pytree shaped like the updates) is
  True: every update is scaled by `min(max_norm / (norm + 1e-6), 1)`, `norm` the L2 norm of the included leaves
  together. Excluded leaves add nothing to the norm (they are scaled too, for the next transformation to drop).
  Stateless; `max_norm=inf` disables clipping."""

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.structure(include).flatten_up_to(updates)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g, keep in zip(leaves, jax.tree.leaves(include)) if keep))
    factor = jnp.minimum(max_norm / (norm + _CLIP_EPS), 1.0)
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(solver: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """MaskFormer's optimizer for a parameter tree with the structure of `params` (arrays or shape structs).

  1. Full-model clipping (detectron2 `CLIP_TYPE: full_model`): `torch.nn.utils.clip_grad_norm_` at
     `solver.clip_norm` over all trainable parameters together; frozen batch-norm gradients are left out of the
     norm, as in the reference where those tensors are buffers.
  2. AdamW per group with torch semantics: `b1, b2 = solver.betas`, `solver.eps` added to the bias-corrected
     sqrt(v), and decoupled decay `p <- p - lr_g * wd_g * p - lr_g * adam_update` where
     `lr_g = learning_rate_schedule(solver)(step) * multiplier_g` (see `parameter_groups` and
     `group_hyperparameters`).
  3. Frozen batch norm: zero updates and no optimizer state.
  Apply with `updates, state = tx.update(grads, state, params); params = optax.apply_updates(params, updates)`.
  """
  if not solver.clip_norm > 0:
    raise ValueError(f"solver.clip_norm must be positive (inf disables clipping); got {solver.clip_norm}")
  labels = parameter_groups(params)
  schedule = learning_rate_schedule(solver)
  b1, b2 = (float(b) for b in solver.betas)

  def adamw(label: str) -> optax.GradientTransformation:
    multiplier, weight_decay = group_hyperparameters(solver, label)
    return optax.adamw(lambda count: schedule(count) * multiplier, b1=b1, b2=b2, eps=float(solver.eps),
                       weight_decay=weight_decay)

  transforms = {label: optax.set_to_zero() if label == FROZEN else adamw(label)
                for label in sorted(set(jax.tree.leaves(labels)))}
  trainable = jax.tree.map(lambda label: label != FROZEN, labels)
  return optax.chain(clip_by_global_norm_torch(float(solver.clip_norm), trainable),
                     optax.multi_transform(transforms, labels))
