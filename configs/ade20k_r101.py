"""MaskFormer, ResNet-101.

ADE20K-150 semantic segmentation, 512x512 crops, 160k steps at batch 16.

Train:
  python scripts/train.py --config=configs/ade20k_r101.py --workdir=/tmp/ade20k_r101

Multi-scale + flip evaluation (the second number):
  python scripts/evaluate.py --config=configs/ade20k_r101.py --workdir=/tmp/ade20k_r101 --config.test.aug.enabled=True

Expected: ADE20K-150 val mIoU 45.5 single-scale / 47.2 multi-scale + flip (paper Table 1; zoo model_final_1aeb94.pkl).
Original: facebookresearch/MaskFormer configs/ade20k-150/maskformer_R101_bs16_160k.yaml
"""

from configs import common


def get_config():
  return common.ade20k_config(common.resnet_backbone(101))
