"""Swin Transformer backbone as used by MaskFormer (`D2SwinTransformer` in the reference code).

Patch size 4, shifted windows with the cyclic-shift attention mask, relative position bias, zero-padding to
window multiples inside every block, patch merging, linearly increasing drop path, and one LayerNorm per output
stage (`norm0..norm3`). Parameter names mirror the reference keys (`patch_embed`, `layers_{s}/blocks_{b}/attn/qkv`,
`layers_{s}/downsample/reduction`, `norm{s}`).
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models.layers import Dense, DropPath, layer_norm, pad_to_multiple

# The reference masks cross-region attention with -100 rather than -inf; keep it for identical softmax outputs.
_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> np.ndarray:
  """`[N, N]` index into the `[(2w-1)^2, heads]` bias table for every pair of tokens in a window (N = w*w)."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
  return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
  """Additive attention mask `[num_windows, N, N]` (0 or -100) for windows of a map rolled by `-shift`.

  Tokens that wrapped around from different image regions must not attend to each other.
  """
  region = np.zeros((height, width), np.int32)
  bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
  label = 0
  for h in bounds:
    for w in bounds:
      region[h, w] = label
      label += 1
  windows = region.reshape(height // window_size, window_size, width // window_size, window_size)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window_size * window_size)
  return np.where(windows[:, None, :] != windows[:, :, None], _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B * num_windows, window_size**2, C]`, windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: `[B * num_windows, window_size**2, C]` -> `[B, H, W, C]`."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window_size, width // window_size, window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a learned relative position bias.

  Input `[B * num_windows, N, C]` and an optional additive mask `[num_windows, N, N]`; output has the input's shape.
  """

  dim: int
  num_heads: int
  window_size: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[np.ndarray]) -> jax.Array:
    batch_windows, n, c = x.shape
    head_dim = c // self.num_heads
    # Heads before tokens ([3, b, h, n, d]): XLA:CPU lays out "bnhd" batched matmuls several times slower.
    qkv = Dense(3 * c, name="qkv")(x).reshape(batch_windows, n, 3, self.num_heads, head_dim)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = jnp.einsum("bhnd,bhmd->bhnm", q * head_dim ** -0.5, k)
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(self.window_size).reshape(-1)].reshape(n, n, self.num_heads)
    logits = logits + bias.transpose(2, 0, 1)[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, self.num_heads, n, n) + mask[None, :, None]
      logits = logits.reshape(batch_windows, self.num_heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhnm,bhmd->bhnd", attn, v).transpose(0, 2, 1, 3).reshape(batch_windows, n, c)
    return Dense(c, name="proj")(out)


class SwinMlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2: `[..., C]` -> `[..., out_dim]`."""

  hidden_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(Dense(self.hidden_dim, name="fc1")(x), approximate=False)
    return Dense(self.out_dim, name="fc2")(x)


class SwinBlock(nn.Module):
  """(Shifted-)window attention and an MLP, each pre-normed with a residual. `[B, H, W, C]` -> same shape."""

  dim: int
  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float
  drop_path: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _, height, width, _ = x.shape
    ws, shift = self.window_size, self.shift_size
    y = pad_to_multiple(layer_norm("norm1")(x), ws)
    padded_h, padded_w = y.shape[1:3]
    mask = None
    if shift > 0:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = shifted_window_mask(padded_h, padded_w, ws, shift)
    y = WindowAttention(self.dim, self.num_heads, ws, name="attn")(window_partition(y, ws), mask)
    y = window_reverse(y, ws, padded_h, padded_w)
    if shift > 0:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width]
    x = x + DropPath(self.drop_path)(y, deterministic=not train)

    y = SwinMlp(int(self.dim * self.mlp_ratio), self.dim, name="mlp")(layer_norm("norm2")(x))
    return x + DropPath(self.drop_path)(y, deterministic=not train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat -> LayerNorm -> linear: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]`."""

  dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = pad_to_multiple(x, 2)
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    return Dense(2 * self.dim, use_bias=False, name="reduction")(layer_norm("norm")(x))


class SwinStage(nn.Module):
  """`depth` blocks alternating plain and shifted windows, then optional patch merging.

  Returns the stage output `[B, H, W, C]` (before merging) and the input of the next stage.
  """

  dim: int
  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float
  drop_paths: Sequence[float]
  downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    for i in range(self.depth):
      shift = 0 if i % 2 == 0 else self.window_size // 2
      x = SwinBlock(self.dim, self.num_heads, self.window_size, shift, self.mlp_ratio, self.drop_paths[i],
                    name=f"blocks_{i}")(x, train)
    next_input = PatchMerging(self.dim, name="downsample")(x) if self.downsample else x
    return x, next_input


class PatchEmbed(nn.Module):
  """Non-overlapping `patch_size` patches -> linear embedding -> LayerNorm: `[B, H, W, 3]` -> `[B, H/4, W/4, C]`."""

  embed_dim: int
  patch_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(pad_to_multiple(x, p))
    return layer_norm("norm")(x)


class SwinTransformer(nn.Module):
  """Swin-T/S/B/L feature extractor.

  Input `[B, H, W, 3]`; returns `res2..res5` at strides 4, 8, 16, 32 with `embed_dim * (1, 2, 4, 8)` channels,
  each passed through its own LayerNorm.
  """

  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.3
  patch_size: int = 4
  # Only matters for absolute position embeddings, which MaskFormer does not use; kept to describe the weights.
  pretrain_img_size: int = 224

  @property
  def out_channels(self) -> dict[str, int]:
    return {f"res{i + 2}": self.embed_dim * 2 ** i for i in range(len(self.depths))}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = PatchEmbed(self.embed_dim, self.patch_size, name="patch_embed")(x)
    drop_paths = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    features = {}
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      start = sum(self.depths[:s])
      out, x = SwinStage(self.embed_dim * 2 ** s, depth, heads, self.window_size, self.mlp_ratio,
                         tuple(drop_paths[start:start + depth]), downsample=s < len(self.depths) - 1,
                         name=f"layers_{s}")(x, train)
      features[f"res{s + 2}"] = layer_norm(f"norm{s}")(out)
    return features
