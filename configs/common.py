"""Shared building blocks for the MaskFormer configs.

Every `configs/<dataset>_<backbone>.py` is a one-liner over the three recipes at the bottom of this file
(`ade20k_config`, `coco_panoptic_config`, `cityscapes_config`), which are in turn assembled from the small
helpers above them. All values are those of the official MaskFormer code (facebookresearch/MaskFormer
`configs/*.yaml`, `mask_former/config.py` and the detectron2 defaults they rely on). Where a value has no
counterpart there (port-only settings such as logging cadence or static shapes) the comment says so.

A config has five sub-configs plus a few top-level fields:
  model    consumed by `maskformer_jax.models.build_model(config.model)`
  loss     matcher/loss weights
  solver   optimizer, LR schedule, clipping, step counts, checkpoint/log/eval cadence
  data     dataset name, training augmentations, static shapes
  test     test-time resize and inference thresholds, multi-scale TTA
  seed, mesh, pretrained_backbone

The config files import this module as `configs.common`, so the repository root must be on `sys.path`
(true for `python -m ...` run from the root; scripts/*.py must insert it, as `python scripts/x.py` does not).
"""

import math

import ml_collections

# The model schema lives in the package so that checkpoint converters build the same configs; the config files
# reach these helpers as `common.resnet_backbone(50)` etc.
from maskformer_jax.models.config import (fpn_pixel_decoder, model_config, resnet_backbone,  # noqa: F401
                                          swin_backbone, transformer_encoder_pixel_decoder)

ConfigDict = ml_collections.ConfigDict

# ----------------------------------------------------------------------------------------------------------------
# Model (reference section 1).
# ----------------------------------------------------------------------------------------------------------------

# Pretrained ImageNet checkpoints the paper starts from (detectron2 .pkl naming).
_SWIN_WEIGHTS = {
    'tiny': 'swin_tiny_patch4_window7_224.pkl',
    'small': 'swin_small_patch4_window7_224.pkl',
    'base': 'swin_base_patch4_window12_384_22k.pkl',
    'large': 'swin_large_patch4_window12_384_22k.pkl',
}


def pretrained_backbone(backbone: ConfigDict) -> str:
  """File name of the ImageNet checkpoint MaskFormer initialises `backbone` from (detectron2 .pkl naming), or ''
  for a backbone no released checkpoint fits (trained from scratch)."""
  if backbone.name == 'resnet':
    return f'R-{backbone.depth}.pkl'
  for variant, weights in _SWIN_WEIGHTS.items():
    if swin_backbone(variant) == backbone:
      return weights
  return ''


# ----------------------------------------------------------------------------------------------------------------
# Loss and matcher (reference section 2).
# ----------------------------------------------------------------------------------------------------------------

def loss_config() -> ConfigDict:
  """Keyword arguments of `maskformer_jax.losses.maskformer_loss`, one for one."""
  return ConfigDict(dict(
      # Weights of the three terms, used both as matching costs and as loss weights.
      class_weight=1.0,
      mask_weight=20.0,  # sigmoid focal loss
      dice_weight=1.0,
      no_object_weight=0.1,  # CE weight of the "no object" class (real classes get 1.0)
      match_class_weight=ml_collections.FieldReference(None, field_type=float),  # None: class_weight (MaskFormer)
      focal_alpha=0.25,
      focal_gamma=2.0,
      # Where the Hungarian matching runs: 'host' (scipy through a callback, as MaskFormer; best on CPU and GPU
      # for full-size steps) or 'device' (the exact in-graph solver; best on TPU, where a host round trip is
      # costly, and for steps short enough that dispatch matters: a callback makes XLA:CPU run the step
      # synchronously, so Python's ~10 ms of dispatch per step no longer overlaps the previous step).
      matcher='host',
  ))


# ----------------------------------------------------------------------------------------------------------------
# Solver (reference section 3).
# ----------------------------------------------------------------------------------------------------------------

# Per backbone family: LR, weight decay, backbone LR multiplier and warmup.
_OPTIMIZER_RECIPES = {
    'resnet': dict(base_lr=1e-4, weight_decay=1e-4, backbone_multiplier=0.1, warmup_factor=1.0),
    'swin': dict(base_lr=6e-5, weight_decay=0.01, backbone_multiplier=1.0, warmup_factor=1e-6, warmup_steps=1500),
}


