"""Official Detectron2 `.pkl` import, the restricted unpickler at the model level, and the conversion script."""
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import ade20k_r50, ade20k_swin_tiny
from hf_reference import hf_outputs
from maskformer_jax.checkpoint import load_model
from maskformer_jax.convert import UnsafeCheckpointError, load_detectron2_checkpoint, load_hf_checkpoint
from maskformer_jax.models import build_model
from test_models import assert_outputs_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_state_dict_to_detectron2(state_dict, with_pixel_decoder_level: bool) -> dict:
  """The released checkpoints' key names, written out from the reference table (section 7.2, inverted),
  independently of the library's mapping. Takes the Hub (v4) key names; numpy arrays as in the official pickles."""
  sd = dict(state_dict)
  head = "sem_seg_head.pixel_decoder." if with_pixel_decoder_level else "sem_seg_head."
  enc, out = "model.pixel_level_module.encoder.", {}
  for key, value in sd.items():
    k = key
    if k.startswith(enc + "model.layernorm."):
      continue  # transformers' unused Swin norm; `criterion.empty_weight` keeps its name, as in MaskFormer's files
    k = k.replace(enc + "embedder.embedder.convolution.", "backbone.stem.conv1.")
    k = k.replace(enc + "embedder.embedder.normalization.", "backbone.stem.conv1.norm.")
    if k.startswith(enc + "encoder.stages."):
      s, _, i, rest = k[len(enc + "encoder.stages."):].split(".", 3)
      stage = f"backbone.res{int(s) + 2}.{i}."
      if rest.startswith("shortcut."):
        k = stage + "shortcut." + rest[len("shortcut."):].replace("convolution.", "").replace("normalization.", "norm.")
      else:
        _, conv, rest = rest.split(".", 2)
        k = stage + f"conv{int(conv) + 1}." + rest.replace("convolution.", "").replace("normalization.", "norm.")
    k = k.replace(enc + "model.embeddings.patch_embeddings.projection.", "backbone.patch_embed.proj.")
    k = k.replace(enc + "model.embeddings.norm.", "backbone.patch_embed.norm.")
    k = k.replace(enc + "model.encoder.layers.", "backbone.layers.")
    for hf_name, d2_name in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             ("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2"), ("attention.self.relative_position", "attn.relative_position")):
      k = k.replace(f".{hf_name}.", f".{d2_name}.").replace(f".{hf_name}_", f".{d2_name}_")
    if k.startswith(enc + "hidden_states_norms."):
      s, rest = k[len(enc + "hidden_states_norms."):].split(".", 1)
      k = f"backbone.norm{s}.{rest}"
    fpn = "model.pixel_level_module.decoder."
    k = k.replace(fpn + "fpn.stem.0.", head + "layer_4.").replace(fpn + "fpn.stem.1.", head + "layer_4.norm.")
    for j in range(3):
      k = k.replace(fpn + f"fpn.layers.{j}.proj.0.", head + f"adapter_{3 - j}.")
      k = k.replace(fpn + f"fpn.layers.{j}.proj.1.", head + f"adapter_{3 - j}.norm.")
      k = k.replace(fpn + f"fpn.layers.{j}.block.0.", head + f"layer_{3 - j}.")
      k = k.replace(fpn + f"fpn.layers.{j}.block.1.", head + f"layer_{3 - j}.norm.")
    k = k.replace(fpn + "mask_projection.", head + "mask_features.")
    dec, pred = "model.transformer_module.decoder.", "sem_seg_head.predictor."
    k = k.replace(dec + "layernorm.", pred + "transformer.decoder.norm.")
    k = k.replace(dec + "layers.", pred + "transformer.decoder.layers.")
    for hf_name, d2_name in (("encoder_attn_layer_norm", "norm2"), ("self_attn_layer_norm", "norm1"),
                             ("final_layer_norm", "norm3"), ("encoder_attn", "multihead_attn"),
                             ("fc1", "linear1"), ("fc2", "linear2")):
      if k.startswith(pred + "transformer.decoder."):
        k = k.replace(f".{hf_name}.", f".{d2_name}.")
    k = k.replace("model.transformer_module.queries_embedder.", pred + "query_embed.")
    k = k.replace("model.transformer_module.input_projection.", pred + "input_proj.")
    k = k.replace("class_predictor.", pred + "class_embed.")
    if k.startswith("mask_embedder."):
      k = f"{pred}mask_embed.layers.{k.split('.')[1]}.{k.split('.')[-1]}"
    out[k] = value
  # Fuse the split projections back into the original layouts ([q; k; v] rows).
  for k in [k for k in out if k.endswith((".query.weight", ".query.bias"))]:
    prefix, kind = k.rsplit(".query.", 1)
    out[prefix.replace(".attention.self", ".attn") + ".qkv." + kind] = np.concatenate(
        [out.pop(f"{prefix}.{p}.{kind}") for p in ("query", "key", "value")])
  for k in [k for k in out if ".q_proj." in k]:
    prefix, kind = k.split(".q_proj.")
    out[f"{prefix}.in_proj_{kind}"] = np.concatenate([out.pop(f"{prefix}.{p}_proj.{kind}") for p in "qkv"])
  return out


@pytest.mark.parametrize("with_pixel_decoder_level", [False, True])
def test_official_pkl_loads_and_matches_transformers(hf_checkpoint, tmp_path, with_pixel_decoder_level):
  kind, hf_model, path = hf_checkpoint
  state_dict = hf_state_dict_to_detectron2(load_file(path / "model.safetensors"), with_pixel_decoder_level)
  assert ("sem_seg_head.layer_4.weight" in state_dict) != with_pixel_decoder_level
  assert "criterion.empty_weight" in state_dict  # the loss buffer the released files carry
  pkl = tmp_path / "model_final.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": state_dict, "__author__": "test", "matching_heuristics": True}, f, protocol=2)
  model_config, variables = load_detectron2_checkpoint(pkl)  # architecture inferred from the weights
  hf_config, _ = load_hf_checkpoint(path)
  assert model_config.to_dict() == hf_config.to_dict()
  images = np.random.default_rng(1).standard_normal((1, 96, 64, 3)).astype(np.float32)
  model = build_model(model_config)
  ours = jax.device_get(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  assert_outputs_close(ours, hf_outputs(hf_model, images))


def test_pkl_with_a_pickled_callable_is_refused(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  pkl = tmp_path / "evil.pkl"
  pkl.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": Exploit()}}))
  with pytest.raises(UnsafeCheckpointError, match="system"):
    load_detectron2_checkpoint(pkl)
  assert not marker.exists()


def test_wrong_config_is_reported_with_the_mismatching_keys(hf_checkpoint, tmp_path):
  kind, _, path = hf_checkpoint
  pkl = tmp_path / "model.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": hf_state_dict_to_detectron2(load_file(path / "model.safetensors"), False)}, f)
  other = (ade20k_swin_tiny if kind == "resnet50" else ade20k_r50).get_config().model
  with pytest.raises(ValueError, match="missing .*unexpected"):
    load_detectron2_checkpoint(pkl, other)


def test_convert_script_writes_a_model_directory_that_loads_back(hf_checkpoint, tmp_path):
  _, _, path = hf_checkpoint
  out = tmp_path / "converted"
  subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_checkpoint.py"), "--source=hf",
                  f"--input={path}", f"--output={out}"], check=True, cwd=REPO, capture_output=True)
  model_config, variables = load_model(out)
  _, direct = load_hf_checkpoint(path)
  jax.tree.map(np.testing.assert_array_equal, variables, direct)
  assert model_config.to_dict() == load_hf_checkpoint(path)[0].to_dict()
