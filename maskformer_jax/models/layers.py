"""Building blocks shared by the backbones and heads.

Feature maps are channels-last (`[B, H, W, C]`); per-query masks are `[..., H, W]`. Every norm uses PyTorch's epsilon (1e-5) because the reference
weights were trained with it; Flax's own default (1e-6) would shift outputs measurably.
"""
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-5

# Detectron2 initialisers: c2_xavier_fill (Kaiming-uniform, a=1) for head convs, c2_msra_fill for ResNet convs.
c2_xavier_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
c2_msra_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def layer_norm(name: str) -> nn.LayerNorm:
  """A LayerNorm with PyTorch's epsilon."""
  return nn.LayerNorm(epsilon=NORM_EPS, name=name)


def group_norm(num_groups: int) -> Callable[..., nn.Module]:
  """A GroupNorm factory with PyTorch's epsilon, for `Conv2d(norm=...)`."""

  def make(features: int, name: str) -> nn.Module:
    del features  # GroupNorm infers it
    return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, name=name)

  return make


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine transform (Detectron2's `FrozenBatchNorm2d`), over `[..., C]`.

  `scale`/`bias` live in `params` (so parameter counts match PyTorch's, where they are BN weights) and
  `mean`/`var` in `batch_stats`; no gradient reaches any of them, as in the reference where all four are
  constant buffers. It has no `__call__`: `Conv2d(norm=frozen_batch_norm)` folds `affine()` into its kernel.
  """

  num_features: int
  eps: float = NORM_EPS

  def setup(self):
    c = self.num_features
    self.scale = self.param("scale", nn.initializers.ones, (c,))
    self.bias = self.param("bias", nn.initializers.zeros, (c,))
    self.mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    self.var = self.variable("batch_stats", "var", jnp.ones, (c,))

  def affine(self) -> tuple[jax.Array, jax.Array]:
    """The frozen normalisation as `x * multiplier + offset`, both `[C]` (Detectron2's formula)."""
    multiplier = jax.lax.stop_gradient(self.scale * jax.lax.rsqrt(self.var.value + self.eps))
    return multiplier, jax.lax.stop_gradient(self.bias - self.mean.value * multiplier)


def frozen_batch_norm(features: int, name: str) -> nn.Module:
  return FrozenBatchNorm(features, name=name)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, out_layout: str) -> jax.Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", out_layout))


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A linear map over the last axis (a dense layer, a 1x1 convolution): `[..., C_in]` x `[C_in, C_out]` ->
  `[..., C_out]`, with its own kernel gradient."""
  return jnp.einsum("...c,cd->...d", x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, grad):
  x, kernel = residuals
  # The kernel gradient contracts the rows (pixels, tokens) of the input and of the output gradient. Written
  # input-first, XLA lays out the input row-minor for the product; autodiff's own order transposes the output
  # gradient instead, fused with the activation's gradient into a strided copy: 4x larger in a bottleneck's
  # expansion or an MLP's fc1, and 3x slower ResNet blocks on CPU.
  grad_kernel = jnp.einsum("nc,nd->cd", x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]))
  return jnp.einsum("...d,cd->...c", grad, kernel), grad_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None) -> jax.Array:
  """`nn.Dense`'s contraction (last input axis with the kernel's first) through `matmul`."""
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None or preferred_element_type:
    raise ValueError(f"Dense supports its default contraction only, got dimension_numbers={dimension_numbers}, "
                     f"precision={precision}, preferred_element_type={preferred_element_type}; use flax's nn.Dense")
  return matmul(lhs, rhs)


class Dense(nn.Dense):
  """`flax.linen.Dense` (same parameters, `kernel` `[C_in, C_out]` and `bias`) through `matmul`'s gradient."""

  dot_general: Callable = _dense_dot_general


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, out_layout: str = "NHWC") -> jax.Array:
  """PyTorch-style convolution (symmetric `k // 2` padding): `[B, H, W, C_in]` x `[k, k, C_in, C_out]` ->
  `[B, H', W', C_out]` (or `[B, C_out, H', W']` with `out_layout="NCHW"`)."""
  if kernel.shape[:2] == (1, 1) and out_layout == "NHWC":
    # A 1x1 convolution is a matmul over channels; XLA:CPU runs it faster on its matmul path.
    return matmul(x[:, ::stride, ::stride], kernel[0, 0])
  return _xla_conv(x, kernel, stride, out_layout)


