"""MaskFormer, a scaled-down Swin, on the built-in procedural panoptic dataset (`maskformer_shapes`).

Builds the dataset on first use (seconds, nothing downloaded), then trains for 1,500 steps at batch 16 on 64x64
images: about ten minutes on two CPU cores.

Train:
  python scripts/train.py --config=configs/shapes_swin_mini.py --workdir=/tmp/shapes

Expected: the training loss falls from about 40 to well below 10 (see the README for the measured curve).
"""

from configs import common


def get_config():
  return common.shapes_config()
