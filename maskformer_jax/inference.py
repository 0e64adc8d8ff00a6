"""Test-time preprocessing: resize an image the way the reference test loader does, normalise and pad to /32."""
import numpy as np
from PIL import Image

from maskformer_jax.models import SIZE_DIVISIBILITY, normalize_images


def resize_shortest_edge(image: np.ndarray, short_side: int, max_size: int) -> np.ndarray:
  """Detectron2's `ResizeShortestEdge` at test time: scale so the short side is `short_side` unless the long side
  would exceed `max_size`; bilinear (PIL), rounded sizes. `[H, W, 3]` uint8 -> `[H', W', 3]` uint8."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected an RGB uint8 image [H, W, 3]; got {image.dtype} {image.shape}.")
  h, w = image.shape[:2]
  scale = short_side / min(h, w)
  if max(h, w) * scale > max_size:
    scale = max_size / max(h, w)
  new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def prepare_image(image: np.ndarray, short_side: int = 512, max_size: int = 2048
                  ) -> tuple[np.ndarray, tuple[int, int]]:
  """Resize, normalise with the reference mean/std and zero-pad bottom/right to a multiple of 32.

  Returns the model input `[1, H_pad, W_pad, 3]` float32 and the resized image size `(H, W)` before padding.
  """
  resized = resize_shortest_edge(image, short_side, max_size)
  h, w = resized.shape[:2]
  padded = np.zeros((1, -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) *
                     SIZE_DIVISIBILITY, 3), np.float32)
  padded[0, :h, :w] = normalize_images(resized)
  return padded, (h, w)
