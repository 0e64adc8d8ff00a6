"""MaskFormer, ResNet-101.

Cityscapes-19 semantic segmentation, 512x1024 crops, 90k steps at batch 16.

Train:
  python scripts/train.py --config=configs/cityscapes_r101.py --workdir=/tmp/cityscapes_r101

Multi-scale + flip evaluation (the second number):
  python scripts/evaluate.py --config=configs/cityscapes_r101.py --workdir=/tmp/cityscapes_r101 --config.test.aug.enabled=True

Expected: Cityscapes val mIoU 78.5 single-scale / 80.3 multi-scale + flip (paper appendix; zoo model_final_38c00c.pkl).
Original: facebookresearch/MaskFormer configs/cityscapes-19/maskformer_R101_bs16_90k.yaml
"""

from configs import common


def get_config():
  return common.cityscapes_config(common.resnet_backbone(101))
