"""Pixel decoders: the FPN (`BasePixelDecoder`) and its transformer-encoder variant.

Top-down FPN over res2..res5 with GroupNorm(32) and nearest upsampling, ending in a 3x3 `mask_features` conv
(with bias, no norm) that gives the stride-4 per-pixel embeddings. With `num_encoder_layers > 0` res5 first goes
through a 1x1 `input_proj` and a post-norm DETR encoder with sine positions
(`TransformerEncoderPixelDecoder`), whose output also becomes the transformer decoder's memory.
Parameter names mirror the reference: `layer_{1..4}`, `adapter_{1..3}`, `mask_features`, `input_proj`, `encoder`.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.layers import Conv2d, group_norm, resize_nearest, sine_position_encoding
from maskformer_jax.models.transformer import TransformerEncoder


class PixelDecoder(nn.Module):
  """Backbone features -> (`mask_features` `[B, H/4, W/4, mask_dim]`, encoder memory `[B, H/32, W/32, conv_dim]`).

  The memory is None unless `num_encoder_layers > 0`.
  """

  conv_dim: int = 256
  mask_dim: int = 256
  num_groups: int = 32
  num_encoder_layers: int = 0
  encoder_num_heads: int = 8
  encoder_dim_feedforward: int = 2048
  encoder_dropout: float = 0.1

  @nn.compact
  def __call__(self, features: dict[str, jax.Array], train: bool = False
               ) -> tuple[jax.Array, Optional[jax.Array]]:
    norm = group_norm(self.num_groups)
    res5 = features["res5"]
    memory = None
    if self.num_encoder_layers > 0:
      batch, height, width, _ = res5.shape
      x = Conv2d(self.conv_dim, 1, name="input_proj", kernel_init=nn.initializers.xavier_uniform())(res5)
      pos = jnp.asarray(sine_position_encoding(height, width, self.conv_dim // 2).reshape(1, height * width, -1))
      x = TransformerEncoder(self.num_encoder_layers, self.conv_dim, self.encoder_num_heads,
                             self.encoder_dim_feedforward, self.encoder_dropout, name="encoder")(
                                 x.reshape(batch, height * width, self.conv_dim), pos, train)
      memory = res5 = x.reshape(batch, height, width, self.conv_dim)

    y = Conv2d(self.conv_dim, 3, use_bias=False, norm=norm, activation=nn.relu, name="layer_4")(res5)
    for level in (3, 2, 1):
      lateral = Conv2d(self.conv_dim, 1, use_bias=False, norm=norm, name=f"adapter_{level}")(
          features[f"res{level + 1}"])
      y = lateral + resize_nearest(y, lateral.shape[1:3])
      y = Conv2d(self.conv_dim, 3, use_bias=False, norm=norm, activation=nn.relu, name=f"layer_{level}")(y)
    mask_features = Conv2d(self.mask_dim, 3, name="mask_features")(y)
    return mask_features, memory
