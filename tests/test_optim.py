"""The optimizer against independent references: detectron2's schedule formulas written out by hand, torch's AdamW
with param groups built like MaskFormer's `build_optimizer` and detectron2's full-model clipping, and the module
types of the real models (the reference picks groups with `isinstance`, this port with names)."""
import bisect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import ade20k_r50, ade20k_swin_tiny, coco_panoptic_r50
from maskformer_jax import optim
from maskformer_jax.models import build_model, init_variables
from maskformer_jax.models.layers import FrozenBatchNorm


def detectron2_lr(solver, step: int) -> float:
  """detectron2's `WarmupPolyLR` / `WarmupMultiStepLR` learning rate at iteration `step`, in float64."""
  warmup = 1.0
  if step < solver.warmup_steps:
    alpha = step / solver.warmup_steps
    warmup = solver.warmup_factor * (1 - alpha) + alpha
  if solver.lr_schedule == "poly":
    decay = (1 - step / solver.max_steps) ** solver.poly_power
  else:
    decay = solver.gamma ** bisect.bisect_right(solver.steps, step)
  return solver.base_lr * warmup * decay


@pytest.mark.parametrize("config, steps, known", [
    # ADE20K R50: poly, no warmup.
    (ade20k_r50, (0, 1, 1000, 80_000, 159_000, 159_999),
     {0: 1e-4, 80_000: 1e-4 * 0.5 ** 0.9, 159_999: 1e-4 * (1 / 160_000) ** 0.9}),
    # ADE20K Swin-T: poly after a linear warmup from 1e-6 over 1500 steps.
    (ade20k_swin_tiny, (0, 1, 750, 1499, 1500, 1501, 100_000),
     {0: 6e-5 * 1e-6, 750: 6e-5 * (0.5 * 1e-6 + 0.5) * (1 - 750 / 160_000) ** 0.9,
      1500: 6e-5 * (1 - 1500 / 160_000) ** 0.9}),
    # COCO panoptic R50: constant, x0.1 from step 369,600 on (the 10-step warmup has factor 1.0).
    (coco_panoptic_r50, (0, 5, 10, 369_599, 369_600, 554_399),
     {0: 1e-4, 5: 1e-4, 369_599: 1e-4, 369_600: 1e-5, 554_399: 1e-5}),
])
def test_schedule_follows_detectron2(config, steps, known):
  solver = config.get_config().solver
  schedule = optim.learning_rate_schedule(solver)
  jitted = jax.jit(schedule)
  for step in steps:
    expected = detectron2_lr(solver, step)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=2e-6, err_msg=f"step {step}")
    np.testing.assert_allclose(float(jitted(jnp.int32(step))), expected, rtol=2e-6, err_msg=f"jit, step {step}")
  for step, value in known.items():  # the formula above, evaluated by hand
    np.testing.assert_allclose(float(schedule(step)), value, rtol=2e-6, err_msg=f"step {step}")


def test_poly_schedule_is_zero_from_the_last_step_on():
  solver = ade20k_r50.get_config().solver
  schedule = optim.learning_rate_schedule(solver)
  assert float(schedule(solver.max_steps)) == 0.0
  assert float(schedule(solver.max_steps + 10)) == 0.0


def test_unknown_schedule_is_refused():
  solver = ade20k_r50.get_config().solver
  solver.lr_schedule = "cosine"
  with pytest.raises(ValueError, match="lr_schedule"):
    optim.learning_rate_schedule(solver)


# One parameter of every kind, named as the models name them, with the torch param group MaskFormer's
# `build_optimizer` gives its counterpart: (under the backbone, weight-decay field), or None for a frozen
# batch-norm tensor (a buffer in torch: no group, no gradient).
TINY_PARAMS = {
    "backbone/stem/conv1/kernel": ((3, 3, 2, 4), (True, "weight_decay")),
    "backbone/stem/conv1/norm/scale": ((4,), None),
    "backbone/stem/conv1/norm/bias": ((4,), None),
    "backbone/res2_0/shortcut/norm/bias": ((4,), None),
    "backbone/res2_0/shortcut/kernel": ((1, 1, 4, 4), (True, "weight_decay")),
    "backbone/patch_embed/proj/kernel": ((2, 2, 2, 4), (True, "weight_decay")),
    "backbone/patch_embed/proj/bias": ((4,), (True, "weight_decay")),
    "backbone/patch_embed/norm/scale": ((4,), (True, "weight_decay_norm")),
    "backbone/patch_embed/norm/bias": ((4,), (True, "weight_decay_norm")),
    "backbone/layers_0/blocks_0/attn/relative_position_bias_table": ((9, 2), (True, None)),
    "pixel_decoder/adapter_1/kernel": ((1, 1, 4, 4), (False, "weight_decay")),
    "pixel_decoder/adapter_1/norm/scale": ((4,), (False, "weight_decay_norm")),
    "pixel_decoder/adapter_1/norm/bias": ((4,), (False, "weight_decay_norm")),
    "predictor/query_embed/embedding": ((5, 4), (False, "weight_decay_embed")),
    "predictor/decoder/layers_0/self_attn/in_proj_bias": ((12,), (False, "weight_decay")),
    "predictor/class_embed/kernel": ((4, 3), (False, "weight_decay")),
    "predictor/class_embed/bias": ((3,), (False, "weight_decay")),
}
GRAD_NORMS = (0.4, 3.0, 0.2, 8.0, 0.9, 0.05)  # of the trainable gradients at each step
CLIP_NORM = 1.0


def unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    *modules, leaf = path.split("/")
    node = tree
    for name in modules:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten(tree) -> dict:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def parity_solver(lr_schedule: str):
  """ADE Swin-T's solver with every hyperparameter made large and distinct, so that each one moves the
  parameters by much more than the tolerance."""
  solver = ade20k_swin_tiny.get_config().solver
  solver.update(dict(base_lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3, weight_decay_norm=0.07,
                     weight_decay_embed=0.02, backbone_multiplier=0.2, clip_norm=CLIP_NORM, max_steps=8,
                     warmup_steps=2, warmup_factor=0.1, lr_schedule=lr_schedule))
  if lr_schedule == "step":
    solver.update(dict(steps=(3,), gamma=0.5))
  return solver


@pytest.mark.parametrize("lr_schedule", ["poly", "step"])
def test_matches_torch_adamw_with_maskformer_param_groups_and_clipping(lr_schedule):
  solver = parity_solver(lr_schedule)
  rng = np.random.default_rng(0)
  initial = {path: rng.standard_normal(shape).astype(np.float32) for path, (shape, _) in TINY_PARAMS.items()}
  trainable = [path for path, (_, group) in TINY_PARAMS.items() if group is not None]
  frozen = [path for path in TINY_PARAMS if path not in trainable]

  # torch: one group per parameter, as MaskFormer's build_optimizer; detectron2 clips all of them together before
  # each step and steps the scheduler after it.
  torch_params = {path: torch.nn.Parameter(torch.from_numpy(initial[path].copy())) for path in trainable}
  groups = []
  for path in trainable:
    in_backbone, decay_field = TINY_PARAMS[path][1]
    groups.append({"params": [torch_params[path]],
                   "lr": solver.base_lr * (solver.backbone_multiplier if in_backbone else 1.0),
                   "weight_decay": solver[decay_field] if decay_field else 0.0})
  torch_opt = torch.optim.AdamW(groups, lr=solver.base_lr, betas=solver.betas, eps=solver.eps,
                                weight_decay=solver.weight_decay)
  torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda step: detectron2_lr(solver, step) / solver.base_lr)

  params = unflatten({path: jnp.asarray(value) for path, value in initial.items()})
  tx = optim.make_optimizer(solver, params)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step_fn(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  clipped = []
  for step, grad_norm in enumerate(GRAD_NORMS):
    grads = {path: rng.standard_normal(shape).astype(np.float32) for path, (shape, _) in TINY_PARAMS.items()}
    norm = np.sqrt(sum(np.sum(grads[path] ** 2) for path in trainable))
    grads.update({path: grads[path] * np.float32(grad_norm / norm) for path in trainable})
    # Large frozen-BN gradients: counted in the norm, they would change every clipped step.
    grads.update({path: 100 * grads[path] for path in frozen})
    clipped.append(grad_norm > CLIP_NORM)

    for path in trainable:
      torch_params[path].grad = torch.from_numpy(grads[path].copy())
    torch.nn.utils.clip_grad_norm_(torch_params.values(), solver.clip_norm)
    torch_opt.step()
    torch_sched.step()
    params, state = step_fn(params, state, unflatten(grads))

    got = flatten(params)
    for path in trainable:
      np.testing.assert_allclose(got[path], torch_params[path].detach().numpy(), rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {step}: {path}")
    for path in frozen:
      np.testing.assert_array_equal(got[path], initial[path], err_msg=f"step {step}: {path}")
  assert any(clipped) and not all(clipped)

  # Adam moments exist for the trainable parameters only.
  state_paths = flatten(state)
  moment_sizes = sum(leaf.size for leaf in state_paths.values() if leaf.ndim > 0)  # all but the step counts
  assert moment_sizes == 2 * sum(initial[path].size for path in trainable)
  assert not [path for path in state_paths if any(path.endswith(f) for f in frozen)]


def test_an_unknown_parameter_is_refused():
  params = unflatten({"predictor/class_embed/kernel": jnp.zeros((2, 2)), "predictor/scaler/gain": jnp.zeros(2)})
  with pytest.raises(ValueError, match="predictor/scaler/gain"):
    optim.parameter_groups(params)


def test_a_non_positive_clip_norm_is_refused():
  solver = ade20k_r50.get_config().solver
  solver.clip_norm = 0.0
  with pytest.raises(ValueError, match="clip_norm"):
    optim.make_optimizer(solver, {"head": {"kernel": jnp.zeros((2, 2))}})


def module_types(model) -> tuple[dict, dict]:
  """Abstract variables of `model` and the class of each module by path ("a/b"), recorded while it initialises."""
  types = {}

  def record(next_fun, args, kwargs, context):
    types["/".join(context.module.path)] = type(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  return variables, types


def reference_group(path: str, types: dict) -> str:
  """MaskFormer's `build_optimizer` rules on module types: norms (here LayerNorm, GroupNorm; frozen BN has no
  parameters in torch), `nn.Embedding`, Swin's position tables by name; "backbone" in the module's name."""
  module, leaf = path.rsplit("/", 1)
  cls = types[module]
  if cls is FrozenBatchNorm:
    return optim.FROZEN
  if issubclass(cls, (nn.LayerNorm, nn.GroupNorm)):
    kind = optim.NORM
  elif issubclass(cls, nn.Embed):
    kind = optim.EMBED
  elif leaf in ("relative_position_bias_table", "absolute_pos_embed"):
    kind = optim.POSITION
  else:
    kind = optim.DECAY
  return f"{'backbone' if 'backbone' in module else 'head'}/{kind}"


@pytest.mark.parametrize("config", [ade20k_r50, ade20k_swin_tiny, coco_panoptic_r50])
def test_real_models_are_classified_like_the_reference(config):
  cfg = config.get_config()
  variables, types = module_types(build_model(cfg.model))
  labels = flatten(optim.parameter_groups(variables["params"]))
  expected = {path: reference_group(path, types) for path in flatten(variables["params"])}
  assert labels == expected
  # Frozen exactly where the frozen statistics are.
  frozen_modules = {path.rsplit("/", 1)[0] for path in flatten(variables.get("batch_stats", {}))}
  assert {path.rsplit("/", 1)[0] for path, label in labels.items() if label == optim.FROZEN} == frozen_modules
  assert bool(frozen_modules) == (cfg.model.backbone.name == "resnet")

  # The optimizer builds for the whole model and keeps two moments per trainable value.
  tx = optim.make_optimizer(cfg.solver, variables["params"])
  state = jax.eval_shape(tx.init, variables["params"])
  trainable = sum(leaf.size for path, leaf in flatten(variables["params"]).items() if labels[path] != optim.FROZEN)
  assert sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.ndim > 0) == 2 * trainable


def model_labels(cfg) -> dict:
  """The group label of every parameter of the model `cfg.model`, by path."""
  variables = jax.eval_shape(lambda: init_variables(build_model(cfg.model), jax.random.key(0)))
  return flatten(optim.parameter_groups(variables["params"]))


def test_spot_checks_on_real_models():
  r50 = ade20k_r50.get_config()
  labels = model_labels(r50)
  hyper = {path: optim.group_hyperparameters(r50.solver, label) for path, label in labels.items()
           if label != optim.FROZEN}  # (lr multiplier, weight decay)
  assert hyper["backbone/res3_1/conv2/kernel"] == pytest.approx((0.1, 1e-4))
  assert labels["backbone/res2_0/conv1/norm/scale"] == labels["backbone/stem/conv1/norm/bias"] == optim.FROZEN
  assert hyper["predictor/query_embed/embedding"] == (1.0, 0.0)
  assert hyper["predictor/class_embed/bias"] == pytest.approx((1.0, 1e-4))
  assert hyper["predictor/decoder/layers_0/self_attn/in_proj_bias"] == pytest.approx((1.0, 1e-4))
  assert hyper["pixel_decoder/adapter_1/norm/scale"] == (1.0, 0.0)
  assert hyper["predictor/decoder/norm/bias"] == (1.0, 0.0)

  swin = ade20k_swin_tiny.get_config()
  hyper = {path: optim.group_hyperparameters(swin.solver, label) for path, label in model_labels(swin).items()}
  assert hyper["backbone/layers_2/blocks_3/attn/relative_position_bias_table"] == (1.0, 0.0)
  assert hyper["backbone/layers_0/blocks_1/attn/qkv/bias"] == pytest.approx((1.0, 0.01))
  assert hyper["backbone/patch_embed/proj/kernel"] == pytest.approx((1.0, 0.01))
  assert hyper["backbone/norm3/scale"] == (1.0, 0.0)
  assert hyper["backbone/layers_1/downsample/norm/bias"] == (1.0, 0.0)