def solver_config(backbone: ConfigDict, *, batch_size: int, max_steps: int, lr_schedule: str, steps=(),
                  warmup_steps: int = 0, eval_every: int = 5000) -> ConfigDict:
  """AdamW with full-model gradient clipping, LR recipe picked by backbone family.

  warmup_steps is the dataset's default, used by the ResNet recipe (always with warmup_factor 1.0, i.e. a
  constant LR); the Swin recipe always warms up linearly from 1e-6 x base_lr over 1500 steps.
  """
  if lr_schedule not in ('poly', 'step') or (lr_schedule == 'step') != bool(steps):
    raise ValueError(f'lr_schedule {lr_schedule!r} with steps {steps!r}')
  recipe = _OPTIMIZER_RECIPES[backbone.name]
  return ConfigDict(dict(
      # AdamW (torch defaults); decoupled weight decay, none on norms, the query embedding and Swin's
      # relative-position tables (biases do get weight decay).
      optimizer='adamw', base_lr=recipe['base_lr'], betas=(0.9, 0.999), eps=1e-8,
      weight_decay=recipe['weight_decay'], weight_decay_norm=0.0, weight_decay_embed=0.0,
      backbone_multiplier=recipe['backbone_multiplier'],  # LR factor for every parameter under the backbone
      clip_norm=0.01,  # max global L2 norm over all parameters together
      batch_size=batch_size,  # global batch over all devices
      max_steps=max_steps,
      # lr = base_lr * warmup * decay: warmup ramps linearly from warmup_factor to 1 over warmup_steps; decay is
      # 'poly': (1 - step / max_steps)^poly_power, or 'step': gamma^(number of `steps` passed).
      lr_schedule=lr_schedule, poly_power=0.9, steps=tuple(steps), gamma=0.1,
      warmup_steps=recipe.get('warmup_steps', warmup_steps), warmup_factor=recipe['warmup_factor'],
      # Bookkeeping (port-only; detectron2 checkpoints every 5000 and logs every 20 iterations). eval_every: the
      # validation loss; metrics_every: full metrics (as scripts/evaluate.py), 0 = only after the last step.
      checkpoint_every=5000, keep_checkpoints=3, log_every=20, eval_every=eval_every, metrics_every=0,
  ))


# ----------------------------------------------------------------------------------------------------------------
# Data and test (reference sections 4 and 5).
# ----------------------------------------------------------------------------------------------------------------

def short_side_choices(base_size: int, min_scale: float = 0.5, max_scale: float = 2.0) -> tuple:
  """Training short sides `int(k * 0.1 * base_size)` for k = 10*min_scale .. 10*max_scale (detectron2's
  "choice" sampling in MaskFormer's yaml files); e.g. 512 -> (256, 307, 358, ..., 972, 1024)."""
  return tuple(int(k * 0.1 * base_size) for k in range(round(min_scale * 10), round(max_scale * 10) + 1))


def tta_config(min_sizes, max_size: int) -> ConfigDict:
  """Multi-scale + flip test-time augmentation (off by default; enable for the "m.s." numbers)."""
  return ConfigDict(dict(enabled=False, min_sizes=tuple(min_sizes), max_size=max_size, flip=True))


def tta_short_sides(base_size: int) -> tuple:
  """0.5x, 0.75x, ..., 1.75x of the test short side, e.g. 512 -> (256, 384, 512, 640, 768, 896)."""
  return tuple(int(base_size * s) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75))


def data_config(*, dataset: str, task: str, num_classes, ignore_label: int = 255, crop_size, crop_type: str,
                min_size_train, max_size_train: int, color_aug_ssd: bool, size_divisibility: int,
                train_image_size, max_segments: int) -> ConfigDict:
  return ConfigDict(dict(
      dataset=dataset,  # TFDS name, optionally with a builder config: 'maskformer_shapes/tiny'
      data_dir='',  # TFDS data directory; '' is TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
      train_split='train', eval_split='validation',
      task=task,  # 'semantic' or 'panoptic'
      num_classes=num_classes,  # excludes "no object"; linked to model.num_classes
      ignore_label=ignore_label,
      # Normalisation, RGB on the 0..255 scale.
      pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
      # Training augmentation. Semantic: short-side resize to a random choice of min_size_train (long side capped
      # at max_size_train), random crop, SSD colour jitter, horizontal flip. COCO panoptic (DETR recipe): flip,
      # then the same resize, optionally preceded by the DETR crop branch; no colour jitter.
      random_flip=True,
      min_size_train=tuple(min_size_train), max_size_train=max_size_train,
      # 'absolute': fixed (h, w) crop (never larger than the image). 'absolute_range' (COCO): crop_size is the
      # (min, max) side length of a random crop inside the DETR crop branch below.
      crop_type=crop_type, crop_size=tuple(crop_size),
      color_aug_ssd=color_aug_ssd,
      # Pad each training image bottom/right to exactly this size (-1: no padding in the mapper); the image is
      # padded with image_pad_value (before normalisation), the labels with ignore_label.
      size_divisibility=size_divisibility, image_pad_value=128,
      # Port-only static shapes: every training image is padded to train_image_size (h, w), and its targets to
      # max_segments masks (the rest marked invalid).
      train_image_size=tuple(train_image_size), max_segments=max_segments,
      shuffle_buffer=10_000, seed=0,
  ))


