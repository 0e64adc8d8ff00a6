"""MaskFormer, Swin-T (ImageNet-1k, 224).

ADE20K-150 semantic segmentation, 512x512 crops, 160k steps at batch 16.

Train:
  python scripts/train.py --config=configs/ade20k_swin_tiny.py --workdir=/tmp/ade20k_swin_tiny

Multi-scale + flip evaluation (the second number):
  python scripts/evaluate.py --config=configs/ade20k_swin_tiny.py --workdir=/tmp/ade20k_swin_tiny --config.test.aug.enabled=True

Expected: ADE20K-150 val mIoU 46.7 single-scale / 48.8 multi-scale + flip (paper Table 1; zoo model_final_8657a5.pkl).
Original: facebookresearch/MaskFormer configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml
"""

from configs import common


def get_config():
  return common.ade20k_config(common.swin_backbone('tiny'))