class Conv2d(nn.Module):
  """Convolution with PyTorch's symmetric padding, then an optional norm and activation (Detectron2's `Conv2d`).

  Parameters are `kernel` `[kh, kw, C_in, C_out]`, `bias` `[C_out]` and the norm under the name `norm`, mirroring
  the reference's `conv.weight` / `conv.bias` / `conv.norm.*` keys.

  Input `[B, H, W, C_in]`, output `[B, H', W', C_out]` with `H' = (H + 2 * (k // 2) - k) // stride + 1`.
  """

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  norm: Optional[Callable[[int, str], nn.Module]] = None  # (features, name) -> norm module
  activation: Optional[Callable[[jax.Array], jax.Array]] = None
  kernel_init: Callable = c2_xavier_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    norm = self.norm(self.features, "norm") if self.norm is not None else None
    if isinstance(norm, FrozenBatchNorm):
      # A frozen affine folds into the conv: one pass over the activations instead of two.
      multiplier, offset = norm.affine()
      kernel = kernel * multiplier
      bias = offset if bias is None else bias * multiplier + offset
      norm = None
    y = conv2d(x, kernel, self.stride)
    if bias is not None:
      y = y + bias
    if norm is not None:
      y = norm(y)
    if self.activation is not None:
      y = self.activation(y)
    return y


class DropPath(nn.Module):
  """Stochastic depth: zeroes whole samples with probability `rate` and rescales the rest (timm's `drop_path`).

  Draws from the `dropout` RNG stream; the identity when `deterministic`.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads `[B, H, W, C]` at the bottom and right so that H and W are multiples of `multiple`."""
  pad_h = -x.shape[1] % multiple
  pad_w = -x.shape[2] % multiple
  if pad_h == 0 and pad_w == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's legacy `nearest` resize: `floor(i * in / out)` in float32, clipped."""
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32), in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes `[B, H, W, ...]` to `[B, *size, ...]` with PyTorch's `F.interpolate(mode="nearest")` rule."""
  rows = nearest_indices(x.shape[1], size[0])
  cols = nearest_indices(x.shape[2], size[1])
  return x[:, rows][:, :, cols]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of PyTorch's bilinear resize with align_corners=False (half-pixel centres, edge clamp)."""
  scale = in_size / out_size
  source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = source - low
  weights = np.zeros((out_size, in_size), np.float32)
  np.add.at(weights, (np.arange(out_size), low), 1 - frac)
  np.add.at(weights, (np.arange(out_size), high), frac)
  return weights


def _row_weights(factor: int) -> np.ndarray:
  """`[factor, 3]`: output row `factor * i + k` of a bilinear upsampling (align_corners=False) by a whole factor is
  `w[k] . (row i - 1, row i, row i + 1)` of the input, with the edge rows repeated (PyTorch's clamping)."""
  weights = np.zeros((factor, 3), np.float32)
  for k in range(factor):
    offset = (k + 0.5) / factor - 0.5  # source position relative to row i, in (-0.5, 0.5)
    neighbour = 0 if offset < 0 else 2
    weights[k, neighbour], weights[k, 1] = abs(offset), 1 - abs(offset)
  return weights


