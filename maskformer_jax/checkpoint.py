"""Orbax checkpoints: the trainer's periodic train-state checkpoints, and model directories of weights alone.

A training workdir holds `config.json` (the full config) and `checkpoints/<step>/` (train states; `Checkpoints`).
A model directory holds `model_config.json` (the `config.model` it was built from) and `variables/` (an orbax
checkpoint of the Flax variables), so `load_model(directory)` needs nothing else. `scripts/convert_checkpoint.py`
writes such directories from official and transformers checkpoints. `load_variables` reads either kind.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from maskformer_jax.models import abstract_variables

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
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


def _read_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    # JSON has no tuples; the configs use tuples for sequences (depths, num_heads).
    return ml_collections.ConfigDict(json.load(f, object_hook=lambda d: {
        k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}))


def _single_device_target(model_config: ml_collections.ConfigDict) -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract_variables(model_config))


def load_model(directory) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a directory written by `save_model`; returns `(model_config, variables)` on the default device."""
  directory = os.path.abspath(os.fspath(directory))
  config_file = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{config_file} not found: {directory} is not a model directory written by "
                            "save_model / scripts/convert_checkpoint.py.")
  model_config = _read_config(config_file)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR),
                                                 _single_device_target(model_config))
  return model_config, variables


def load_variables(path, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """`(model_config, variables)` on the default device from a model directory (`save_model`, converted official
  weights) or from a training workdir (its checkpoint at `step`, default the latest; the optimizer state is not
  read)."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(os.path.join(path, MODEL_CONFIG_FILE)):
    if step is not None:
      raise ValueError(f"{path} is a model directory, which holds one set of weights; do not pass a step.")
    return load_model(path)
  checkpoints = os.path.join(path, CHECKPOINT_DIR)
  if not (os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(checkpoints)):
    raise FileNotFoundError(f"{path} is neither a model directory (with {MODEL_CONFIG_FILE}) nor a training "
                            f"workdir (with {CONFIG_FILE} and {CHECKPOINT_DIR}/); pass one of those.")
  model_config = _read_config(os.path.join(path, CONFIG_FILE)).model
  with ocp.CheckpointManager(checkpoints, item_names=("state",)) as manager:
    available = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step not in available:
      raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoints}; it holds steps {sorted(available)}.")
    # Only the model's part of the train state: its params and (frozen) batch statistics.
    target = _single_device_target(model_config)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))["state"]
  logging.info("Loaded the weights of step %d from %s", step, checkpoints)
  return model_config, state


class Checkpoints:
  """Orbax checkpoints of the train state in `workdir/checkpoints`, with the config they were made with."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.solver.keep_checkpoints),
        item_names=("state",))
    self._check_config(config)

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes the config on a fresh workdir; refuses a workdir whose checkpoints another model config made."""
    path = os.path.join(self.workdir, CONFIG_FILE)
    if self.manager.latest_step() is not None and os.path.exists(path):
      with open(path) as f:
        saved = ml_collections.ConfigDict(json.load(f))
      differences = _differences(saved.model.to_dict(), json.loads(config.model.to_json()), "model")
      if differences:
        raise ValueError(f"{self.workdir} holds checkpoints of an incompatible config ({'; '.join(differences)}). "
                         "Pass a new --workdir, or the config those checkpoints were trained with.")
    if jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      with open(path, "w") as f:
        f.write(config.to_json(indent=2))

  def restore_latest(self, abstract_state, state_sharding):
    """The latest checkpoint placed with `state_sharding` (a sharding, or a tree of them) on the current mesh,
    whatever mesh saved it; None if there is none. `abstract_state`: shapes and dtypes (`jax.eval_shape` of the
    initialiser)."""
    step = self.manager.latest_step()
    if step is None:
      return None
    if isinstance(state_sharding, jax.sharding.Sharding):
      state_sharding = jax.tree.map(lambda _: state_sharding, abstract_state)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                            state_sharding)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as error:
      raise ValueError(f"Cannot restore step {step} from {self.manager.directory}: it does not fit the current "
                       f"config ({error}). Pass a new --workdir.") from error
    logging.info("Resumed from step %d in %s", step, self.manager.directory)
    return restored["state"]

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _differences(saved: dict, current: dict, prefix: str) -> list[str]:
  """Dotted paths whose values differ between two nested dicts, with both values."""
  found = []
  for key in sorted(set(saved) | set(current)):
    a, b, path = saved.get(key), current.get(key), f"{prefix}.{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      found += _differences(a, b, path)
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
      found.append(f"{path} was {a!r}, now {b!r}")
  return found
