"""MaskFormer models: `build_model(config.model)` is the one entry point."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskformer_jax.models import config
from maskformer_jax.models.maskformer import MaskFormer, SIZE_DIVISIBILITY
from maskformer_jax.models.pixel_decoder import PixelDecoder
from maskformer_jax.models.resnet import ResNet
from maskformer_jax.models.swin import SwinTransformer
from maskformer_jax.models.transformer import TransformerPredictor

# RGB mean and std on the 0..255 scale, used by every reference config.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_BACKBONES = {"resnet": ResNet, "swin": SwinTransformer}
_PIXEL_DECODER_FIELDS = {
    "fpn": ("conv_dim", "mask_dim", "num_groups"),
    "transformer_encoder": ("conv_dim", "mask_dim", "num_groups", "num_layers", "num_heads", "dim_feedforward",
                            "dropout"),
}
_IN_FEATURES = ("res5", "transformer_encoder")


def normalize_images(images) -> np.ndarray:
  """`[..., 3]` RGB on the 0..255 scale (uint8 or float) -> float32 normalised with the reference mean/std."""
  return ((np.asarray(images, np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)).astype(np.float32)


def _fields(cfg: ml_collections.ConfigDict, where: str, allowed) -> dict:
  values = {k: v for k, v in cfg.items() if k != "name"}
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown} for name={cfg.get('name')!r}; allowed: {sorted(allowed)}")
  return values


def _build_backbone(cfg: ml_collections.ConfigDict):
  if cfg.get("name") not in _BACKBONES:
    raise ValueError(f"model.backbone.name must be one of {sorted(_BACKBONES)}; got {cfg.get('name')!r}")
  cls = _BACKBONES[cfg.name]
  values = _fields(cfg, "model.backbone", [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")])
  if cfg.name == "resnet" and values.get("depth", 50) not in (50, 101):
    raise ValueError(f"model.backbone.depth must be 50 or 101; got {values['depth']}")
  return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}, name="backbone")


def build_model(model_config: ml_collections.ConfigDict) -> MaskFormer:
  """Builds MaskFormer from `config.model` (schema: `maskformer_jax.models.config`); fails on unknown fields."""
  _fields(model_config, "model", ("num_classes", "num_queries", "deep_supervision", "backbone", "pixel_decoder",
                                  "transformer"))
  backbone = _build_backbone(model_config.backbone)

  pd = model_config.pixel_decoder
  if pd.get("name") not in _PIXEL_DECODER_FIELDS:
    raise ValueError(f"model.pixel_decoder.name must be one of {sorted(_PIXEL_DECODER_FIELDS)}; got {pd.get('name')!r}")
  pd_values = _fields(pd, "model.pixel_decoder", _PIXEL_DECODER_FIELDS[pd.name])
  pixel_decoder = PixelDecoder(
      conv_dim=pd.conv_dim, mask_dim=pd.mask_dim, num_groups=pd.num_groups,
      num_encoder_layers=pd_values.get("num_layers", 0), encoder_num_heads=pd_values.get("num_heads", 8),
      encoder_dim_feedforward=pd_values.get("dim_feedforward", 2048), encoder_dropout=pd_values.get("dropout", 0.1),
      name="pixel_decoder")

  tf = model_config.transformer
  _fields(tf, "model.transformer", ("hidden_dim", "num_heads", "dim_feedforward", "dropout", "num_layers",
                                    "in_feature", "enforce_input_proj"))
  if tf.in_feature not in _IN_FEATURES:
    raise ValueError(f"model.transformer.in_feature must be one of {_IN_FEATURES}; got {tf.in_feature!r}")
  if tf.in_feature == "transformer_encoder" and pd.name != "transformer_encoder":
    raise ValueError("model.transformer.in_feature='transformer_encoder' needs "
                     "model.pixel_decoder.name='transformer_encoder'")
  if model_config.num_classes < 1 or model_config.num_queries < 1:
    raise ValueError(f"model.num_classes and model.num_queries must be positive; got "
                     f"{model_config.num_classes} and {model_config.num_queries}")
  predictor = TransformerPredictor(
      num_classes=model_config.num_classes, num_queries=model_config.num_queries, hidden_dim=tf.hidden_dim,
      num_heads=tf.num_heads, dim_feedforward=tf.dim_feedforward, dropout=tf.dropout, num_layers=tf.num_layers,
      mask_dim=pd.mask_dim, enforce_input_proj=tf.enforce_input_proj, name="predictor")
  return MaskFormer(backbone=backbone, pixel_decoder=pixel_decoder, predictor=predictor, in_feature=tf.in_feature,
                    deep_supervision=model_config.deep_supervision)


# XLA:CPU (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK. Its convolutions run this model's 3x3
# convolutions about 1.6x slower forward and 4x slower with their gradients than XLA's own (Eigen) kernels (2-core
# EPYC, 2x128x128x256 -> 256), and its reduction fusions swallow the loss's elementwise work into slower kernels,
# so the model compiles with YNNPACK kept for dots only.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options() -> dict | None:
  """XLA options for `jax.jit(..., compiler_options=compiler_options())` of anything that runs the model: on CPU,
  convolutions on XLA's own kernels (see above; the train step is about 25% faster); None on other backends."""
  return dict(_CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def init_variables(model: MaskFormer, rng: jax.Array) -> dict:
  """Randomly initialised variables (`params` and the frozen-BN `batch_stats`); they do not depend on image size,
  so a small dummy input keeps initialisation cheap."""
  return model.init(rng, jnp.zeros((1, 64, 64, 3), jnp.float32))


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes (`jax.ShapeDtypeStruct`) of the model's variables, computed without any FLOPs."""
  model = build_model(model_config)
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


__all__ = ["abstract_variables", "compiler_options", "init_variables", "build_model", "config", "MaskFormer", "normalize_images", "PIXEL_MEAN", "PIXEL_STD", "SIZE_DIVISIBILITY"]
