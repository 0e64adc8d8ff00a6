"""The trainer, to be read top to bottom.

`train_and_evaluate(config, workdir)`:
  1. mesh over all devices; model, optimizer and initial state, replicated;
  2. resume from the latest checkpoint in `workdir` if there is one (state, RNG and input position);
  3. the input pipeline from that position, each process reading its own shard;
  4. a jitted train step on the global batch (sharded over the `data` axis), with a progress bar, JSON-lines and
     TensorBoard metrics, periodic checkpoints, validation loss and (if configured) evaluation metrics;
  5. a final checkpoint and validation loss, then the evaluation (`eval_results.json`: mIoU, PQ, ...) and
     pictures of the first `test.num_pictures` validation images in `workdir/pictures`.
Killing the process at any point loses at most `solver.checkpoint_every` steps: the same command resumes.
"""
import functools
import json
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tensorflow as tf
import tqdm
from jax.experimental import multihost_utils

from maskformer_jax import evaluation, optim, sharding, visualize
from maskformer_jax.checkpoint import Checkpoints
from maskformer_jax.data import pipeline
from maskformer_jax.losses import maskformer_loss
from maskformer_jax.models import build_model, compiler_options, init_variables

METRICS_FILE = "metrics.jsonl"


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array         # int32 []: optimizer updates applied so far
  params: Any
  batch_stats: Any        # frozen batch-norm statistics: part of the model, never trained
  opt_state: Any
  rng: jax.Array          # uint32 [2] base key; step s draws dropout from fold_in(rng, s)

  def variables(self) -> dict:
    """The model's variables, as `model.apply` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def train_state_initializer(config: ml_collections.ConfigDict, model
                            ) -> tuple[Callable[[], TrainState], optax.GradientTransformation]:
  """`(init_state, tx)`: a function of no arguments that builds the initial state (seeded by `config.seed`), and
  the optimizer, whose parameter groups depend on the parameter tree.

  Run `init_state` under `jax.jit` (one compiled initialisation instead of every initializer dispatched eagerly),
  or under `jax.eval_shape` for the shapes a checkpoint restore fills.
  """
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract_params = jax.eval_shape(lambda: init_variables(model, init_rng))["params"]
  tx = optim.make_optimizer(config.solver, abstract_params)

  def init_state() -> TrainState:
    variables = init_variables(model, init_rng)
    return TrainState(step=jnp.int32(0), params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]), rng=train_rng)

  return init_state, tx


def create_train_state(config: ml_collections.ConfigDict, model, state_sharding=None
                       ) -> tuple[TrainState, optax.GradientTransformation]:
  """A freshly initialised state placed with `state_sharding` (a sharding, or a tree of them; None: the default
  device), and the optimizer."""
  init_state, tx = train_state_initializer(config, model)
  return jax.jit(init_state, out_shardings=state_sharding)(), tx


def _targets(batch: dict) -> dict:
  return {"labels": batch["labels"], "masks": batch["masks"], "valid": batch["valid"]}


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """`(state, batch) -> (state, metrics)`: forward, MaskFormer loss over the global batch, AdamW update."""
  schedule = optim.learning_rate_schedule(config.solver)

  def train_step(state: TrainState, batch: dict):
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      outputs = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["images"], train=True,
                            rngs={"dropout": dropout_rng})
      return maskformer_loss(outputs, _targets(batch), num_classes=config.model.num_classes, **config.loss)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    metrics = {"loss": loss, "learning_rate": schedule(state.step - 1), "grad_norm": optax.global_norm(grads),
               **terms}
    return state, metrics

  return train_step


def make_eval_step(model, config: ml_collections.ConfigDict):
  """`(state, batch) -> (sum of per-image losses, number of images)`, skipping the padding examples of the last
  batch (`example_valid`)."""

  def eval_step(state: TrainState, batch: dict):
    outputs = model.apply(state.variables(), batch["images"])

    def image_loss(output, target):
      one = lambda x: x[None]  # noqa: E731  a batch of one image
      return maskformer_loss(jax.tree.map(one, output), jax.tree.map(one, target),
                             num_classes=config.model.num_classes, **config.loss)[0]

    losses = jax.vmap(image_loss)(outputs, _targets(batch))
    weight = batch["example_valid"].astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight)

  return eval_step


class MetricWriter:
  """JSON lines in `workdir/metrics.jsonl` and TensorBoard summaries in `workdir/tensorboard` (process 0)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self.path = os.path.join(workdir, METRICS_FILE)
      self.summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    with self.summary.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(name, value)
    self.summary.flush()


