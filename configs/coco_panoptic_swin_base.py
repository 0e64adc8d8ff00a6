"""MaskFormer, Swin-B (ImageNet-22k, 384, window 12), FPN pixel decoder.

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64.

Train:
  python scripts/train.py --config=configs/coco_panoptic_swin_base.py --workdir=/tmp/coco_panoptic_swin_base

Expected: COCO val2017 PQ 51.8 (PQ_th 56.9, PQ_st 44.1) (paper Table 3; zoo model_final_4b7f49.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/swin/maskformer_panoptic_swin_base_IN21k_384_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.swin_backbone('base'), common.fpn_pixel_decoder(), in_feature='res5', enforce_input_proj=True)