def inference_config(*, min_size_test: int, max_size_test: int, panoptic_on: bool, object_mask_threshold: float,
                     overlap_threshold: float, size_divisibility: int, aug: ConfigDict) -> ConfigDict:
  return ConfigDict(dict(
      # Resize the short side to min_size_test (long side capped at max_size_test); whole-image inference on
      # images padded to a multiple of size_divisibility (0: no padding beyond the batch maximum).
      min_size_test=min_size_test, max_size_test=max_size_test, size_divisibility=size_divisibility,
      # Which outputs to produce (MaskFormer has no instance inference; kept for Mask2Former-style code).
      semantic_on=not panoptic_on, panoptic_on=panoptic_on, instance_on=False,
      # Panoptic inference: keep queries with score > object_mask_threshold whose visible part is at least
      # overlap_threshold of their own mask. MaskFormer resizes mask logits to the image before inference then.
      object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold,
      sem_seg_postprocess_before_inference=panoptic_on,
      detections_per_image=100,
      aug=aug,
      # Pictures (prediction over ground truth) of the first validation images that training writes at its end.
      num_pictures=0,
  ))


def full_config(*, model: ConfigDict, solver: ConfigDict, data: ConfigDict, test: ConfigDict) -> ConfigDict:
  return ConfigDict(dict(
      model=model, loss=loss_config(), solver=solver, data=data, test=test,
      seed=0,
      # Device mesh as ((axis_name, size), ...); -1 takes all remaining devices. Add e.g. ('fsdp', 2) for
      # parameter sharding: --config.mesh="(('data',-1),('fsdp',2))".
      mesh=(('data', -1),),
      pretrained_backbone=pretrained_backbone(model.backbone),  # detectron2 .pkl name of the ImageNet weights
  ))


# ----------------------------------------------------------------------------------------------------------------
# Recipes, one per dataset.
# ----------------------------------------------------------------------------------------------------------------

def ade20k_config(backbone: ConfigDict, crop_size: int = 512) -> ConfigDict:
  """ADE20K-150 semantic: 160k steps at batch 16, poly LR, square crops (512, or 640 for Swin-B/L)."""
  num_classes = ml_collections.FieldReference(150)
  return full_config(
      model=model_config(num_classes, backbone, fpn_pixel_decoder()),
      solver=solver_config(backbone, batch_size=16, max_steps=160_000, lr_schedule='poly'),
      data=data_config(
          dataset='ade20k_150', task='semantic', num_classes=num_classes,
          crop_type='absolute', crop_size=(crop_size, crop_size),
          min_size_train=short_side_choices(crop_size), max_size_train=4 * crop_size, color_aug_ssd=True,
          size_divisibility=crop_size, train_image_size=(crop_size, crop_size), max_segments=100),
      test=inference_config(
          min_size_test=crop_size, max_size_test=4 * crop_size, size_divisibility=32,
          panoptic_on=False, object_mask_threshold=0.0, overlap_threshold=0.0,
          aug=tta_config(tta_short_sides(crop_size), max_size=7 * crop_size)),
  )


def cityscapes_config(backbone: ConfigDict) -> ConfigDict:
  """Cityscapes-19 semantic: 90k steps at batch 16, poly LR, 512x1024 crops of images resized to 0.5-2x."""
  num_classes = ml_collections.FieldReference(19)
  return full_config(
      model=model_config(num_classes, backbone, fpn_pixel_decoder()),
      solver=solver_config(backbone, batch_size=16, max_steps=90_000, lr_schedule='poly'),
      data=data_config(
          dataset='cityscapes', task='semantic', num_classes=num_classes,
          crop_type='absolute', crop_size=(512, 1024),
          min_size_train=short_side_choices(1024), max_size_train=4096, color_aug_ssd=True,
          size_divisibility=-1, train_image_size=(512, 1024), max_segments=19),
      test=inference_config(
          min_size_test=1024, max_size_test=2048, size_divisibility=32,
          panoptic_on=False, object_mask_threshold=0.0, overlap_threshold=0.0,
          aug=tta_config(tta_short_sides(1024), max_size=4096)),
  )


