"""The Flax model against transformers' PyTorch MaskFormer (random weights, built offline), and its contract."""
import importlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from configs import ade20k_r50, ade20k_swin_tiny, coco_panoptic_r50
from hf_reference import hf_outputs, make_hf_model
from maskformer_jax.convert import load_hf_checkpoint
from maskformer_jax.models import abstract_variables, build_model, compiler_options, init_variables, normalize_images
from maskformer_jax.models import layers
from maskformer_jax.models.layers import sine_position_encoding

TOLERANCE = 1e-4  # absolute, on logits of magnitude ~10
SHAPES = [(1, 64, 64), (2, 160, 96)]  # one square, one not (Swin windows partly padded at every stage)


def _forward(model_config, variables, images):
  model = build_model(model_config)
  return jax.device_get(jax.jit(lambda v, x: model.apply(v, x))(variables, images))


def assert_outputs_close(ours: dict, theirs: dict, num_aux: int = 5):
  for key in ("pred_logits", "pred_masks"):
    np.testing.assert_allclose(ours[key], theirs[key], atol=TOLERANCE, rtol=0, err_msg=key)
  assert len(ours["aux_outputs"]) == len(theirs["aux_outputs"]) == num_aux
  for i, (a, b) in enumerate(zip(ours["aux_outputs"], theirs["aux_outputs"])):
    for key in ("pred_logits", "pred_masks"):
      np.testing.assert_allclose(a[key], b[key], atol=TOLERANCE, rtol=0, err_msg=f"aux {i} {key}")


@pytest.mark.parametrize("batch,height,width", SHAPES)
def test_outputs_equal_transformers(hf_checkpoint, batch, height, width):
  _, hf_model, path = hf_checkpoint
  model_config, variables = load_hf_checkpoint(path)
  images = np.random.default_rng(height).standard_normal((batch, height, width, 3)).astype(np.float32)
  ours = _forward(model_config, variables, images)
  assert ours["pred_logits"].shape == (batch, 100, 151)
  assert ours["pred_masks"].shape == (batch, 100, height // 4, width // 4)
  # The reference outputs differ across queries and pixels: the comparison is not between near-constants.
  assert ours["pred_masks"].std() > 1.0
  theirs = hf_outputs(hf_model, images)
  assert_outputs_close(ours, theirs)
  # Inference path: no auxiliary outputs, the mask projection folded into a per-query conv.
  model = build_model(model_config)
  final = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, aux_outputs=False))(variables, images))
  assert_outputs_close(final, {**theirs, "aux_outputs": []}, num_aux=0)


def test_v5_names_and_pytorch_bin_give_the_same_variables(hf_checkpoint, tmp_path):
  """transformers v5 renames out_proj -> o_proj and fc1 -> mlp.fc1 in memory; the Hub keeps v4 names. Both load,
  from safetensors and from a weights-only pytorch_model.bin."""
  _, hf_model, path = hf_checkpoint
  _, reference = load_hf_checkpoint(path)
  state_dict = hf_model.state_dict()
  assert any(".o_proj." in k for k in state_dict) and any(".mlp.fc1." in k for k in state_dict)
  v5_dir, bin_dir = tmp_path / "v5", tmp_path / "bin"
  for d in (v5_dir, bin_dir):
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
  save_file({k: v.contiguous().numpy() for k, v in state_dict.items()}, str(v5_dir / "model.safetensors"))
  torch.save(state_dict, bin_dir / "pytorch_model.bin")
  for directory in (v5_dir, bin_dir):
    _, variables = load_hf_checkpoint(directory)
    jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_parameter_counts_equal_transformers():
  """ADE20K-150 R50: 41,307,863 as in transformers. Swin-T: transformers counts 41,758,545, which includes the final
  LayerNorm of its Swin model (768 x 2) that MaskFormer never applies and the original D2SwinTransformer lacks."""
  counts = {}
  for name, module in (("r50", ade20k_r50), ("swin_t", ade20k_swin_tiny)):
    params = abstract_variables(module.get_config().model)["params"]
    counts[name] = sum(x.size for x in jax.tree.leaves(params))
  assert counts["r50"] == 41_307_863
  assert counts["swin_t"] == 41_758_545 - 2 * 768
  hf_swin = make_hf_model("swin_tiny")
  unused = hf_swin.model.pixel_level_module.encoder.model.layernorm
  hf_used = sum(p.numel() for p in hf_swin.parameters()) - sum(p.numel() for p in unused.parameters())
  assert counts["swin_t"] == hf_used


