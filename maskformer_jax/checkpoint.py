"""Saving and loading model weights with orbax.

A model directory holds `model_config.json` (the `config.model` it was built from) and `variables/` (an orbax
checkpoint of the Flax variables), so `load_model(directory)` needs nothing else. `scripts/convert_checkpoint.py`
writes such directories from official and transformers checkpoints.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from maskformer_jax.models import abstract_variables

MODEL_CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def save_model(directory, model_config: ml_collections.ConfigDict, variables: dict) -> None:
  """Writes `model_config.json` and the orbax `variables/` checkpoint into `directory` (created if needed)."""
  directory = os.path.abspath(os.fspath(directory))
  variables_dir = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(variables_dir):
    raise FileExistsError(f"{variables_dir} already exists; choose an empty output directory.")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
    f.write(model_config.to_json(indent=2))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(variables_dir, jax.tree.map(jax.numpy.asarray, variables))
  checkpointer.wait_until_finished()


def load_model(directory) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a directory written by `save_model`; returns `(model_config, variables)` on the default device."""
  directory = os.path.abspath(os.fspath(directory))
  config_file = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{config_file} not found: {directory} is not a model directory written by "
                            "save_model / scripts/convert_checkpoint.py.")
  with open(config_file) as f:
    # JSON has no tuples; the configs use tuples for sequences (depths, num_heads).
    model_config = ml_collections.ConfigDict(json.load(f, object_hook=lambda d: {
        k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_variables(model_config))
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR), target)
  return model_config, variables
