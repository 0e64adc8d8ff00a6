"""MaskFormer, Swin-L (ImageNet-22k, 384, window 12).

ADE20K-150 semantic segmentation, 640x640 crops, 160k steps at batch 16.

Train:
  python scripts/train.py --config=configs/ade20k_swin_large.py --workdir=/tmp/ade20k_swin_large

Multi-scale + flip evaluation (the second number):
  python scripts/evaluate.py --config=configs/ade20k_swin_large.py --workdir=/tmp/ade20k_swin_large --config.test.aug.enabled=True

Expected: ADE20K-150 val mIoU 54.1 single-scale / 55.6 multi-scale + flip (paper Table 1; zoo model_final_aefa3b.pkl).
Original: facebookresearch/MaskFormer configs/ade20k-150/swin/maskformer_swin_large_IN21k_384_bs16_160k_res640.yaml
"""

from configs import common


def get_config():
  return common.ade20k_config(common.swin_backbone('large'), crop_size=640)
