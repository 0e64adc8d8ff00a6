"""MaskFormer, Swin-T (ImageNet-1k, 224), FPN pixel decoder.

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64.

Train:
  python scripts/train.py --config=configs/coco_panoptic_swin_tiny.py --workdir=/tmp/coco_panoptic_swin_tiny

Expected: COCO val2017 PQ 47.7 (PQ_th 51.7, PQ_st 41.7) (paper Table 3; zoo model_final_539394.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/swin/maskformer_panoptic_swin_tiny_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.swin_backbone('tiny'), common.fpn_pixel_decoder(), in_feature='res5', enforce_input_proj=True)
