"""MaskFormer, ResNet-101 + 6 Enc (transformer-encoder pixel decoder).

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64.

Train:
  python scripts/train.py --config=configs/coco_panoptic_r101.py --workdir=/tmp/coco_panoptic_r101

Expected: COCO val2017 PQ 47.6 (PQ_th 52.5, PQ_st 40.3) (paper Table 3; zoo model_final_57b049.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/maskformer_panoptic_R101_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.resnet_backbone(101), common.transformer_encoder_pixel_decoder(), in_feature='transformer_encoder')
