"""Pixel decoders: the FPN (`BasePixelDecoder`) and its transformer-encoder variant.

Top-down FPN over res2..res5 with GroupNorm(32) and nearest upsampling, ending in a 3x3 `mask_features` conv
(with bias, no norm) that gives the stride-4 per-pixel embeddings. With `num_encoder_layers > 0` res5 first goes
through a 1x1 `input_proj` and a post-norm DETR encoder with sine positions
(`TransformerEncoderPixelDecoder`), whose output also becomes the transformer decoder's memory.
Parameter names mirror the reference: `layer_{1..4}`, `adapter_{1..3}`, `mask_features`, `input_proj`, `encoder`.
"""
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.layers import (Conv2d, c2_xavier_init, conv2d, group_norm, resize_nearest,
                                          sine_position_encoding)
from maskformer_jax.models.transformer import TransformerEncoder


class PixelEmbeddings(NamedTuple):
  """The stride-4 FPN map and the final 3x3 `mask_features` projection, kept apart.

  Mask logits are dot products of query embeddings with the projected map. For every decoder layer at once,
  project then contract (`features`); for one set of queries, fold the projection into a per-image conv with one
  output channel per query (`mask_logits`): the same function with Q instead of mask_dim output channels and no
  separate contraction.
  """

  fpn: jax.Array  # [B, H/4, W/4, conv_dim]
  kernel: jax.Array  # [3, 3, conv_dim, mask_dim]
  bias: jax.Array  # [mask_dim]

  def features(self) -> jax.Array:
    """The per-pixel embeddings `[B, H/4, W/4, mask_dim]`."""
    return conv2d(self.fpn, self.kernel) + self.bias

  def mask_logits(self, mask_embed: jax.Array) -> jax.Array:
    """`mask_embed` `[B, Q, mask_dim]` -> mask logits `[B, Q, H/4, W/4]`."""

    def one_image(fpn, embed):  # [H, W, C], [Q, D]
      kernel = jnp.einsum("ijcd,qd->ijcq", self.kernel, embed)
      return conv2d(fpn[None], kernel, out_layout="NCHW")[0] + (embed @ self.bias)[:, None, None]

    return jax.vmap(one_image)(self.fpn, mask_embed)


class MaskProjection(nn.Module):
  """Parameters of the final 3x3 `mask_features` conv (with bias), applied by `PixelEmbeddings`."""

  mask_dim: int

  @nn.compact
  def __call__(self, in_channels: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", c2_xavier_init, (3, 3, in_channels, self.mask_dim))
    return kernel, self.param("bias", nn.initializers.zeros, (self.mask_dim,))


class PixelDecoder(nn.Module):
  """Backbone features -> (`PixelEmbeddings` at stride 4, encoder memory `[B, H/32, W/32, conv_dim]`).

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
               ) -> tuple[PixelEmbeddings, Optional[jax.Array]]:
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
    kernel, bias = MaskProjection(self.mask_dim, name="mask_features")(y.shape[-1])
    return PixelEmbeddings(y, kernel, bias), memory
