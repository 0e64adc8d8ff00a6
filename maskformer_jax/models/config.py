"""The `config.model` schema read by `build_model`, and presets for the paper's architectures.

```
num_classes       K real classes ("no object" excluded; the class head has K + 1 outputs)
num_queries       100
deep_supervision  True: losses on every decoder layer (the model always returns all layers)
backbone          name='resnet': depth (50 | 101)
                  name='swin':   embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate,
                                 patch_size, pretrain_img_size
pixel_decoder     name ('fpn' | 'transformer_encoder'), conv_dim, mask_dim, num_groups;
                  'transformer_encoder' adds num_layers, num_heads, dim_feedforward, dropout
transformer       hidden_dim, num_heads, dim_feedforward, dropout, num_layers,
                  in_feature ('res5' | 'transformer_encoder'), enforce_input_proj
```
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict

# Swin variants (reference section 1.2).
SWIN_VARIANTS = {
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, pretrain_img_size=224),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
                  pretrain_img_size=224),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                 pretrain_img_size=384),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                  pretrain_img_size=384),
}


def resnet_backbone(depth: int) -> ConfigDict:
  """Torchvision-style ResNet (stride in the 3x3 conv) with frozen BN; depth 50 or 101."""
  if depth not in (50, 101):
    raise ValueError(f'ResNet depth must be 50 or 101, got {depth}')
  return ConfigDict(dict(name='resnet', depth=depth))


def swin_backbone(variant: str, drop_path_rate: float = 0.3) -> ConfigDict:
  """Swin Transformer; variant is 'tiny', 'small', 'base' or 'large'."""
  if variant not in SWIN_VARIANTS:
    raise ValueError(f'Unknown Swin variant {variant!r}; choose one of {sorted(SWIN_VARIANTS)}')
  return ConfigDict(dict(name='swin', mlp_ratio=4.0, drop_path_rate=drop_path_rate, patch_size=4,
                         **SWIN_VARIANTS[variant]))


def fpn_pixel_decoder(conv_dim: int = 256, mask_dim: int = 256) -> ConfigDict:
  """`BasePixelDecoder`: FPN over res2..res5, GroupNorm(32), 256 channels."""
  return ConfigDict(dict(name='fpn', conv_dim=conv_dim, mask_dim=mask_dim, num_groups=32))


def transformer_encoder_pixel_decoder(conv_dim: int = 256, mask_dim: int = 256) -> ConfigDict:
  """`TransformerEncoderPixelDecoder`: the FPN plus a 6-layer DETR encoder on res5 (the paper's "+6 Enc")."""
  decoder = fpn_pixel_decoder(conv_dim, mask_dim)
  decoder.name = 'transformer_encoder'
  decoder.update(dict(num_layers=6, num_heads=8, dim_feedforward=2048, dropout=0.1))
  return decoder


def model_config(num_classes, backbone: ConfigDict, pixel_decoder: ConfigDict, in_feature: str = 'res5',
                 enforce_input_proj: bool = False, num_queries: int = 100, hidden_dim: int = 256,
                 num_heads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 num_layers: int = 6) -> ConfigDict:
  """The `config.model` schema read by `maskformer_jax.models.build_model`.

  num_classes excludes "no object". It may be an int or an `ml_collections.FieldReference` shared with
  `config.data.num_classes`. in_feature is what the transformer decoder attends to: 'res5' (raw backbone) or
  'transformer_encoder' (the pixel decoder's encoder output; needs the transformer_encoder pixel decoder).
  """
  if in_feature == 'transformer_encoder' and pixel_decoder.name != 'transformer_encoder':
    raise ValueError("in_feature='transformer_encoder' needs the transformer_encoder pixel decoder")
  return ConfigDict(dict(
      num_classes=num_classes,
      num_queries=num_queries,
      deep_supervision=True,
      backbone=backbone,
      pixel_decoder=pixel_decoder,
      # Predictor: post-norm DETR decoder, no encoder of its own.
      transformer=ConfigDict(dict(hidden_dim=hidden_dim, num_heads=num_heads, dim_feedforward=dim_feedforward,
                                  dropout=dropout, num_layers=num_layers, in_feature=in_feature,
                                  enforce_input_proj=enforce_input_proj)),
  ))
