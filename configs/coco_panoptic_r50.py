"""MaskFormer, ResNet-50 + 6 Enc (transformer-encoder pixel decoder).

COCO panoptic segmentation, 554,400 steps (300 epochs) at batch 64.

Train:
  python scripts/train.py --config=configs/coco_panoptic_r50.py --workdir=/tmp/coco_panoptic_r50

Expected: COCO val2017 PQ 46.5 (PQ_th 51.0, PQ_st 39.8) (paper Table 3; zoo model_final_6f60dc.pkl).
Original: facebookresearch/MaskFormer configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml
"""

from configs import common


def get_config():
  return common.coco_panoptic_config(
      common.resnet_backbone(50), common.transformer_encoder_pixel_decoder(), in_feature='transformer_encoder')