def evaluate_loss(eval_step, state: TrainState, *, config: ml_collections.ConfigDict, batch_sharding,
                  batch_size: int, data_dir: str | None) -> float:
  """Mean per-image loss over `config.data.eval_split`."""
  total, count = 0.0, 0.0
  dataset = pipeline.make_eval_dataset(config.data, split=config.data.eval_split, batch_size=batch_size,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       data_dir=data_dir)
  for batch in dataset:
    loss_sum, num = eval_step(state, sharding.global_batch(batch, batch_sharding))
    total, count = total + loss_sum, count + num  # summed on device: no host sync per batch
  return float(total) / max(float(count), 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last logged metrics."""
  mesh = sharding.make_mesh(config.mesh)
  local_batch_size = sharding.check_batch_size(config.solver.batch_size, mesh)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  model = build_model(config.model)
  state_sharding = replicated  # a prefix of the whole state tree; an fsdp axis would give per-parameter specs
  checkpoints = Checkpoints(workdir, config)
  init_state, tx = train_state_initializer(config, model)
  state = checkpoints.restore_latest(jax.eval_shape(init_state), state_sharding)
  if state is None:
    state = jax.jit(init_state, out_shardings=state_sharding)()
  start_step = int(state.step)

  train_step = jax.jit(make_train_step(model, tx, config), in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0,
                       compiler_options=compiler_options())
  eval_step = jax.jit(make_eval_step(model, config), in_shardings=(state_sharding, batch_sharding),
                      out_shardings=replicated, compiler_options=compiler_options())
  data_dir = config.data.data_dir or None  # '' in the config: TFDS's default directory
  validation_loss = functools.partial(evaluate_loss, eval_step, config=config, batch_sharding=batch_sharding,
                                      batch_size=local_batch_size, data_dir=data_dir)

  # Process 0 generates a built-in dataset that is missing; the others wait for it rather than write beside it.
  if jax.process_index() == 0:
    pipeline.prepare_dataset(config.data, data_dir)
  multihost_utils.sync_global_devices("dataset prepared")
  # Every process skips the examples its earlier steps consumed, so the stream continues where it stopped.
  batches = pipeline.make_train_dataset(config.data, batch_size=local_batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        start_example=start_step * local_batch_size, data_dir=data_dir)
  writer = MetricWriter(workdir)
  solver = config.solver
  progress = tqdm.tqdm(total=solver.max_steps, initial=start_step, desc="train", unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  metrics, last_log, last_time = {}, start_step, time.perf_counter()
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, solver.max_steps + 1):
      state, step_metrics = train_step(state, sharding.global_batch(next(batches), batch_sharding))
      # The first step is logged too: its loss is where training starts (its rate includes compilation).
      if step % solver.log_every == 0 or step in (start_step + 1, solver.max_steps):
        metrics = jax.device_get(step_metrics)  # waits for the step, so the rate below covers whole steps
        now = time.perf_counter()
        metrics["images_per_second"] = (step - last_log) * solver.batch_size / (now - last_time)
        last_log, last_time = step, now
        writer.write(step, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.2e}",
                             img_s=f"{metrics['images_per_second']:.1f}")
      if step % solver.eval_every == 0 and step != solver.max_steps:
        writer.write(step, {"validation_loss": validation_loss(state)})
      if solver.metrics_every and step % solver.metrics_every == 0 and step != solver.max_steps:
        writer.write(step, evaluation.summary(evaluation.evaluate_model(model, state.variables(), config)))
      if step % solver.checkpoint_every == 0 or step == solver.max_steps:
        checkpoints.save(step, state)
      progress.update(1)
    progress.close()
    checkpoints.close()
    metrics["validation_loss"] = validation_loss(state)
    results = evaluation.evaluate_model(model, state.variables(), config)
    evaluation.write_results(workdir, dict(results, step=int(state.step)))
    if config.test.num_pictures and jax.process_index() == 0:
      visualize.validation_pictures(model, state.variables(), config, os.path.join(workdir, "pictures"),
                                    config.test.num_pictures)
  metrics.update(evaluation.summary(results))
  writer.write(solver.max_steps, {name: metrics[name] for name in ("validation_loss", *evaluation.summary(results))})
  return metrics
