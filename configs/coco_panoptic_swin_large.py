"""MaskFormer, Swin-L (ImageNet-22k, 384, window 12), FPN pixel decoder.

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64, long side <= 1000 (memory).

Train:
  python scripts/train.py --config=configs/coco_panoptic_swin_large.py --workdir=/tmp/coco_panoptic_swin_large

Expected: COCO val2017 PQ 52.7 (PQ_th 58.5, PQ_st 44.0) (paper Table 3; zoo model_final_7505c4.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/swin/maskformer_panoptic_swin_large_IN21k_384_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.swin_backbone('large'), common.fpn_pixel_decoder(), in_feature='res5', enforce_input_proj=True,
      max_size_train=1000)