def coco_panoptic_config(backbone: ConfigDict, pixel_decoder: ConfigDict, in_feature: str,
                         enforce_input_proj: bool = False, max_size_train: int = 1333) -> ConfigDict:
  """COCO panoptic (133 classes): 554,400 steps (300 epochs) at batch 64, LR x0.1 at step 369,600, DETR augs."""
  num_classes = ml_collections.FieldReference(133)
  data = data_config(
      dataset='coco/2017_panoptic', task='panoptic', num_classes=num_classes,
      crop_type='absolute_range', crop_size=(384, 600),
      min_size_train=range(480, 801, 32), max_size_train=max_size_train, color_aug_ssd=False,
      size_divisibility=-1, max_segments=100,
      # No fixed crop: pad to a square that holds any resized image (port-only).
      train_image_size=(32 * math.ceil(max_size_train / 32),) * 2)
  # DETR crop branch: with probability detr_crop_prob, before the final resize, resize the short side to one of
  # detr_crop_min_sizes and take a random crop_size-range crop.
  data.detr_crop_prob = 0.5
  data.detr_crop_min_sizes = (400, 500, 600)
  return full_config(
      model=model_config(num_classes, backbone, pixel_decoder, in_feature, enforce_input_proj),
      solver=solver_config(backbone, batch_size=64, max_steps=554_400, lr_schedule='step', steps=(369_600,),
                           warmup_steps=10, eval_every=55_440),
      data=data,
      # detectron2 test defaults; MaskFormer's TTA only averages semantic maps, so it does not apply here.
      test=inference_config(
          min_size_test=800, max_size_test=1333, size_divisibility=0,
          panoptic_on=True, object_mask_threshold=0.8, overlap_threshold=0.8,
          aug=tta_config(range(400, 1201, 100), max_size=4000)),
  )


def shapes_config() -> ConfigDict:
  """The built-in procedural panoptic dataset (`maskformer_shapes`, 64x64 images) with a model small enough to
  learn it in about ten minutes on two CPU cores: a 4-stage Swin of width 32, a 64-channel FPN and a 3-layer
  decoder with 20 queries. The architecture is MaskFormer's; only the sizes are scaled down."""
  num_classes = ml_collections.FieldReference(8)
  backbone = ConfigDict(dict(name='swin', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                             mlp_ratio=4.0, drop_path_rate=0.0, patch_size=4, pretrain_img_size=64))
  pixel_decoder = fpn_pixel_decoder(conv_dim=64, mask_dim=64)
  pixel_decoder.num_groups = 8
  solver = solver_config(backbone, batch_size=16, max_steps=2500, lr_schedule='poly', eval_every=500)
  # From scratch and short: a higher LR and a short warmup instead of Swin's 1500 steps from 1e-6.
  solver.update(dict(base_lr=5e-4, warmup_steps=50, warmup_factor=0.01, checkpoint_every=500, log_every=10))
  config = full_config(
      model=model_config(num_classes, backbone, pixel_decoder, num_queries=20, hidden_dim=64, num_heads=4,
                         dim_feedforward=128, dropout=0.0, num_layers=3),
      solver=solver,
      data=data_config(
          dataset='maskformer_shapes', task='panoptic', num_classes=num_classes,
          crop_type='absolute', crop_size=(64, 64),
          min_size_train=short_side_choices(64, 0.8, 1.5), max_size_train=256, color_aug_ssd=True,
          size_divisibility=64, train_image_size=(64, 64), max_segments=16),
      test=inference_config(
          min_size_test=64, max_size_test=256, size_divisibility=32,
          # 0.7: the reference's ADE20K-panoptic value (COCO's is 0.8).
          panoptic_on=True, object_mask_threshold=0.7, overlap_threshold=0.8,
          aug=tta_config(tta_short_sides(64), max_size=448)),
  )
  config.test.num_pictures = 4
  config.loss.matcher = 'device'  # 8% faster steps here than 'host' (see loss_config)
  return config