def test_ade20k_r50_runs_512_under_jit():
  config = ade20k_r50.get_config().model
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0))
  images = jnp.asarray(normalize_images(np.full((1, 512, 512, 3), 128, np.uint8)))
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  assert out["pred_logits"].shape == (1, 100, 151)
  assert out["pred_masks"].shape == (1, 100, 128, 128)
  assert len(out["aux_outputs"]) == 5
  assert all(a["pred_masks"].shape == (1, 100, 128, 128) for a in out["aux_outputs"])
  assert np.isfinite(np.asarray(out["pred_masks"])).all()


def test_train_mode_uses_dropout_rng():
  config = ade20k_swin_tiny.get_config().model
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)), jnp.float32)
  apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key})["pred_logits"])
  eval_out = jax.jit(lambda v, x: model.apply(v, x)["pred_logits"])(variables, images)
  a, b = apply(variables, images, jax.random.key(1)), apply(variables, images, jax.random.key(2))
  np.testing.assert_array_equal(a, apply(variables, images, jax.random.key(1)))  # same key, same result
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, images, train=True)  # no RNG given


@pytest.mark.parametrize("images,message", [
    (np.zeros((1, 64, 60, 3), np.float32), "multiples of 32"),
    (np.zeros((1, 3, 64, 64), np.float32), r"\[B, H, W, 3\]"),
    (np.zeros((64, 64, 3), np.float32), r"\[B, H, W, 3\]"),
    (np.zeros((1, 64, 64, 3), np.uint8), "float"),
])
def test_bad_images_are_refused_clearly(images, message):
  config = ade20k_r50.get_config().model
  model = build_model(config)
  variables = abstract_variables(config)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda v: model.apply(v, images), variables)


@pytest.mark.parametrize("path,value,message", [
    ("backbone.name", "vit", "model.backbone.name"),
    ("backbone.window_size", 7, "unknown field"),
    ("backbone.depth", 34, "50 or 101"),
    ("pixel_decoder.name", "msdeform", "model.pixel_decoder.name"),
    ("transformer.in_feature", "transformer_encoder", "needs model.pixel_decoder.name"),
    ("transformer.in_feature", "res4", "in_feature"),
])
def test_bad_model_configs_are_refused_clearly(path, value, message):
  config = ade20k_r50.get_config().model
  config.unlock()
  parent = config
  *parents, leaf = path.split(".")
  for p in parents:
    parent = parent[p]
  parent[leaf] = value
  with pytest.raises(ValueError, match=message):
    build_model(config)


