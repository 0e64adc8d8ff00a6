"""Official Detectron2 / MaskFormer weights (reference section 7.1) -> Flax variables.

Our parameter tree mirrors the Detectron2 key names, so the mapping is mechanical: `res2_0` <-> `res2.0`,
`kernel` <-> `weight` (transposed), `scale` <-> norm `weight`, `mean`/`var` <-> `running_mean`/`running_var`,
`predictor/decoder` <-> `predictor.transformer.decoder`. Both checkpoint spellings are accepted: the released
`.pkl` files (`sem_seg_head.layer_4.*`) and the in-memory one (`sem_seg_head.pixel_decoder.layer_4.*`).
"""
import re
from typing import Mapping, Optional

import ml_collections
import numpy as np
from flax import traverse_util

from maskformer_jax.convert.safe_pickle import load_detectron2_pickle
from maskformer_jax.models import abstract_variables
from maskformer_jax.models import config as model_configs

# Buffers that are derived, not learned: recomputed by our code, so never copied.
_DERIVED_SUFFIXES = ("relative_position_index", "num_batches_tracked", "pixel_mean", "pixel_std")
# Not part of the network: the loss's class-weight buffer (SetCriterion registers it as a persistent buffer).
_LOSS_PREFIX = "criterion."
_INDEXED_MODULES = re.compile(r"^(res\d|layers|blocks)_(\d+)$")
_LEAF_TO_D2 = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean",
               "var": "running_var", "in_proj_kernel": "in_proj_weight"}
_MODULE_TO_D2 = {"pixel_decoder": "sem_seg_head.pixel_decoder", "predictor": "sem_seg_head.predictor",
                 "decoder": "transformer.decoder", "encoder": "transformer.encoder"}


