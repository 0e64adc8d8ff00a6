"""Checkpoint import: official Detectron2 `.pkl` files and transformers `save_pretrained` directories."""
from maskformer_jax.convert.detectron2 import load_detectron2_checkpoint
from maskformer_jax.convert.hf import load_hf_checkpoint
from maskformer_jax.convert.safe_pickle import CheckpointFormatError, UnsafeCheckpointError

__all__ = ["load_detectron2_checkpoint", "load_hf_checkpoint", "CheckpointFormatError", "UnsafeCheckpointError"]
