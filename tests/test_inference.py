"""Test-time preprocessing against hand-computed Detectron2 `ResizeShortestEdge` results."""
import numpy as np
import pytest

from maskformer_jax.inference import prepare_image, resize_shortest_edge
from maskformer_jax.models import PIXEL_MEAN, PIXEL_STD


@pytest.mark.parametrize("shape,short,max_size,expected", [
    ((400, 600), 512, 2048, (512, 768)),   # short side to 512
    ((600, 400), 512, 2048, (768, 512)),
    ((100, 1000), 512, 2048, (205, 2048)),  # 512 / 100 would make the long side 5120 > 2048: cap it
    ((512, 512), 512, 2048, (512, 512)),
])
def test_resize_shortest_edge(shape, short, max_size, expected):
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
  assert resize_shortest_edge(image, short, max_size).shape == (*expected, 3)


def test_prepare_image_normalises_and_zero_pads_to_32():
  batch, size = prepare_image(np.full((100, 150, 3), 200, np.uint8), short_side=200, max_size=1333)
  assert size == (200, 300) and batch.shape == (1, 224, 320, 3) and batch.dtype == np.float32
  expected = (200 - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
  np.testing.assert_allclose(batch[0, :200, :300], np.broadcast_to(expected, (200, 300, 3)), rtol=1e-6)
  assert not batch[0, 200:].any() and not batch[0, :, 300:].any()  # padding is 0 after normalisation


def test_prepare_image_refuses_non_rgb_uint8():
  with pytest.raises(ValueError, match="RGB uint8"):
    prepare_image(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match="RGB uint8"):
    prepare_image(np.zeros((64, 64, 3), np.float32))
