"""The configs in configs/ load like a script loads them, follow the schema, and hold the paper's values."""

import pathlib
import sys

from absl import flags
from ml_collections import config_flags
import pytest

# config_flags loads config files with the deprecated loader.load_module().
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the config files import `configs.common`, as the scripts arrange

CONFIG_FILES = sorted(p.name for p in (REPO / 'configs').glob('*.py') if p.name not in ('common.py', '__init__.py'))
# The paper's settings; shapes_swin_mini.py is the built-in dataset's scaled-down recipe.
PAPER_CONFIG_FILES = [name for name in CONFIG_FILES if not name.startswith('shapes_')]


def load(name, *overrides):
  """Parses `--config=configs/<name> [overrides]` the way scripts/*.py do (fresh FlagValues, locked config)."""
  argv = ['prog', f'--config={REPO / "configs" / name}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', lock_config=True, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _check_types(section, schema):
  for key, expected in schema.items():
    assert isinstance(section[key], expected), (key, section[key])
    if expected is tuple:
      assert section[key] == tuple(section[key])


MODEL = dict(num_classes=int, num_queries=int, deep_supervision=bool)
TRANSFORMER = dict(hidden_dim=int, num_heads=int, dim_feedforward=int, dropout=float, num_layers=int,
                   in_feature=str, enforce_input_proj=bool)
PIXEL_DECODER = dict(name=str, conv_dim=int, mask_dim=int, num_groups=int)
ENCODER = dict(num_layers=int, num_heads=int, dim_feedforward=int, dropout=float)
RESNET = dict(name=str, depth=int)
SWIN = dict(name=str, embed_dim=int, depths=tuple, num_heads=tuple, window_size=int, mlp_ratio=float,
            drop_path_rate=float, patch_size=int, pretrain_img_size=int)
LOSS = dict(class_weight=float, mask_weight=float, dice_weight=float, no_object_weight=float, matcher=str,
            match_class_weight=(float, type(None)))
SOLVER = dict(optimizer=str, base_lr=float, weight_decay=float, weight_decay_norm=float, weight_decay_embed=float,
              backbone_multiplier=float, betas=tuple, eps=float, batch_size=int, max_steps=int, lr_schedule=str,
              poly_power=float, warmup_steps=int, warmup_factor=float, steps=tuple, gamma=float, clip_norm=float,
              checkpoint_every=int, keep_checkpoints=int, log_every=int, eval_every=int, metrics_every=int)
DATA = dict(dataset=str, task=str, num_classes=int, ignore_label=int, crop_size=tuple, crop_type=str,
            min_size_train=tuple, max_size_train=int, color_aug_ssd=bool, random_flip=bool, size_divisibility=int,
            image_pad_value=int, max_segments=int, train_image_size=tuple, shuffle_buffer=int, seed=int, data_dir=str)
TEST = dict(min_size_test=int, max_size_test=int, semantic_on=bool, panoptic_on=bool, instance_on=bool,
            object_mask_threshold=float, overlap_threshold=float, detections_per_image=int, num_pictures=int)
TTA = dict(enabled=bool, min_sizes=tuple, max_size=int, flip=bool)


def test_all_settings_present():
  expected = [f'ade20k_{b}.py' for b in ('r50', 'r101', 'swin_tiny', 'swin_small', 'swin_base', 'swin_large')]
  expected += [f'coco_panoptic_{b}.py' for b in ('r50', 'r101', 'swin_tiny', 'swin_small', 'swin_base', 'swin_large')]
  expected += ['cityscapes_r101.py', 'shapes_swin_mini.py']
  assert sorted(expected) == CONFIG_FILES


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_schema(name):
  config = load(name)
  model = config.model
  _check_types(model, MODEL)
  _check_types(model.transformer, TRANSFORMER)
  _check_types(model.pixel_decoder, PIXEL_DECODER)
  if model.pixel_decoder.name == 'transformer_encoder':
    _check_types(model.pixel_decoder, ENCODER)
  else:
    assert model.pixel_decoder.name == 'fpn' and set(model.pixel_decoder) == set(PIXEL_DECODER)
  backbone_schema = {'resnet': RESNET, 'swin': SWIN}[model.backbone.name]
  assert set(model.backbone) == set(backbone_schema)  # only that backbone's fields
  _check_types(model.backbone, backbone_schema)
  assert model.transformer.in_feature in ('res5', 'transformer_encoder')
  if model.transformer.in_feature == 'transformer_encoder':
    assert model.pixel_decoder.name == 'transformer_encoder'

  _check_types(config.loss, LOSS)
  assert config.loss.matcher in ('host', 'device')
  _check_types(config.solver, SOLVER)
  assert config.solver.lr_schedule in ('poly', 'step')
  assert (config.solver.lr_schedule == 'step') == bool(config.solver.steps)
  assert all(0 < s < config.solver.max_steps for s in config.solver.steps)
  _check_types(config.data, DATA)
  assert config.data.task in ('semantic', 'panoptic')
  assert config.data.num_classes == model.num_classes
  assert config.data.max_segments <= model.num_queries
  _check_types(config.test, TEST)
  _check_types(config.test.aug, TTA)
  assert not config.test.aug.enabled
  assert config.test.panoptic_on == (config.data.task == 'panoptic')
  assert isinstance(config.seed, int) and isinstance(config.pretrained_backbone, str)
  assert config.mesh[0] == ('data', -1)

  # The docstring is the user's entry point: the command and the expected number.
  doc = (REPO / 'configs' / name).read_text()
  assert f'python scripts/train.py --config=configs/{name}' in doc
  assert 'Expected:' in doc


@pytest.mark.parametrize('name', PAPER_CONFIG_FILES)
def test_family_values(name):
  config = load(name)
  solver, data, model = config.solver, config.data, config.model
  assert solver.optimizer == 'adamw' and solver.clip_norm == 0.01 and solver.betas == (0.9, 0.999)
  if model.backbone.name == 'resnet':
    assert (solver.base_lr, solver.weight_decay, solver.backbone_multiplier) == (1e-4, 1e-4, 0.1)
    assert solver.warmup_factor == 1.0
  else:
    assert (solver.base_lr, solver.weight_decay, solver.backbone_multiplier) == (6e-5, 0.01, 1.0)
    assert (solver.warmup_steps, solver.warmup_factor) == (1500, 1e-6)
    assert model.backbone.drop_path_rate == 0.3
  if name.startswith('ade20k'):
    assert (model.num_classes, data.ignore_label, solver.batch_size, solver.max_steps) == (150, 255, 16, 160_000)
    assert solver.lr_schedule == 'poly' and solver.poly_power == 0.9
    crop = 640 if name.endswith(('swin_base.py', 'swin_large.py')) else 512
    assert data.crop_size == (crop, crop) and data.size_divisibility == crop
    assert data.min_size_train[0] == crop // 2 and data.min_size_train[-1] == 2 * crop
    assert len(data.min_size_train) == 16 and data.max_size_train == 4 * crop
    assert (config.test.min_size_test, config.test.max_size_test) == (crop, 4 * crop)
  elif name.startswith('coco_panoptic'):
    assert (model.num_classes, solver.batch_size, solver.max_steps) == (133, 64, 554_400)
    assert solver.lr_schedule == 'step' and solver.steps == (369_600,) and solver.gamma == 0.1
    assert data.min_size_train == tuple(range(480, 801, 32)) and not data.color_aug_ssd
    assert (data.detr_crop_prob, data.detr_crop_min_sizes, data.crop_size) == (0.5, (400, 500, 600), (384, 600))
    assert data.max_size_train == (1000 if name.endswith('swin_large.py') else 1333)
    assert (config.test.object_mask_threshold, config.test.overlap_threshold) == (0.8, 0.8)
    assert (config.test.min_size_test, config.test.max_size_test) == (800, 1333)
    if model.backbone.name == 'resnet':  # "+6 Enc"
      assert model.pixel_decoder.name == 'transformer_encoder'
      assert model.transformer.in_feature == 'transformer_encoder'
      assert (solver.warmup_steps, model.pixel_decoder.num_layers) == (10, 6)
    else:
      assert model.pixel_decoder.name == 'fpn' and model.transformer.in_feature == 'res5'
      assert model.transformer.enforce_input_proj
  else:
    assert (model.num_classes, solver.batch_size, solver.max_steps, solver.lr_schedule) == (19, 16, 90_000, 'poly')
    assert data.crop_size == (512, 1024) and data.min_size_train[0] == 512 and data.min_size_train[-1] == 2048


def test_spot_values():
  ade = load('ade20k_r50.py')
  assert ade.data.min_size_train[:3] == (256, 307, 358) and ade.data.min_size_train[-2:] == (972, 1024)
  assert ade.test.aug.min_sizes == (256, 384, 512, 640, 768, 896) and ade.test.aug.max_size == 3584
  assert ade.model.backbone.depth == 50 and ade.pretrained_backbone == 'R-50.pkl'
  assert (ade.loss.mask_weight, ade.loss.dice_weight, ade.loss.no_object_weight) == (20.0, 1.0, 0.1)

  swin_b = load('ade20k_swin_base.py').model.backbone
  assert (swin_b.embed_dim, swin_b.window_size, swin_b.pretrain_img_size) == (128, 12, 384)
  assert swin_b.depths == (2, 2, 18, 2) and swin_b.num_heads == (4, 8, 16, 32)
  swin_t = load('ade20k_swin_tiny.py')
  assert swin_t.model.backbone.depths == (2, 2, 6, 2) and swin_t.model.backbone.window_size == 7
  assert swin_t.pretrained_backbone == 'swin_tiny_patch4_window7_224.pkl'
  swin_l = load('coco_panoptic_swin_large.py')
  assert swin_l.model.backbone.embed_dim == 192 and swin_l.model.backbone.num_heads == (6, 12, 24, 48)
  assert swin_l.data.train_image_size == (1024, 1024)

  city = load('cityscapes_r101.py')
  assert city.test.aug.min_sizes == (512, 768, 1024, 1280, 1536, 1792) and city.test.aug.max_size == 4096
  assert (city.test.min_size_test, city.test.max_size_test, city.data.size_divisibility) == (1024, 2048, -1)


def test_built_in_dataset_recipe():
  shapes = load('shapes_swin_mini.py')
  assert shapes.data.dataset == 'maskformer_shapes' and shapes.data.task == 'panoptic'
  assert shapes.model.num_classes == shapes.data.num_classes == 8  # 5 thing and 3 stuff classes
  assert shapes.data.max_segments <= shapes.model.num_queries  # every target can have its own query
  assert shapes.pretrained_backbone == ''  # trained from scratch: nothing to download
  assert shapes.model.backbone.name == 'swin' and shapes.data.crop_size == shapes.data.train_image_size


def test_overrides():
  config = load('ade20k_r50.py', '--config.model.num_queries=50', '--config.model.backbone.depth=101',
                '--config.solver.base_lr=2e-4', '--config.test.aug.enabled=True')
  assert config.model.num_queries == 50 and config.model.backbone.depth == 101
  assert config.solver.base_lr == 2e-4 and config.test.aug.enabled
  # data.num_classes follows model.num_classes (one FieldReference).
  assert load('ade20k_r50.py', '--config.model.num_classes=19').data.num_classes == 19
  mesh = load('ade20k_r50.py', "--config.mesh=(('data',-1),('fsdp',2))").mesh
  assert mesh == (('data', -1), ('fsdp', 2))


def test_unknown_key_is_an_error():
  # config_flags (ml-collections 1.1.0) lets the AttributeError of the locked ConfigDict escape during parsing;
  # it is not an absl flags error, so absl.app prints a traceback rather than a usage message.
  with pytest.raises(AttributeError, match='no_such_key'):
    load('ade20k_r50.py', '--config.model.no_such_key=1')


@pytest.mark.parametrize('override', ['--config.model.num_queries=abc', '--config.model.num_queries=1.5',
                                      '--config.model.deep_supervision=maybe'])
def test_wrongly_typed_override_is_an_error(override):
  with pytest.raises(flags.IllegalFlagValueError):
    load('ade20k_r50.py', override)
