"""MaskFormer, Swin-B (ImageNet-22k, 384, window 12).

ADE20K-150 semantic segmentation, 640x640 crops, 160k steps at batch 16.

Train:
  python scripts/train.py --config=configs/ade20k_swin_base.py --workdir=/tmp/ade20k_swin_base

Multi-scale + flip evaluation (the second number):
  python scripts/evaluate.py --config=configs/ade20k_swin_base.py --workdir=/tmp/ade20k_swin_base --config.test.aug.enabled=True

Expected: ADE20K-150 val mIoU 52.7 single-scale / 53.9 multi-scale + flip (paper Table 1, IN-22k row; zoo
model_final_45388b.pkl).
Original: facebookresearch/MaskFormer configs/ade20k-150/swin/maskformer_swin_base_IN21k_384_bs16_160k_res640.yaml
"""

from configs import common


def get_config():
  return common.ade20k_config(common.swin_backbone('base'), crop_size=640)
