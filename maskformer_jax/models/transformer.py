"""DETR-style post-norm transformer layers and the MaskFormer transformer predictor.

Follows the reference (`transformer.py` / `transformer_predictor.py` of facebookresearch/MaskFormer): attention
with PyTorch `nn.MultiheadAttention` semantics (fused in-projection), positions added to queries and keys but
never to values, post-norm residual blocks, one shared decoder LayerNorm producing every layer's output.
Sequences are `[B, L, C]`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.layers import Conv2d, Dense, layer_norm, matmul, sine_position_encoding


class MultiHeadAttention(nn.Module):
  """PyTorch `nn.MultiheadAttention`: `in_proj_kernel` `[E, 3E]` (q, k, v blocks), scaled dot product, `out_proj`.

  query `[B, Lq, E]`, key and value `[B, Lk, E]` -> `[B, Lq, E]`. Attention weights get dropout when training.
  """

  embed_dim: int
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, train: bool) -> jax.Array:
    e, h = self.embed_dim, self.num_heads
    kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (e, 3 * e))
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,))

    def project(x: jax.Array, i: int) -> jax.Array:
      y = matmul(x, kernel[:, i * e:(i + 1) * e]) + bias[i * e:(i + 1) * e]
      # [B, L, E] -> [B, heads, L, head_dim]: heads-first batched matmuls are much faster on XLA:CPU.
      return y.reshape(*x.shape[:-1], h, e // h).swapaxes(-2, -3)

    q = project(query, 0) * (e // h) ** -0.5
    k, v = project(key, 1), project(value, 2)
    attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
    attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).swapaxes(-2, -3).reshape(*query.shape[:-1], e)
    return Dense(e, name="out_proj")(out)


class _PostNormLayer(nn.Module):
  """Shared post-norm residual pieces of the encoder and decoder layers (attention and FFN sub-blocks)."""

  d_model: int
  num_heads: int
  dim_feedforward: int
  dropout: float

  def attention_block(self, x, query, key, value, name: str, norm: str, train: bool) -> jax.Array:
    y = MultiHeadAttention(self.d_model, self.num_heads, self.dropout, name=name)(query, key, value, train)
    return layer_norm(norm)(x + nn.Dropout(self.dropout)(y, deterministic=not train))

  def feedforward_block(self, x, norm: str, train: bool) -> jax.Array:
    y = nn.relu(Dense(self.dim_feedforward, name="linear1")(x))
    y = Dense(self.d_model, name="linear2")(nn.Dropout(self.dropout)(y, deterministic=not train))
    return layer_norm(norm)(x + nn.Dropout(self.dropout)(y, deterministic=not train))


class EncoderLayer(_PostNormLayer):
  """Self-attention (q = k = src + pos, v = src) then FFN, each post-normed. `[B, L, C]` -> `[B, L, C]`."""

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, train: bool) -> jax.Array:
    qk = src + pos
    src = self.attention_block(src, qk, qk, src, "self_attn", "norm1", train)
    return self.feedforward_block(src, "norm2", train)


class DecoderLayer(_PostNormLayer):
  """Self-attention over queries, cross-attention to the memory, FFN; each post-normed. `[B, Q, C]` out."""

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, query_pos: jax.Array, pos: jax.Array, train: bool
               ) -> jax.Array:
    qk = tgt + query_pos
    tgt = self.attention_block(tgt, qk, qk, tgt, "self_attn", "norm1", train)
    tgt = self.attention_block(tgt, tgt + query_pos, memory + pos, memory, "multihead_attn", "norm2", train)
    return self.feedforward_block(tgt, "norm3", train)


class TransformerEncoder(nn.Module):
  """`num_layers` post-norm encoder layers with no final norm. `[B, L, C]` -> `[B, L, C]`."""

  num_layers: int
  d_model: int
  num_heads: int
  dim_feedforward: int
  dropout: float

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_layers):
      src = EncoderLayer(self.d_model, self.num_heads, self.dim_feedforward, self.dropout,
                         name=f"layers_{i}")(src, pos, train)
    return src


class TransformerDecoder(nn.Module):
  """`num_layers` post-norm decoder layers; the shared `norm` is applied to every layer's output.

  The un-normalised state feeds the next layer, as in DETR. Returns `[num_layers, B, Q, C]`.
  """

  num_layers: int
  d_model: int
  num_heads: int
  dim_feedforward: int
  dropout: float

  @nn.compact
  def __call__(self, tgt, memory, query_pos, pos, train: bool) -> jax.Array:
    norm = layer_norm("norm")
    outputs = []
    for i in range(self.num_layers):
      tgt = DecoderLayer(self.d_model, self.num_heads, self.dim_feedforward, self.dropout,
                         name=f"layers_{i}")(tgt, memory, query_pos, pos, train)
      outputs.append(norm(tgt))
    return jnp.stack(outputs)


class MLP(nn.Module):
  """Linear layers with ReLU between them (not after the last): `[..., C]` -> `[..., features[-1]]`."""

  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = Dense(f, name=f"layers_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class TransformerPredictor(nn.Module):
  """Queries -> decoder -> class logits and mask embeddings, for every decoder layer.

  Args (call):
    x: `[B, h, w, C_in]` decoder memory (res5 or the pixel decoder's encoder output, stride 32).
  Returns:
    `pred_logits` `[L, B, Q, K+1]` and mask embeddings `[L, B, Q, mask_dim]` for the L decoder layers
    (last = final); a mask embedding dotted with the per-pixel embeddings gives that query's mask logits.
  """

  num_classes: int
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  dropout: float = 0.1
  num_layers: int = 6
  mask_dim: int = 256
  enforce_input_proj: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    batch, height, width, channels = x.shape
    if channels != self.hidden_dim or self.enforce_input_proj:
      x = Conv2d(self.hidden_dim, 1, name="input_proj", kernel_init=nn.initializers.xavier_uniform())(x)
    memory = x.reshape(batch, height * width, self.hidden_dim)
    pos = jnp.asarray(sine_position_encoding(height, width, self.hidden_dim // 2).reshape(1, height * width, -1))
    query_pos = nn.Embed(self.num_queries, self.hidden_dim, name="query_embed",
                         embedding_init=nn.initializers.normal(1.0)).embedding
    query_pos = jnp.broadcast_to(query_pos[None], (batch, self.num_queries, self.hidden_dim))
    tgt = jnp.zeros_like(query_pos)  # DETR: content queries start at zero, the learned part is positional.
    hs = TransformerDecoder(self.num_layers, self.hidden_dim, self.num_heads, self.dim_feedforward, self.dropout,
                            name="decoder")(tgt, memory, query_pos, pos, train)
    pred_logits = Dense(self.num_classes + 1, name="class_embed")(hs)
    mask_embed = MLP((self.hidden_dim, self.hidden_dim, self.mask_dim), name="mask_embed")(hs)
    return pred_logits, mask_embed
