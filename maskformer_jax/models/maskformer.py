"""MaskFormer: backbone -> pixel decoder -> transformer predictor -> per-query classes and masks."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.pixel_decoder import PixelDecoder
from maskformer_jax.models.transformer import TransformerPredictor

# Every backbone downsamples by 32 and the FPN doubles sizes exactly, so inputs must be multiples of 32.
SIZE_DIVISIBILITY = 32


def check_images(images) -> None:
  """Raises a ValueError that names the problem and the fix if `images` is not a valid model input."""
  shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"MaskFormer expects images of shape [B, H, W, 3] (channels last); got shape {shape}. "
                     "Transpose NCHW inputs with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"MaskFormer expects float images normalised with the reference mean/std (0..255 scale); got "
                     f"dtype {dtype}. Use maskformer_jax.models.normalize_images(images).")
  if shape[1] % SIZE_DIVISIBILITY or shape[2] % SIZE_DIVISIBILITY:
    raise ValueError(f"Image height and width must be multiples of {SIZE_DIVISIBILITY}; got {shape[1]}x{shape[2]}. "
                     "Pad bottom/right with zeros after normalisation, as the reference does.")


class MaskFormer(nn.Module):
  """The full model.

  `model.apply(variables, images, train=False)` with images float32 `[B, H, W, 3]`, normalised with the reference
  mean/std, H and W multiples of 32. With `train=True` pass `rngs={"dropout": key}` (dropout and drop path).

  Returns a dict with `pred_logits` `[B, Q, K+1]`, `pred_masks` `[B, Q, H/4, W/4]` (mask logits at stride 4) and
  `aux_outputs`: a list of L-1 dicts of the same two entries for decoder layers 1..L-1. Pass `aux_outputs=False`
  (or configure `deep_supervision=False`) when only the final prediction is needed, as in inference: the list is
  then empty and the final masks come from a cheaper, equivalent computation (`PixelEmbeddings.mask_logits`).
  """

  backbone: nn.Module
  pixel_decoder: PixelDecoder
  predictor: TransformerPredictor
  in_feature: str = "res5"
  deep_supervision: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, aux_outputs: bool = True) -> dict:
    check_images(images)
    features = self.backbone(images, train=train)
    pixel_embeddings, encoder_memory = self.pixel_decoder(features, train=train)
    memory = features["res5"] if self.in_feature == "res5" else encoder_memory
    pred_logits, mask_embed = self.predictor(memory, train=train)  # [L, B, Q, K+1], [L, B, Q, mask_dim]
    if not (aux_outputs and self.deep_supervision):
      return {"pred_logits": pred_logits[-1], "pred_masks": pixel_embeddings.mask_logits(mask_embed[-1]),
              "aux_outputs": []}
    features = pixel_embeddings.features()  # [B, H/4, W/4, D]
    batch, height, width, dim = features.shape
    # Batch major and pixels minor on both sides of the product, so the [B, L, Q, H/4 * W/4] logits (the largest
    # tensor of the loss, which stacks the layers on axis 1 again) come out in the layout every consumer reads
    # instead of being transposed in the forward and backward passes.
    pixels_minor = features.reshape(batch, height * width, dim).swapaxes(1, 2)  # [B, D, H/4 * W/4]
    pred_masks = jnp.einsum("lbqd,bdp->blqp", mask_embed, pixels_minor).reshape(
        batch, *mask_embed.shape[::2], height, width)  # [B, L, Q, H/4, W/4]
    aux = [{"pred_logits": pred_logits[i], "pred_masks": pred_masks[:, i]} for i in range(len(pred_logits) - 1)]
    return {"pred_logits": pred_logits[-1], "pred_masks": pred_masks[:, -1], "aux_outputs": aux}
