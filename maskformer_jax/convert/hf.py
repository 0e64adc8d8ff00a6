"""transformers `MaskFormerForInstanceSegmentation` checkpoints (`save_pretrained` directories) -> Flax variables.

HF keys are renamed to the Detectron2 ones (reference section 7.2, inverted) and go through the Detectron2 mapping,
so there is one mapping onto our modules. Both the v4 names on the Hub (`out_proj`, `fc1`) and the v5 in-memory
ones (`o_proj`, `mlp.fc1`) are accepted. Nothing in the files is executed: safetensors are plain data and
`pytorch_model.bin` is read by a restricted unpickler.
"""
import json
import os
import re
from typing import Mapping

import ml_collections
import numpy as np

from maskformer_jax.convert.detectron2 import d2_to_variables
from maskformer_jax.convert.safe_pickle import load_torch_state_dict
from maskformer_jax.models import config as model_configs

_ENCODER = "model.pixel_level_module.encoder."
_FPN = "model.pixel_level_module.decoder."
_DECODER = "model.transformer_module.decoder."
_PD = "sem_seg_head.pixel_decoder."
_PRED = "sem_seg_head.predictor."

# (HF regex, Detectron2 replacement); the first match wins. `{L}` marks the FPN level, mapped below.
_RENAMES = [
    # ResNet
    (_ENCODER + r"embedder\.embedder\.convolution\.", "backbone.stem.conv1."),
    (_ENCODER + r"embedder\.embedder\.normalization\.", "backbone.stem.conv1.norm."),
    (_ENCODER + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", r"backbone.res{S\1}.\2.conv{C\3}."),
    (_ENCODER + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     r"backbone.res{S\1}.\2.conv{C\3}.norm."),
    (_ENCODER + r"encoder\.stages\.(\d+)\.layers\.0\.shortcut\.convolution\.", r"backbone.res{S\1}.0.shortcut."),
    (_ENCODER + r"encoder\.stages\.(\d+)\.layers\.0\.shortcut\.normalization\.", r"backbone.res{S\1}.0.shortcut.norm."),
    # Swin
    (_ENCODER + r"model\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (_ENCODER + r"model\.embeddings\.norm\.", "backbone.patch_embed.norm."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"backbone.layers.\1.blocks.\2.norm1."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"backbone.layers.\1.blocks.\2.norm2."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.",
     r"backbone.layers.\1.blocks.\2.attn.qkv.\3."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.",
     r"backbone.layers.\1.blocks.\2.attn."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.",
     r"backbone.layers.\1.blocks.\2.attn.proj."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.",
     r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (_ENCODER + r"model\.encoder\.layers\.(\d+)\.downsample\.", r"backbone.layers.\1.downsample."),
    (_ENCODER + r"hidden_states_norms\.(\d+)\.", r"backbone.norm\1."),
    # FPN pixel decoder: fpn.layers.j is level 3 - j.
    (_FPN + r"fpn\.stem\.0\.", _PD + "layer_4."),
    (_FPN + r"fpn\.stem\.1\.", _PD + "layer_4.norm."),
    (_FPN + r"fpn\.layers\.(\d+)\.proj\.0\.", _PD + r"adapter_{L\1}."),
    (_FPN + r"fpn\.layers\.(\d+)\.proj\.1\.", _PD + r"adapter_{L\1}.norm."),
    (_FPN + r"fpn\.layers\.(\d+)\.block\.0\.", _PD + r"layer_{L\1}."),
    (_FPN + r"fpn\.layers\.(\d+)\.block\.1\.", _PD + r"layer_{L\1}.norm."),
    (_FPN + r"mask_projection\.", _PD + "mask_features."),
    # Transformer decoder (v4 and v5 names).
    (_DECODER + r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", _PRED + r"transformer.decoder.layers.\1.self_attn.in_proj.\2."),
    (_DECODER + r"layers\.(\d+)\.encoder_attn\.(q|k|v)_proj\.",
     _PRED + r"transformer.decoder.layers.\1.multihead_attn.in_proj.\2."),
    (_DECODER + r"layers\.(\d+)\.self_attn\.(?:o|out)_proj\.", _PRED + r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (_DECODER + r"layers\.(\d+)\.encoder_attn\.(?:o|out)_proj\.",
     _PRED + r"transformer.decoder.layers.\1.multihead_attn.out_proj."),
    (_DECODER + r"layers\.(\d+)\.(?:mlp\.)?fc1\.", _PRED + r"transformer.decoder.layers.\1.linear1."),
    (_DECODER + r"layers\.(\d+)\.(?:mlp\.)?fc2\.", _PRED + r"transformer.decoder.layers.\1.linear2."),
    (_DECODER + r"layers\.(\d+)\.self_attn_layer_norm\.", _PRED + r"transformer.decoder.layers.\1.norm1."),
    (_DECODER + r"layers\.(\d+)\.encoder_attn_layer_norm\.", _PRED + r"transformer.decoder.layers.\1.norm2."),
    (_DECODER + r"layers\.(\d+)\.final_layer_norm\.", _PRED + r"transformer.decoder.layers.\1.norm3."),
    (_DECODER + r"layernorm\.", _PRED + "transformer.decoder.norm."),
    (r"model\.transformer_module\.queries_embedder\.", _PRED + "query_embed."),
    (r"model\.transformer_module\.input_projection\.", _PRED + "input_proj."),
    (r"class_predictor\.", _PRED + "class_embed."),
    (r"mask_embedder\.(\d+)\.0\.", _PRED + r"mask_embed.layers.\1."),
]
_RENAMES = [(re.compile("^" + pattern), replacement) for pattern, replacement in _RENAMES]

# Present in HF files but not part of the network: the loss's class-weight buffer, and the final LayerNorm of
# transformers' Swin model, which MaskFormer never applies (the original D2SwinTransformer has no such layer).
_UNUSED = ("criterion.empty_weight", _ENCODER + "model.layernorm.")
# Pieces that HF stores split and the reference fused: Swin qkv and the DETR attention in_proj ([q; k; v] rows).
_FUSED = {"qkv": ("query", "key", "value"), "in_proj": ("q", "k", "v")}


def _fill_indices(key: str) -> str:
  key = re.sub(r"\{S(\d+)\}", lambda m: str(int(m[1]) + 2), key)  # HF stage s is res{s+2}
  key = re.sub(r"\{C(\d+)\}", lambda m: str(int(m[1]) + 1), key)  # HF layer k is conv{k+1}
  return re.sub(r"\{L(\d+)\}", lambda m: str(3 - int(m[1])), key)


def hf_to_d2(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames HF keys to Detectron2 keys and fuses split q/k/v projections; unknown keys are an error."""
  renamed, unknown = {}, []
  for key, value in state_dict.items():
    if key.startswith(_UNUSED):
      continue
    for pattern, replacement in _RENAMES:
      if pattern.match(key):
        renamed[_fill_indices(pattern.sub(replacement, key))] = np.asarray(value)
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"Unrecognised keys in the transformers checkpoint (is it MaskFormerForInstanceSegmentation?): "
                     f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
  out = {}
  for key, value in renamed.items():
    match = re.match(r"^(.*)\.(qkv|in_proj)\.(\w+)\.(weight|bias)$", key)
    if not match:
      out[key] = value
      continue
    prefix, fused, part, kind = match.groups()
    if part != _FUSED[fused][0]:
      continue  # gathered with the first part
    name = f"{prefix}.qkv.{kind}" if fused == "qkv" else f"{prefix}.in_proj_{kind}"
    out[name] = np.concatenate([renamed[f"{prefix}.{fused}.{p}.{kind}"] for p in _FUSED[fused]], axis=0)
  return out


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(f"Unsupported transformers MaskFormer config: {message}")


def model_config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Translates a transformers `MaskFormerConfig` (as a config.json dict) into our `config.model`."""
  backbone = hf_config.get("backbone_config") or {}
  kind = backbone.get("model_type")
  if kind == "resnet":
    depths = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}
    _require(tuple(backbone.get("depths", ())) in depths, f"ResNet depths {backbone.get('depths')}")
    _require(backbone.get("layer_type", "bottleneck") == "bottleneck" and backbone.get("embedding_size", 64) == 64
             and not backbone.get("downsample_in_bottleneck", False)
             and not backbone.get("downsample_in_first_stage", False), "only torchvision-style ResNet-50/101")
    backbone_config = model_configs.resnet_backbone(depths[tuple(backbone["depths"])])
  elif kind in ("swin", "maskformer-swin"):
    _require(backbone.get("qkv_bias", True) and not backbone.get("use_absolute_embeddings", False)
             and backbone.get("hidden_act", "gelu") == "gelu", "Swin needs qkv_bias, gelu, no absolute embeddings")
    backbone_config = ml_collections.ConfigDict(dict(
        name="swin", embed_dim=backbone["embed_dim"], depths=tuple(backbone["depths"]),
        num_heads=tuple(backbone["num_heads"]), window_size=backbone["window_size"],
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), drop_path_rate=float(backbone.get("drop_path_rate", 0.3)),
        patch_size=backbone.get("patch_size", 4), pretrain_img_size=backbone.get("image_size", 224)))
  else:
    raise ValueError(f"Unsupported transformers MaskFormer backbone model_type {kind!r} (resnet or swin only).")
  decoder = hf_config.get("decoder_config") or {}
  num_classes = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
  _require(bool(num_classes), "config.json has no id2label / num_labels")
  _require(decoder.get("activation_function", "relu") == "relu", "decoder activation must be relu")
  return model_configs.model_config(
      num_classes=int(num_classes), backbone=backbone_config,
      pixel_decoder=model_configs.fpn_pixel_decoder(hf_config.get("fpn_feature_size", 256),
                                                    hf_config.get("mask_feature_size", 256)),
      num_queries=decoder.get("num_queries", 100), hidden_dim=decoder.get("d_model", 256),
      num_heads=decoder.get("decoder_attention_heads", 8), dim_feedforward=decoder.get("decoder_ffn_dim", 2048),
      dropout=float(decoder.get("dropout", 0.1)), num_layers=decoder.get("decoder_layers", 6))


def _read_weights(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return load_file(single)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(binary):
    return load_torch_state_dict(binary)
  raise FileNotFoundError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                          "pass the directory written by transformers' save_pretrained.")


def load_hf_checkpoint(path) -> tuple[ml_collections.ConfigDict, dict]:
  """Loads a `save_pretrained` directory of `MaskFormerForInstanceSegmentation` (ResNet or Swin backbone).

  Returns `(model_config, variables)` ready for `build_model(model_config).apply(variables, images)`.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"No config.json in {path}: pass the directory written by transformers' save_pretrained.")
  with open(config_file) as f:
    hf_config = json.load(f)
  model_config = model_config_from_hf(hf_config)
  return model_config, d2_to_variables(hf_to_d2(_read_weights(path)), model_config)