def _neighbour_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows i - 1 and i + 1 of `[..., h, W]` for every i, the edge rows repeated."""
  return (jnp.concatenate([x[..., :1, :], x[..., :-1, :]], axis=-2),
          jnp.concatenate([x[..., 1:, :], x[..., -1:, :]], axis=-2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _upsample_rows(x: jax.Array, factor: int) -> jax.Array:
  """Bilinear upsampling of axis -2 of `[..., h, W]` by a whole `factor`: two multiply-adds per output row instead of
  an `[H, h]` matrix product. The transpose (for the loss's pixel gradients) is written out so that it too stays
  one elementwise pass."""
  above, below = _neighbour_rows(x)
  rows = [sum(w * r for w, r in zip(weights, (above, x, below)) if w) for weights in _row_weights(factor)]
  return jnp.stack(rows, axis=-2).reshape(*x.shape[:-2], x.shape[-2] * factor, x.shape[-1])


def _upsample_rows_fwd(x, factor):
  return _upsample_rows(x, factor), None


def _upsample_rows_bwd(factor, _, grad):
  grad = grad.reshape(*grad.shape[:-2], -1, factor, grad.shape[-1])  # [..., h, factor, W]
  weights = _row_weights(factor)
  to_above, to_self, to_below = (sum(w * grad[..., k, :] for k, w in enumerate(weights[:, j]) if w) for j in range(3))
  # Row i receives to_self[i], to_above[i + 1] and to_below[i - 1]; the repeated edge rows send their share back to
  # the first and last row.
  h = grad.shape[-3]
  row = jnp.arange(h)[:, None]
  zero = jnp.zeros_like(to_self[..., :1, :])
  from_below = jnp.concatenate([to_above[..., 1:, :], zero], axis=-2) + jnp.where(row == 0, to_above[..., :1, :], 0)
  from_above = (jnp.concatenate([zero, to_below[..., :-1, :]], axis=-2)
                + jnp.where(row == h - 1, to_below[..., -1:, :], 0))
  return (to_self + from_below + from_above,)


_upsample_rows.defvjp(_upsample_rows_fwd, _upsample_rows_bwd)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes masks `[..., h, w]` to `[..., H, W]` as PyTorch's `interpolate(mode="bilinear", align_corners=False)`,
  in full float32 on every backend: a small matrix product over each resized axis (an axis that keeps its size is
  left alone), except that rows upsampled by a whole factor (the stride-4 masks to the input size) are blended from
  their neighbours directly, after the columns, which keeps the full-size work elementwise."""
  precision = jax.lax.Precision.HIGHEST
  if x.shape[-1] != size[1]:
    x = jnp.einsum("...hw,Ww->...hW", x, bilinear_matrix(x.shape[-1], size[1]), precision=precision)
  if x.shape[-2] == size[0]:
    return x
  if size[0] % x.shape[-2] == 0:
    return _upsample_rows(x, size[0] // x.shape[-2])
  return jnp.einsum("Hh,...hW->...HW", bilinear_matrix(x.shape[-2], size[0]), x, precision=precision)


def sine_position_encoding(height: int, width: int, num_pos_feats: int, temperature: float = 10000.0
                           ) -> np.ndarray:
  """DETR's normalised sine positional encoding for an unpadded `[height, width]` grid.

  Row and column indices 1..H and 1..W are divided by their last value (+1e-6) and scaled by 2*pi; channel pair
  (2i, 2i+1) holds sin/cos at frequency temperature^(2i / num_pos_feats). The y half comes first. Computed in
  float32 like the reference, on the host: shapes are static, so under `jit` this is a constant.

  Returns:
    `[height, width, 2 * num_pos_feats]` float32.
  """
  eps, scale = np.float32(1e-6), np.float32(2 * np.pi)
  y_embed = np.arange(1, height + 1, dtype=np.float32)
  x_embed = np.arange(1, width + 1, dtype=np.float32)
  y_embed = y_embed / (y_embed[-1] + eps) * scale
  x_embed = x_embed / (x_embed[-1] + eps) * scale
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * np.floor(dim_t / 2) / np.float32(num_pos_feats))

  def encode(embed: np.ndarray) -> np.ndarray:
    pos = embed[:, None] / dim_t  # [N, F]
    return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=2).reshape(len(embed), -1)

  pos_y = np.broadcast_to(encode(y_embed)[:, None, :], (height, width, num_pos_feats))
  pos_x = np.broadcast_to(encode(x_embed)[None, :, :], (height, width, num_pos_feats))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)