def test_transformer_encoder_pixel_decoder_equals_torch_encoder():
  """The "+6 Enc" pixel decoder (COCO R50/R101) has no transformers counterpart: compare its encoder path with
  torch's own post-norm `nn.TransformerEncoderLayer` (ReLU, no final norm) fed the same weights."""
  config = coco_panoptic_r50.get_config().model
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0))
  pd_params = variables["params"]["pixel_decoder"]
  rng = np.random.default_rng(0)
  features = {f"res{i}": jnp.asarray(rng.standard_normal((1, 64 // 2 ** (i - 2), 96 // 2 ** (i - 2), c)),
                                     jnp.float32)
              for i, c in zip(range(2, 6), (256, 512, 1024, 2048))}
  _, memory = jax.jit(lambda v, f: model.pixel_decoder.apply(v, f))({"params": pd_params}, features)

  # Reference: 1x1 input projection, flatten, sine positions added to q and k in every layer.
  res5 = torch.from_numpy(np.array(features["res5"]))
  kernel = torch.from_numpy(np.array(pd_params["input_proj"]["kernel"]))[0, 0]  # [C_in, C_out]
  src = res5.reshape(1, -1, 2048) @ kernel + torch.from_numpy(np.array(pd_params["input_proj"]["bias"]))
  pos = torch.from_numpy(sine_position_encoding(8, 12, 128).reshape(1, 96, 256))  # res5 is 8x12
  for i in range(6):
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), pd_params["encoder"][f"layers_{i}"])
    layer = torch.nn.TransformerEncoderLayer(256, 8, 2048, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
      layer.self_attn.in_proj_weight.copy_(p["self_attn"]["in_proj_kernel"].T)
      layer.self_attn.in_proj_bias.copy_(p["self_attn"]["in_proj_bias"])
      layer.self_attn.out_proj.weight.copy_(p["self_attn"]["out_proj"]["kernel"].T)
      layer.self_attn.out_proj.bias.copy_(p["self_attn"]["out_proj"]["bias"])
      for ours, theirs in (("linear1", layer.linear1), ("linear2", layer.linear2)):
        theirs.weight.copy_(p[ours]["kernel"].T)
        theirs.bias.copy_(p[ours]["bias"])
      for ours, theirs in (("norm1", layer.norm1), ("norm2", layer.norm2)):
        theirs.weight.copy_(p[ours]["scale"])
        theirs.bias.copy_(p[ours]["bias"])
      # torch's layer adds no positions; the DETR layer adds them to q and k only, so run attention by hand.
      attn, _ = layer.self_attn(src + pos, src + pos, src, need_weights=False)
      src = layer.norm1(src + attn)
      src = layer.norm2(src + layer.linear2(torch.relu(layer.linear1(src))))
  np.testing.assert_allclose(np.asarray(memory).reshape(1, 96, 256), src.numpy(), atol=TOLERANCE)


# Parameter counts in millions from the paper (Table 1 for ADE20K, Table 3 for COCO panoptic; Cityscapes uses R101).
PAPER_PARAMS_M = {
    "ade20k_r50": 41, "ade20k_r101": 60, "ade20k_swin_tiny": 42, "ade20k_swin_small": 63, "ade20k_swin_base": 102,
    "ade20k_swin_large": 212, "coco_panoptic_r50": 45, "coco_panoptic_r101": 64, "coco_panoptic_swin_tiny": 42,
    "coco_panoptic_swin_small": 63, "coco_panoptic_swin_base": 102, "coco_panoptic_swin_large": 212,
    "cityscapes_r101": 60,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_every_paper_config_builds_with_the_papers_parameter_count(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  params = abstract_variables(config.model)["params"]
  assert round(sum(x.size for x in jax.tree.leaves(params)) / 1e6) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_and_gradients_equal_torch(stride):
  """1x1 convolutions run as matmuls with their own kernel gradient; value and both gradients equal torch's."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12, 10, 24)).astype(np.float32)
  kernel = (rng.standard_normal((1, 1, 24, 40)) * 0.2).astype(np.float32)
  probe = rng.standard_normal((2, 12 // stride, 10 // stride, 40)).astype(np.float32)
  value, grads = jax.jit(jax.value_and_grad(lambda x, k: jnp.vdot(layers.conv2d(x, k, stride), probe), (0, 1)))(
      x, kernel)
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  tk = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
  expected = (torch.nn.functional.conv2d(tx, tk, stride=stride) * torch.from_numpy(probe.transpose(0, 3, 1, 2))).sum()
  expected.backward()
  np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
  np.testing.assert_allclose(grads[0], tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[1], tk.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-4)


def test_dense_and_gradients_equal_torch():
  """`layers.Dense` (Swin's and the decoder's linear layers, through `matmul`'s own gradient) has flax's
  parameters, and its value and gradients equal torch's `linear`."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 7, 24)).astype(np.float32)
  probe = rng.standard_normal((3, 7, 40)).astype(np.float32)
  dense = layers.Dense(40)
  params = dense.init(jax.random.key(0), x)["params"]
  params = dict(params, bias=rng.standard_normal(40).astype(np.float32))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nn.Dense(40).init(jax.random.key(0), x)["params"])
  value, grads = jax.jit(jax.value_and_grad(lambda p, x: jnp.vdot(dense.apply({"params": p}, x), probe), (0, 1)))(
      params, x)
  tx = torch.tensor(x, requires_grad=True)
  tw = torch.tensor(np.asarray(params["kernel"]).T.copy(), requires_grad=True)
  tb = torch.tensor(np.asarray(params["bias"]), requires_grad=True)
  expected = (torch.nn.functional.linear(tx, tw, tb) * torch.from_numpy(probe)).sum()
  expected.backward()
  np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
  np.testing.assert_allclose(grads[1], tx.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[0]["kernel"], tw.grad.numpy().T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[0]["bias"], tb.grad.numpy(), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="default contraction"):
    layers.Dense(40, precision=jax.lax.Precision.HIGHEST).init(jax.random.key(0), x)


def test_compiler_options_keep_convolutions_out_of_ynnpack():
  """`compiler_options()` moves CPU convolutions from YNNPACK (XLA's default) to XLA's own kernels."""
  x, kernel = jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 32))

  def convolutions_in_ynnpack(options) -> int:
    text = jax.jit(layers.conv2d, compiler_options=options).lower(x, kernel).compile().as_text()
    called = re.findall(r"calls=%([\w.-]+).*__ynn_fusion", text)  # computations that YNNPACK runs
    bodies = {m[0]: m[1] for m in re.findall(r"\n%([\w.-]+) \(.*?\{\n(.*?)\n\}", text, re.S)}
    return sum(bodies[name].count(" convolution(") for name in called)

  assert convolutions_in_ynnpack(None) == 1  # the default this option exists for
  assert convolutions_in_ynnpack(compiler_options()) == 0


@pytest.mark.parametrize("size", [(11, 19), (11, 7), (5, 19), (5, 7), (3, 4)], ids=["both", "rows", "cols", "none",
                                                                                 "down"])
def test_resize_bilinear_equals_torch(size):
  """Resized axes follow PyTorch's bilinear interpolation (align_corners=False); an unresized axis is unchanged."""
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                             align_corners=False).numpy()
  np.testing.assert_allclose(layers.resize_bilinear(jnp.asarray(x), size), expected, atol=2e-6)


@pytest.mark.parametrize("shape, size", [((5, 7), (20, 28)), ((1, 3), (4, 12)), ((2, 7), (6, 7)), ((5, 7), (11, 19))],
                         ids=["x4", "one-row", "x3-rows-only", "fractional"])
def test_resize_bilinear_value_and_gradient_equal_torch(shape, size):
  """Whole-factor row upsampling (blended rows, written-out transpose) and the matrix path both match PyTorch's
  bilinear interpolation and its gradient, edge rows included."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, *shape)).astype(np.float32)
  cotangent = rng.standard_normal((2, 3, *size)).astype(np.float32)
  value, vjp = jax.vjp(lambda x: layers.resize_bilinear(x, size), jnp.asarray(x))
  tx = torch.tensor(x, requires_grad=True)
  expected = torch.nn.functional.interpolate(tx, size=size, mode="bilinear", align_corners=False)
  expected.backward(torch.from_numpy(cotangent))
  np.testing.assert_allclose(value, expected.detach().numpy(), atol=2e-6)
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], tx.grad.numpy(), atol=1e-5)
