"""MaskFormer, Swin-S (ImageNet-1k, 224), FPN pixel decoder.

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64.

Train:
  python scripts/train.py --config=configs/coco_panoptic_swin_small.py --workdir=/tmp/coco_panoptic_swin_small

Expected: COCO val2017 PQ 49.7 (PQ_th 54.4, PQ_st 42.6) (paper Table 3; zoo model_final_5bf6b1.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/swin/maskformer_panoptic_swin_small_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.swin_backbone('small'), common.fpn_pixel_decoder(), in_feature='res5', enforce_input_proj=True)
