"""ResNet-50/101 backbone as used by MaskFormer (Detectron2 `build_resnet_backbone`, torchvision-style).

Stride on the 3x3 conv, frozen batch norm everywhere, basic 7x7 stem with 64 channels, no dilation. Parameter
names mirror the Detectron2 checkpoint keys: `stem/conv1`, `res{2..5}_{i}/conv{1,2,3}` and `res{n}_0/shortcut`.
"""
import flax.linen as nn
import jax

from maskformer_jax.models.layers import Conv2d, c2_msra_init, frozen_batch_norm

RESNET_STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RESNET_OUT_CHANNELS = (256, 512, 1024, 2048)


def _conv(features: int, kernel_size: int, stride: int = 1, relu: bool = True, name: str = None) -> Conv2d:
  return Conv2d(features, kernel_size, stride, use_bias=False, norm=frozen_batch_norm,
                activation=nn.relu if relu else None, kernel_init=c2_msra_init, name=name)


class BottleneckBlock(nn.Module):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus a projection shortcut when the shape changes."""

  out_channels: int
  bottleneck_channels: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.out_channels:
      shortcut = _conv(self.out_channels, 1, self.stride, relu=False, name="shortcut")(x)
    else:
      shortcut = x
    y = _conv(self.bottleneck_channels, 1, name="conv1")(x)
    y = _conv(self.bottleneck_channels, 3, self.stride, name="conv2")(y)
    y = _conv(self.out_channels, 1, relu=False, name="conv3")(y)
    return nn.relu(y + shortcut)


class BasicStem(nn.Module):
  """7x7/2 conv + frozen BN + ReLU, then a 3x3/2 max pool: `[B, H, W, 3]` -> `[B, H/4, W/4, 64]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv(64, 7, 2, name="conv1")(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """ResNet-`depth` feature extractor.

  Input `[B, H, W, 3]`; returns `res2..res5`: `[B, H/4, W/4, 256]`, `[B, H/8, W/8, 512]`,
  `[B, H/16, W/16, 1024]`, `[B, H/32, W/32, 2048]`.
  """

  depth: int = 50

  @property
  def out_channels(self) -> dict[str, int]:
    return {f"res{i + 2}": c for i, c in enumerate(RESNET_OUT_CHANNELS)}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    del train  # Frozen BN and no dropout: training and inference compute the same function.
    x = BasicStem(name="stem")(x)
    features = {}
    for stage, (num_blocks, out_channels) in enumerate(zip(RESNET_STAGE_BLOCKS[self.depth], RESNET_OUT_CHANNELS)):
      for i in range(num_blocks):
        stride = 2 if i == 0 and stage > 0 else 1
        x = BottleneckBlock(out_channels, out_channels // 4, stride, name=f"res{stage + 2}_{i}")(x)
      features[f"res{stage + 2}"] = x
    return features
