"""transformers' PyTorch MaskFormer with random weights, built offline: the independent reference for tests
and benchmarks. Nothing here touches the network."""
import numpy as np
import torch
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, SwinConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def backbone_config(kind: str):
  if kind == "resnet50":
    return ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                        layer_type="bottleneck", out_features=STAGES)
  if kind == "swin_tiny":
    return SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                      window_size=7, drop_path_rate=0.3, out_features=STAGES)
  raise ValueError(kind)


def make_hf_model(kind: str, num_labels: int = 150, seed: int = 0) -> MaskFormerForInstanceSegmentation:
  """A MaskFormer whose every weight and buffer is random (seeded), in eval mode.

  transformers' own init leaves BN statistics at 0/1 and Swin bias tables at zero, which would hide mistakes in
  how those are loaded, so every floating tensor is redrawn with a scale that keeps activations O(1).
  """
  torch.manual_seed(seed)
  config = MaskFormerConfig(backbone_config=backbone_config(kind), num_labels=num_labels,
                            id2label={i: f"class_{i}" for i in range(num_labels)},
                            label2id={f"class_{i}": i for i in range(num_labels)})
  model = MaskFormerForInstanceSegmentation(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point() or "empty_weight" in name:
        continue
      if name.endswith("running_var"):
        tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
      elif name.endswith("running_mean") or name.endswith("bias") or "relative_position_bias_table" in name:
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
      elif tensor.ndim == 1:  # norm scales
        tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.5)
      else:  # weights: uniform with variance 1/fan_in keeps activations O(1)
        fan_in = tensor[0].numel()
        tensor.copy_((torch.rand(tensor.shape, generator=gen) * 2 - 1) * np.sqrt(3.0 / fan_in))
  return model


def hf_outputs(model, images_nhwc: np.ndarray) -> dict:
  """Runs the HF model on normalised NHWC float32 images and returns numpy outputs, including reference auxiliary
  outputs built as the original code does: the shared decoder LayerNorm applied to layers 1..L-1's outputs."""
  pixel_values = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    hidden = out.transformer_decoder_hidden_states  # (input, layer 1 .. layer L), un-normalised
    decoder_norm = model.model.transformer_module.decoder.layernorm
    aux = []
    for h in hidden[1:-1]:
      h = decoder_norm(h)
      aux.append({
          "pred_logits": model.class_predictor(h).numpy(),
          "pred_masks": torch.einsum("bqc,bchw->bqhw", model.mask_embedder(h),
                                     out.pixel_decoder_last_hidden_state).numpy(),
      })
  return {"pred_logits": out.class_queries_logits.numpy(), "pred_masks": out.masks_queries_logits.numpy(),
          "aux_outputs": aux}