def d2_key(path: tuple[str, ...]) -> str:
  """The Detectron2 key of a Flax variable path, e.g. `('backbone', 'res2_0', 'conv1', 'kernel')` ->
  `backbone.res2.0.conv1.weight`."""
  *modules, leaf = path
  parts = []
  for m in modules:
    match = _INDEXED_MODULES.match(m)
    parts.append(f"{match[1]}.{match[2]}" if match else _MODULE_TO_D2.get(m, m))
  return ".".join(parts + [_LEAF_TO_D2.get(leaf, leaf)])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf in ("kernel", "in_proj_kernel"):
    # Conv OIHW -> HWIO; linear [out, in] -> [in, out].
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def normalize_d2_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Brings the released `.pkl` layout to the in-memory one: `sem_seg_head.X` -> `sem_seg_head.pixel_decoder.X`
  for every head key outside the predictor (what MaskFormerHead._load_from_state_dict does), drops derived buffers
  and the loss's `criterion.empty_weight`.
  """
  out = {}
  for key, value in state_dict.items():
    if key.endswith(_DERIVED_SUFFIXES) or key.startswith(_LOSS_PREFIX):
      continue
    if key.startswith("sem_seg_head.") and not key.startswith(("sem_seg_head.predictor.",
                                                               "sem_seg_head.pixel_decoder.")):
      key = "sem_seg_head.pixel_decoder." + key[len("sem_seg_head."):]
    out[key] = np.asarray(value)
  return out


def _count(state_dict, pattern: str) -> int:
  return len({m[1] for k in state_dict if (m := re.match(pattern, k))})


def infer_model_config(state_dict: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
  """Reads the architecture off a (normalised) Detectron2 state dict: backbone type and size, number of classes and
  queries, pixel decoder variant. Training-only settings (dropout, drop path) take the paper's defaults."""
  sd = state_dict
  if "backbone.stem.conv1.weight" in sd:
    num_res4 = _count(sd, r"backbone\.res4\.(\d+)\.")
    depths = {6: 50, 23: 101}
    if "backbone.stem.conv2.weight" in sd or num_res4 not in depths:
      raise ValueError("Unsupported ResNet variant in checkpoint (only ResNet-50/101 with the basic stem; the "
                       "R101c 'deeplab' stem is not implemented).")
    backbone = model_configs.resnet_backbone(depths[num_res4])
  elif "backbone.patch_embed.proj.weight" in sd:
    embed_dim, _, patch, _ = sd["backbone.patch_embed.proj.weight"].shape
    num_stages = _count(sd, r"backbone\.layers\.(\d+)\.")
    depths = tuple(_count(sd, rf"backbone\.layers\.{s}\.blocks\.(\d+)\.") for s in range(num_stages))
    heads = tuple(sd[f"backbone.layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1]
                  for s in range(num_stages))
    table_size = sd["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (int(round(np.sqrt(table_size))) + 1) // 2
    mlp_ratio = sd["backbone.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    backbone = ml_collections.ConfigDict(dict(
        name="swin", embed_dim=int(embed_dim), depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=float(mlp_ratio), drop_path_rate=0.3, patch_size=int(patch), pretrain_img_size=224 if window == 7
        else 384))
  else:
    raise ValueError("Checkpoint has neither 'backbone.stem.conv1.weight' (ResNet) nor "
                     "'backbone.patch_embed.proj.weight' (Swin): not a MaskFormer checkpoint?")

  conv_dim = sd["sem_seg_head.pixel_decoder.layer_4.weight"].shape[0]
  mask_dim = sd["sem_seg_head.pixel_decoder.mask_features.weight"].shape[0]
  num_encoder_layers = _count(sd, r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.")
  if num_encoder_layers:
    pixel_decoder = model_configs.transformer_encoder_pixel_decoder(conv_dim, mask_dim)
    pixel_decoder.num_layers = num_encoder_layers
    in_feature = "transformer_encoder"
  else:
    pixel_decoder = model_configs.fpn_pixel_decoder(conv_dim, mask_dim)
    in_feature = "res5"
  num_queries, hidden_dim = sd["sem_seg_head.predictor.query_embed.weight"].shape
  decoder_prefix = r"sem_seg_head\.predictor\.transformer\.decoder\.layers"
  return model_configs.model_config(
      num_classes=int(sd["sem_seg_head.predictor.class_embed.weight"].shape[0] - 1), backbone=backbone,
      pixel_decoder=pixel_decoder, in_feature=in_feature, num_queries=int(num_queries),
      hidden_dim=int(hidden_dim), num_layers=_count(sd, decoder_prefix + r"\.(\d+)\."),
      dim_feedforward=int(sd["sem_seg_head.predictor.transformer.decoder.layers.0.linear1.weight"].shape[0]))


def d2_to_variables(state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict) -> dict:
  """Maps a Detectron2 state dict (either spelling) onto the variables of `build_model(model_config)`.

  Every model variable must be found with the right shape and every checkpoint entry must be used (derived
  buffers aside); otherwise a ValueError lists what is missing, mismatched or left over.
  """
  state_dict = normalize_d2_keys(state_dict)
  target = traverse_util.flatten_dict(abstract_variables(model_config))
  flat, missing, mismatched, seen = {}, [], [], set()
  for (collection, *path), spec in target.items():
    key = d2_key(tuple(path))
    if key not in state_dict:
      missing.append(key)
      continue
    seen.add(key)
    value = _to_flax(path[-1], state_dict[key])
    if value.shape != spec.shape:
      mismatched.append(f"{key}: checkpoint {state_dict[key].shape}, model expects {spec.shape} (as {value.shape})")
      continue
    flat[(collection, *path)] = value.astype(spec.dtype)
  unexpected = sorted(set(state_dict) - seen)
  if missing or mismatched or unexpected:
    def show(items):
      return "; ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
    problems = [f"missing {show(missing)}" if missing else "",
                f"shape mismatch {show(mismatched)}" if mismatched else "",
                f"unexpected {show(unexpected)}" if unexpected else ""]
    raise ValueError("Checkpoint does not match the model config: " + " | ".join(p for p in problems if p) +
                     ". Check that the config (backbone, num_classes, num_queries, pixel decoder) is the one the "
                     "checkpoint was trained with, or leave model_config=None to infer it.")
  return traverse_util.unflatten_dict(flat)


def load_detectron2_checkpoint(path, model_config: Optional[ml_collections.ConfigDict] = None
                               ) -> tuple[ml_collections.ConfigDict, dict]:
  """Loads an official MaskFormer `.pkl` (restricted unpickler: numpy arrays and plain containers only).

  Returns `(model_config, variables)`; the config is inferred from the weights when not given.
  """
  state_dict = normalize_d2_keys(load_detectron2_pickle(path))
  if model_config is None:
    model_config = infer_model_config(state_dict)
  return model_config, d2_to_variables(state_dict, model_config)
