"""Benchmarks maskformer-jax against transformers' PyTorch MaskFormer on the same CPU, side by side in one run.

    .venv/bin/python scripts/benchmark.py [--sections=forward,inference,matching,loss,train_step,pipeline]
        [--models=resnet50,swin_tiny] [--size=512] [--batch=1] [--match-batch=16] [--repeats=7] [--warmup=2]
        [--train-batch=2] [--train-repeats=5] [--train-warmup=2]
        [--pipeline-batch=16] [--pipeline-batches=20] [--pipeline-warmup=3] [--json=PATH]

Sections:
  forward: eval-mode forward latency (ms) of `jax.jit` of our model returning `pred_logits` and `pred_masks`
    against transformers' `MaskFormerForInstanceSegmentation` under `torch.inference_mode()` with default torch
    threads. Both get the same weights (the seeded random HF model of tests/hf_reference.py, written with
    `save_pretrained` and read back with `load_hf_checkpoint`) and the same seeded random normalised image (NCHW for
    torch, NHWC for JAX). Like for like: transformers' default config computes only the last decoder layer's masks
    and ours runs with `aux_outputs=False`, the inference path (which also folds the final mask projection into
    a per-query conv, `PixelEmbeddings.mask_logits`). Times are the median (and min) of `--repeats` calls after
    `--warmup` calls; JAX compilation is excluded and reported separately. The max |ours - theirs| over
    pred_logits and pred_masks is a sanity check that both ran the same network (expect ~1e-5).
  inference: end-to-end latency (ms) per image of semantic segmentation as a user runs it, model plus pre- and
    post-processing, for the ADE20K configs (`configs/ade20k_r50.py`, `configs/ade20k_swin_tiny.py`: semantic,
    `sem_seg_postprocess_before_inference=False`, short side `--size`, long side at most 4x), same weights as in
    forward (150 classes, like ADE20K), on one seeded random uint8 RGB image of `--size` (512) squared, so that the
    test-time resize is the identity and there is no padding on either side. Ours:
    `inference.predict(model, variables, image, config.test)` (resize, normalise and pad to /32 in numpy, the
    jitted forward, the jitted mask post-processing and semantic inference, the copy of the int32 map to the
    host), variables already on the device. Theirs, all under `torch.inference_mode()`:
    `MaskFormerImageProcessorPil(size={"shortest_edge": size, "longest_edge": 4 * size})` (its defaults are
    COCO's 800 / 1333; it keeps bilinear PIL resizing, rescaling by 1/255 and ImageNet's mean/std, our mean/std
    on the 0..255 scale, and `size_divisor=32`, which rounds the resized size up to a multiple of 32 by
    stretching the image, where we pad; its size rounding truncates where Detectron2's rounds; neither matters
    here), the model given the processor's `pixel_values` and `pixel_mask`, and
    `post_process_semantic_segmentation(outputs, target_sizes=[(size, size)])`. Median (and min) of `--repeats`
    images after `--warmup`; compile s is the wall time of our first call (both jitted functions compiled, plus
    one run). Untimed checks: input max abs diff between our `prepare_image` and the processor's `pixel_values`
    (expect ~5e-7), and agreement, the fraction of pixels where the two semantic maps agree. Expect 100%, but
    read it with "classes in map": this random network's queries all predict the same class, so both maps are
    one class everywhere and agreement only shows that both pick that class at the right size (the forward
    section checks the networks themselves). With a trained network it would fall slightly short of 100% because
    the post-processing differs: transformers marginalises the class scores at the mask logits' 1/4 resolution
    and upsamples the K-channel score map, where MaskFormer (and we) upsample the mask logits to the padded
    input and take the sigmoid there (sigmoid and bilinear resizing do not commute; see tests/test_inference.py);
    transformers also never crops padding away, harmless here since there is none.

  matching: Hungarian matching of a padded batch as the loss sees it: `--match-batch` (16) images, 100 queries,
    100 target slots of which 5, 20 or 50 are real, U(0, 1) costs (seeded). Ours: `match_queries` with the
    in-graph `device` backend and with the `host` backend (scipy through `jax.pure_callback`, inside `jax.jit`);
    against `optax.assignment.hungarian_algorithm` under `jax.jit(jax.vmap(...))` on the padded matrices (padded
    columns set to the constant 2.0, the usual way to give it static shapes) and scipy's
    `linear_sum_assignment` in a host loop over the real columns of each image. Every solver's total cost is
    checked against scipy's. For scale, optax is also timed on the real columns alone (`[B, 100, n]`), which a
    training step cannot do since images differ in their number of targets.
  loss: the whole loss per training step, forward and backward (gradient w.r.t. the predictions): 6 decoder
    layers (5 auxiliary), `--match-batch` images, 100 queries, 150 classes, 100 target slots with 5, 20 or 50
    real, 128x128 targets (32x32 mask logits). Ours: `jax.jit(jax.value_and_grad(maskformer_loss))` with either
    matcher; theirs: transformers' `MaskFormerLoss` forward + backward on the same predictions and targets.
  train_step: training-step throughput (images/s, and ms per step) of the ADE20K ResNet-50 recipe
    (`configs/ade20k_r50.py`: 150 classes, 100 queries, 6 decoder layers with deep supervision, dropout 0.1),
    `--train-batch` (2) images of `--size` (512) squared per step. Both sides get the same seeded random normalised
    images (NHWC for JAX, NCHW for torch) and the same targets: per image 10 blob masks partitioning it (a
    weighted Voronoi partition, like a semantic map) with distinct random classes, padded for us to
    `data.max_segments` (100) slots with `valid`. Ours: `jax.jit(train.make_train_step(model, tx, config))` with
    the state of `train.create_train_state` donated, as the trainer does: train-mode forward, `maskformer_loss`
    with `config.loss` as configured (matcher 'host'), backward, clipping and AdamW. Theirs: transformers'
    `MaskFormerForInstanceSegmentation` (ResNet-50, same sizes) in train mode, given `mask_labels`/`class_labels`
    so that it computes its own Hungarian-matched loss, with `use_auxiliary_loss=True` (it then scores 7 sets of
    predictions, the decoder input too, against our 6), backward, `clip_grad_norm_` to `solver.clip_norm` and a
    `torch.optim.AdamW` step (lr 1e-4, backbone x0.1, weight decay 1e-4); its ResNet batch norms are frozen like
    ours and Detectron2's (eval statistics, no gradient to their affine). Weights differ (our seeded init, the
    random HF model of tests/hf_reference.py): irrelevant to throughput. Both sides see the batch already in
    memory (no input pipeline). Median (and min) of `--train-repeats` (5) steps after `--train-warmup` (2);
    images/s is batch / median step time. JAX compilation is excluded and reported separately. About 3 minutes
    at the defaults on 2 cores.
  pipeline: input pipeline throughput (images/s) of `pipeline.train_batches` with the ADE20K recipe's data config
    (task semantic; short side a random choice of 256..1024, long side at most 2048, crop 512x512, SSD colour
    jitter, flip; targets padded to 100 masks) on an in-memory `tf.data.Dataset` of 64 distinct synthetic
    ADE-like examples with TFDS coco/2017_panoptic's features (built as tests/test_pipeline.py does): a 512x683
    JPEG of 15-25 textured blobs and its panoptic PNG, repeated (and reshuffled) endlessly. Batches of
    `--pipeline-batch` (16) come out as numpy, as the trainer reads them; `--pipeline-warmup` (3) batches are
    drawn untimed (tracing, autotuning), then `--pipeline-batches` (20) are timed: images/s is their images over
    their total time (prefetched work left over from warm-up adds at most about one batch). With `train_step`
    earlier in the same run the table gives the ratio to our step's images/s: the pipeline must outrun the step it
    feeds. Both are measured alone on all cores; in training they share them. At another `--size` both sections
    use the same recipe at that crop size (images (size, 4/3 size)). About a minute at the defaults.

Prints a markdown table; `--json=PATH` also writes the rows and the environment as JSON. Timings are only
meaningful on an otherwise idle machine (the header shows the load average). `XLA_FLAGS` from the environment
applies to our side and is printed in the header.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import scipy.optimize
import tensorflow as tf
import torch
import transformers
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from maskformer_jax import inference, train
from maskformer_jax.convert.hf import load_hf_checkpoint
from maskformer_jax.data import pipeline
from maskformer_jax.losses import maskformer_loss
from maskformer_jax.matching import match_queries
from maskformer_jax.models import SIZE_DIVISIBILITY, build_model, compiler_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # for `configs` and `hf_reference`
from configs import ade20k_r50, ade20k_swin_tiny, common  # noqa: E402  pylint: disable=wrong-import-position
from hf_reference import make_hf_model  # noqa: E402  pylint: disable=wrong-import-position

MODELS = ("resnet50", "swin_tiny")


def time_fn(fn, repeats: int, warmup: int) -> dict:
  """Calls `fn()` `warmup` times untimed, then `repeats` times; `fn` must block until its work is done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times)}


def _ms(timing: dict, digits: int = 1) -> str:
  return f"{timing['median_ms']:.{digits}f} (min {timing['min_ms']:.{digits}f})"


def _same_weights(kind: str) -> tuple:
  """`(hf_model, model, variables)`: the seeded random transformers model of tests/hf_reference.py and ours with its
  weights, read back from its `save_pretrained` copy."""
  hf_model = make_hf_model(kind)
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    model_config, variables = load_hf_checkpoint(tmp)
  return hf_model, build_model(model_config), variables


def forward_rows(args) -> list[dict]:
  """Forward latency of ours vs transformers, same weights and input, one row per model."""
  rows = []
  for kind in args.models:
    hf_model, model, variables = _same_weights(kind)

    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
    pixel_values = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def forward(variables, images):
      out = model.apply(variables, images, aux_outputs=False)  # inference: final layer only
      return out["pred_logits"], out["pred_masks"]

    variables, jax_images = jax.device_put((variables, images))
    start = time.perf_counter()
    compiled = forward.lower(variables, jax_images).compile()
    compile_s = time.perf_counter() - start
    ours_out = jax.block_until_ready(compiled(variables, jax_images))
    ours = time_fn(lambda: jax.block_until_ready(compiled(variables, jax_images)), args.repeats, args.warmup)

    def torch_forward():
      with torch.inference_mode():
        out = hf_model(pixel_values=pixel_values)
      return out.class_queries_logits.numpy(), out.masks_queries_logits.numpy()

    theirs_out = torch_forward()
    theirs = time_fn(torch_forward, args.repeats, args.warmup)

    diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(ours_out, theirs_out))
    rows.append({
        "model": kind, "input": f"{args.batch}x{args.size}x{args.size}", "ours (JAX) ms": _ms(ours),
        "transformers (PyTorch) ms": _ms(theirs), "speed-up": f"{theirs['median_ms'] / ours['median_ms']:.2f}x",
        "compile s": f"{compile_s:.1f}", "max abs diff": f"{diff:.1e}",
        "raw": {"ours": ours, "theirs": theirs, "compile_s": compile_s, "max_abs_diff": diff},
    })
  return rows


def inference_rows(args) -> list[dict]:
  """Per-image latency of `inference.predict` vs transformers' processor + model + semantic post-processing, same
  weights and image, one row per model, with the fraction of pixels where the semantic maps agree."""
  rows = []
  for kind in args.models:
    hf_model, model, variables = _same_weights(kind)
    test_config = _ade20k_config(args.size, kind).test
    num_labels = hf_model.config.num_labels
    if model.predictor.num_classes != num_labels or test_config.sem_seg_postprocess_before_inference:
      raise RuntimeError(f"expected the same classes on both sides and a semantic test config; got "
                         f"{model.predictor.num_classes} classes, {num_labels} in transformers, "
                         f"sem_seg_postprocess_before_inference="
                         f"{test_config.sem_seg_postprocess_before_inference}")
    if test_config.min_size_test != args.size:
      raise RuntimeError(f"test resize to {test_config.min_size_test} would not be the identity at {args.size}")

    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    variables = jax.device_put(variables)

    def ours_predict():
      return inference.predict(model, variables, image, test_config)["semantic"]

    start = time.perf_counter()
    ours_map = ours_predict()
    compile_s = time.perf_counter() - start
    ours = time_fn(ours_predict, args.repeats, args.warmup)

    processor = transformers.MaskFormerImageProcessorPil(
        size={"shortest_edge": test_config.min_size_test, "longest_edge": test_config.max_size_test})

    def torch_predict():
      with torch.inference_mode():
        inputs = processor(images=image, return_tensors="pt")
        outputs = hf_model(**inputs)
        semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[(args.size, args.size)])
      return semantic[0].numpy()

    theirs_map = torch_predict()
    theirs = time_fn(torch_predict, args.repeats, args.warmup)

    # Untimed checks: both sides feed their networks the same pixels, and produce maps of the same size.
    ours_input, _ = inference.prepare_image(image, test_config.min_size_test, test_config.max_size_test)
    theirs_input = processor(images=image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    if ours_input.shape != theirs_input.shape or ours_map.shape != theirs_map.shape:
      raise RuntimeError(f"shapes differ: model inputs ours {ours_input.shape}, transformers {theirs_input.shape}; "
                         f"semantic maps ours {ours_map.shape}, transformers {theirs_map.shape}")
    input_diff = float(np.max(np.abs(ours_input - theirs_input)))
    agreement = float(np.mean(ours_map == theirs_map))
    classes = (len(np.unique(ours_map)), len(np.unique(theirs_map)))
    rows.append({
        "model": kind, "input": f"{args.size}x{args.size}x3 uint8", "ours (JAX) ms": _ms(ours),
        "transformers (PyTorch) ms": _ms(theirs), "speed-up": f"{theirs['median_ms'] / ours['median_ms']:.2f}x",
        "compile s": f"{compile_s:.1f}", "agreement": f"{agreement:.2%}",
        "classes in map (ours / theirs)": f"{classes[0]} / {classes[1]}", "input max abs diff": f"{input_diff:.1e}",
        "raw": {"ours": ours, "theirs": theirs, "compile_s": compile_s, "agreement": agreement,
                "classes_in_map": classes, "input_max_abs_diff": input_diff},
    })
  return rows


NUM_QUERIES, NUM_SLOTS, REAL_TARGETS = 100, 100, (5, 20, 50)


def _padded_costs(batch: int, num_real: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """U(0, 1) costs `[B, Q, M]` whose first `num_real` target slots are real, and the `[B, M]` validity mask."""
  cost = np.random.default_rng(seed).random((batch, NUM_QUERIES, NUM_SLOTS), dtype=np.float32)
  valid = np.zeros((batch, NUM_SLOTS), bool)
  valid[:, :num_real] = True
  return cost, valid


def _total_cost(cost: np.ndarray, valid: np.ndarray, query_index: np.ndarray) -> float:
  """Sum over real target slots of the cost of the query each is matched to (float64)."""
  batch, slot = np.nonzero(valid)
  return float(cost.astype(np.float64)[batch, query_index[batch, slot], slot].sum())


def _scipy_loop(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  query_index = np.full(valid.shape, -1, np.int32)
  for b in range(len(cost)):
    real = np.flatnonzero(valid[b])
    rows, cols = scipy.optimize.linear_sum_assignment(cost[b][:, real])
    query_index[b, real[cols]] = rows
  return query_index


def matching_rows(args) -> list[dict]:
  """Matching latency of the four solvers on padded batches, one row per number of real targets."""
  device = jax.jit(functools.partial(match_queries, backend="device"))
  host = jax.jit(functools.partial(match_queries, backend="host"))
  optax_solver = jax.jit(jax.vmap(optax.assignment.hungarian_algorithm))
  rows = []
  for num_real in REAL_TARGETS:
    cost, valid = _padded_costs(args.match_batch, num_real, seed=num_real)
    padded = np.where(valid[:, None, :], cost, np.float32(2.0))
    cost_j, valid_j, padded_j = jax.device_put((cost, valid, padded))

    def optax_match(matrices):
      return jax.block_until_ready(optax_solver(matrices))

    reference = _total_cost(cost, valid, _scipy_loop(cost, valid))
    opt_rows, opt_cols = jax.device_get(optax_match(padded_j))
    # optax pairs every query with a column; keep the pairs that hit real columns.
    optax_index = np.full(valid.shape, -1, np.int32)
    for b in range(len(cost)):
      keep = valid[b, opt_cols[b]]
      optax_index[b, opt_cols[b][keep]] = opt_rows[b][keep]
    # Only possible here because every image has the same number of real targets: optax on those columns alone.
    unpadded_j = jax.device_put(np.ascontiguousarray(cost[:, :, :num_real]))
    errors = {name: abs(_total_cost(cost, valid, np.asarray(index)) - reference) for name, index in
              (("device", device(cost_j, valid_j)), ("host", host(cost_j, valid_j)), ("optax", optax_index))}

    timings = {
        "device": time_fn(lambda: jax.block_until_ready(device(cost_j, valid_j)), args.repeats, args.warmup),
        "optax": time_fn(lambda: optax_match(padded_j), args.repeats, args.warmup),
        "optax_unpadded": time_fn(lambda: optax_match(unpadded_j), args.repeats, args.warmup),
        "scipy": time_fn(lambda: _scipy_loop(cost, valid), args.repeats, args.warmup),
        "host": time_fn(lambda: jax.block_until_ready(host(cost_j, valid_j)), args.repeats, args.warmup),
    }
    ours = timings["device"]["median_ms"]
    rows.append({
        "batch": f"{args.match_batch}x{NUM_QUERIES}x{NUM_SLOTS}", "real targets": num_real,
        "ours in-graph ms": _ms(timings["device"], 2), "optax ms": _ms(timings["optax"], 2),
        "optax on real columns only ms": _ms(timings["optax_unpadded"], 2),
        "scipy loop ms": _ms(timings["scipy"], 2), "ours host callback in jit ms": _ms(timings["host"], 2),
        "optax / ours": f"{timings['optax']['median_ms'] / ours:.1f}",
        "ours / scipy": f"{ours / timings['scipy']['median_ms']:.1f}",
        "max cost error": f"{max(errors.values()):.1e}",
        "raw": {"timings": timings, "cost_errors": errors},
    })
  return rows


def _loss_inputs(batch: int, num_real: int, seed: int, num_classes: int = 150, size: int = 128, layers: int = 6):
  """Random predictions for `layers` decoder layers and padded targets of rectangles, `num_real` per image."""
  rng = np.random.default_rng(seed)
  predictions = [{"pred_logits": rng.standard_normal((batch, NUM_QUERIES, num_classes + 1), dtype=np.float32),
                  "pred_masks": 2 * rng.standard_normal((batch, NUM_QUERIES, size // 4, size // 4), dtype=np.float32)}
                 for _ in range(layers)]
  labels = np.zeros((batch, NUM_SLOTS), np.int32)
  masks = np.zeros((batch, NUM_SLOTS, size, size), bool)
  valid = np.zeros((batch, NUM_SLOTS), bool)
  valid[:, :num_real] = True
  labels[:, :num_real] = rng.integers(0, num_classes, (batch, num_real))
  for b, slot in zip(*np.nonzero(valid)):
    top, left = rng.integers(0, size - 8, 2)
    height, width = rng.integers(8, size // 2, 2)
    masks[b, slot, top:top + height, left:left + width] = True
  outputs = dict(predictions[-1], aux_outputs=predictions[:-1])
  return outputs, {"labels": labels, "masks": masks, "valid": valid}, num_classes


def loss_rows(args) -> list[dict]:
  """Forward + backward time of the whole loss (6 layers) against transformers' MaskFormerLoss."""
  rows = []
  for num_real in REAL_TARGETS:
    outputs, targets, num_classes = _loss_inputs(args.match_batch, num_real, seed=num_real)
    timings, values = {}, {}
    for matcher in ("device", "host"):
      step = jax.jit(jax.value_and_grad(
          lambda o, t, m=matcher: maskformer_loss(o, t, num_classes=num_classes, matcher=m)[0]))
      o, t = jax.device_put((outputs, targets))
      values[matcher] = float(step(o, t)[0])
      timings[matcher] = time_fn(lambda: jax.block_until_ready(step(o, t)), args.repeats, args.warmup)

    criterion = MaskFormerLoss(num_labels=num_classes, matcher=MaskFormerHungarianMatcher(1.0, 20.0, 1.0),
                               weight_dict={}, eos_coef=0.1)
    valid = targets["valid"]
    mask_labels = [torch.from_numpy(targets["masks"][b][valid[b]].astype(np.float32)) for b in range(len(valid))]
    class_labels = [torch.from_numpy(targets["labels"][b][valid[b]].astype(np.int64)) for b in range(len(valid))]
    weights = {"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}

    def torch_step():
      layers = [{k: torch.from_numpy(v).requires_grad_() for k, v in layer.items() if k != "aux_outputs"}
                for layer in [*outputs["aux_outputs"], outputs]]
      aux = [{"masks_queries_logits": layer["pred_masks"], "class_queries_logits": layer["pred_logits"]}
             for layer in layers[:-1]]
      losses = criterion(layers[-1]["pred_masks"], layers[-1]["pred_logits"], mask_labels, class_labels, aux)
      total = sum(weights[name.rstrip("_0123456789")] * value for name, value in losses.items())
      total.backward()
      return float(total.detach())

    values["transformers"] = torch_step()
    timings["transformers"] = time_fn(torch_step, args.repeats, args.warmup)
    rows.append({
        "batch": f"{args.match_batch}x{NUM_QUERIES}x{NUM_SLOTS}, 128x128, 6 layers", "real targets": num_real,
        "ours (device matcher) ms": _ms(timings["device"]), "ours (host matcher) ms": _ms(timings["host"]),
        "transformers ms": _ms(timings["transformers"]),
        "speed-up (device)": f"{timings['transformers']['median_ms'] / timings['device']['median_ms']:.2f}x",
        "max loss rel. diff": f"{max(abs(v / values['transformers'] - 1) for v in values.values()):.1e}",
        "raw": {"timings": timings, "values": values},
    })
  return rows


TRAIN_SEGMENTS = 10  # real segments per image in the train_step section


def _ade20k_config(size: int, kind: str = "resnet50"):
  """configs/ade20k_r50.py's (or ade20k_swin_tiny.py's) config; at another `--size`, the same recipe with that crop
  size (test: short side `size`, long side at most 4x)."""
  if size == 512:
    return {"resnet50": ade20k_r50, "swin_tiny": ade20k_swin_tiny}[kind].get_config()
  backbone = common.resnet_backbone(50) if kind == "resnet50" else common.swin_backbone("tiny")
  return common.ade20k_config(backbone, size)


def _voronoi(rng: np.random.Generator, shape: tuple, count: int) -> np.ndarray:
  """int `[H, W]` map of `count` blobs: each pixel goes to the nearest of `count` random centres, with a random
  weight per centre so that blob sizes vary (a multiplicatively weighted Voronoi partition)."""
  centres = rng.random((count, 2)) * shape
  weights = rng.uniform(0.5, 1.5, count)
  rows, cols = np.ogrid[:shape[0], :shape[1]]
  nearest = np.full(shape, np.inf)
  blobs = np.zeros(shape, np.int32)
  for i, ((row, col), weight) in enumerate(zip(centres, weights)):
    distance = np.hypot(rows - row, cols - col) / weight
    blobs = np.where(distance < nearest, i, blobs)
    nearest = np.minimum(distance, nearest)
  return blobs


def _train_batch(batch: int, size: int, max_segments: int, num_classes: int, seed: int = 0) -> dict:
  """A training batch as the pipeline gives it: seeded random normalised images, and per image TRAIN_SEGMENTS
  blob masks partitioning it (a semantic map), with distinct random classes, padded to `max_segments` slots."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((batch, max_segments), np.int32)
  masks = np.zeros((batch, max_segments, size, size), np.uint8)
  valid = np.zeros((batch, max_segments), bool)
  for b in range(batch):
    blobs = _voronoi(rng, (size, size), TRAIN_SEGMENTS)
    labels[b, :TRAIN_SEGMENTS] = rng.choice(num_classes, TRAIN_SEGMENTS, replace=False)
    masks[b, :TRAIN_SEGMENTS] = blobs[None] == np.arange(TRAIN_SEGMENTS)[:, None, None]
    valid[b, :TRAIN_SEGMENTS] = True
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  return {"images": images, "labels": labels, "masks": masks, "valid": valid}


def _hf_train_setup(config, batch: dict) -> tuple:
  """transformers' MaskFormer-R50 set up to train like ours: its auxiliary (deep-supervision) loss on, train mode
  (dropout 0.1) except the ResNet's batch norms, which are frozen as in Detectron2 (eval statistics, no gradient
  to their affine), AdamW with the ADE20K R50 recipe (lr 1e-4, backbone x0.1, weight decay 1e-4) after clipping
  the global gradient norm to `solver.clip_norm`. Returns `(model, optimizer, trainable, inputs)`."""
  model = make_hf_model("resnet50", num_labels=config.model.num_classes)
  model.config.use_auxiliary_loss = True
  model.train()
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.eval()
      module.requires_grad_(False)
  solver = config.solver
  backbone, rest = [], []
  for name, param in model.named_parameters():
    if param.requires_grad:
      (backbone if name.startswith("model.pixel_level_module.encoder.") else rest).append(param)
  optimizer = torch.optim.AdamW(
      [{"params": backbone, "lr": solver.base_lr * solver.backbone_multiplier}, {"params": rest}],
      lr=solver.base_lr, betas=tuple(solver.betas), eps=solver.eps, weight_decay=solver.weight_decay)
  valid = batch["valid"]
  inputs = {
      "pixel_values": torch.from_numpy(np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))),
      "mask_labels": [torch.from_numpy(batch["masks"][b][valid[b]].astype(np.float32)) for b in range(len(valid))],
      "class_labels": [torch.from_numpy(batch["labels"][b][valid[b]].astype(np.int64)) for b in range(len(valid))],
  }
  return model, optimizer, backbone + rest, inputs


def train_step_rows(args) -> list[dict]:
  """Training-step throughput of ours (jitted `make_train_step`, state donated) vs transformers (forward + loss +
  backward + clipping + AdamW), same images and targets, different random weights."""
  config = _ade20k_config(args.size)
  config.solver.batch_size = args.train_batch
  batch = _train_batch(args.train_batch, args.size, config.data.max_segments, config.model.num_classes)

  model = build_model(config.model)
  state, tx = train.create_train_state(config, model)
  step = jax.jit(train.make_train_step(model, tx, config), donate_argnums=0, compiler_options=compiler_options())
  device_batch = jax.device_put(batch)
  start = time.perf_counter()
  compiled = step.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def ours_step():
    holder["state"], metrics = compiled(holder["state"], device_batch)
    return float(jax.block_until_ready((holder["state"], metrics))[1]["loss"])

  ours_loss = ours_step()
  ours = time_fn(ours_step, args.train_repeats, args.train_warmup)

  hf_model, optimizer, trainable, inputs = _hf_train_setup(config, batch)

  def torch_step():
    optimizer.zero_grad(set_to_none=True)
    # transformers needs output_hidden_states=True for its auxiliary loss (with only use_auxiliary_loss it fails).
    loss = hf_model(**inputs, output_hidden_states=True).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, config.solver.clip_norm)
    optimizer.step()
    return float(loss.detach())

  theirs_loss = torch_step()
  theirs = time_fn(torch_step, args.train_repeats, args.train_warmup)
  if not np.isfinite([ours_loss, theirs_loss]).all():
    raise RuntimeError(f"non-finite training loss: ours {ours_loss}, transformers {theirs_loss}")

  per_second = lambda timing: args.train_batch / timing["median_ms"] * 1e3  # noqa: E731
  return [{
      "model": "ResNet-50 (ADE20K config)", "input": f"{args.train_batch}x{args.size}x{args.size}, "
      f"{TRAIN_SEGMENTS} segments/image", "ours (JAX) img/s": f"{per_second(ours):.2f}",
      "ours ms/step": _ms(ours, 0), "transformers (PyTorch) img/s": f"{per_second(theirs):.2f}",
      "transformers ms/step": _ms(theirs, 0), "speed-up": f"{theirs['median_ms'] / ours['median_ms']:.2f}x",
      "compile s": f"{compile_s:.1f}",
      "raw": {"ours": ours, "theirs": theirs, "compile_s": compile_s, "ours_images_per_s": per_second(ours),
              "theirs_images_per_s": per_second(theirs), "first_loss": {"ours": ours_loss, "theirs": theirs_loss}},
  }]


PIPELINE_IMAGES = 64  # distinct examples in the pipeline section, repeated


def _ade_like_examples(count: int, height: int, width: int, num_classes: int) -> list:
  """Encoded examples with TFDS coco/2017_panoptic's features (see tests/test_pipeline.py): a JPEG (quality 90) of
  15-25 blobs, each a flat colour with a gentle gradient and mild noise (compressing like a photo rather than like
  noise), and the panoptic PNG of those blobs with random segment ids and classes; nothing crowd, no void."""
  examples = []
  for i in range(count):
    rng = np.random.default_rng(1000 + i)
    num = int(rng.integers(15, 26))
    blobs = _voronoi(rng, (height, width), num)
    colours = rng.uniform(30, 225, (num, 3))
    ramp = np.linspace(-20, 20, width)[None, :, None] * rng.uniform(-1, 1, 3)
    image = colours[blobs] + ramp + rng.normal(0, 4, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    segment_ids = rng.choice(np.arange(1, 256 ** 3), num, replace=False)
    ids = segment_ids[blobs]
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8)
    examples.append({
        "image": tf.io.encode_jpeg(image, quality=90).numpy(), "image/id": np.int64(i),
        "panoptic_image": tf.io.encode_png(rgb).numpy(),
        "panoptic_objects": {
            "id": segment_ids.astype(np.int64), "label": rng.integers(0, num_classes, num).astype(np.int64),
            "is_crowd": np.zeros(num, bool), "area": np.bincount(blobs.ravel(), minlength=num).astype(np.int64),
            "bbox": np.zeros((num, 4), np.float32)},
    })
  return examples


def pipeline_rows(args, train_step: list[dict] | None = None) -> list[dict]:
  """Images/s of `pipeline.train_batches` with the ADE20K augmentations on in-memory encoded examples, and the
  ratio to our train step's images/s when that section ran before in the same run."""
  data = _ade20k_config(args.size).data
  height, width = args.size, round(args.size * 4 / 3)
  examples = _ade_like_examples(PIPELINE_IMAGES, height, width, data.num_classes)
  jpeg_kb = statistics.mean(len(e["image"]) for e in examples) / 1024
  dataset = functools.reduce(lambda ds, e: ds.concatenate(tf.data.Dataset.from_tensors(e)), examples[1:],
                             tf.data.Dataset.from_tensors(examples[0]))
  batches = pipeline.Batches(pipeline.train_batches(dataset, data, batch_size=args.pipeline_batch),
                             "synthetic ADE-like")
  start = time.perf_counter()
  for _ in range(args.pipeline_warmup):
    next(batches)
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.pipeline_batches):
    start = time.perf_counter()
    next(batches)
    times.append((time.perf_counter() - start) * 1e3)
  images_per_s = args.pipeline_batch * len(times) / sum(times) * 1e3
  timing = {"median_ms": statistics.median(times), "min_ms": min(times)}
  step_rate = train_step[0]["raw"]["ours_images_per_s"] if train_step else None
  return [{
      "input": f"{PIPELINE_IMAGES} JPEGs {height}x{width} (mean {jpeg_kb:.0f} KB), 15-25 segments, repeated",
      "augmentations": f"{data.task}: short side {data.min_size_train[0]}..{data.min_size_train[-1]}, crop "
      f"{data.crop_size[0]}x{data.crop_size[1]}, SSD colour, flip",
      "batch": args.pipeline_batch, "batches timed": args.pipeline_batches, "img/s": f"{images_per_s:.1f}",
      "ms/batch": _ms(timing, 0),
      "pipeline / our train step": f"{images_per_s / step_rate:.1f}x" if step_rate else "n/a (train_step not run)",
      "raw": {"images_per_s": images_per_s, "batch_ms": timing, "batch_times_ms": times, "warmup_s": warmup_s,
              "mean_jpeg_bytes": jpeg_kb * 1024, "train_step_images_per_s": step_rate},
  }]


SECTIONS = {"forward": forward_rows, "inference": inference_rows, "matching": matching_rows, "loss": loss_rows,
            "train_step": train_step_rows, "pipeline": pipeline_rows}


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):  # not Linux, or no model name listed
    return platform.processor() or "unknown"


def environment() -> dict:
  cpu = _cpu_name()
  return {"jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu": cpu, "cores": os.cpu_count(),
          "load_average": os.getloadavg()[0], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def markdown_table(rows: list[dict]) -> str:
  """One column per key of the rows, in order, except `raw` (the unformatted numbers, kept for the JSON)."""
  columns = [c for c in rows[0] if c != "raw"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {sorted(SECTIONS)}")
  parser.add_argument("--models", default="resnet50,swin_tiny", help=f"comma-separated, from {list(MODELS)}")
  parser.add_argument("--size", type=int, default=512, help=f"square input side, a multiple of {SIZE_DIVISIBILITY}")
  parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
  parser.add_argument("--match-batch", type=int, default=16, help="images per matching / loss call")
  parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (at least 5)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
  parser.add_argument("--train-batch", type=int, default=2, help="images per training step (train_step)")
  parser.add_argument("--train-repeats", type=int, default=5, help="timed training steps per side (at least 3)")
  parser.add_argument("--train-warmup", type=int, default=2, help="untimed training steps before timing")
  parser.add_argument("--pipeline-batch", type=int, default=16, help="images per input pipeline batch")
  parser.add_argument("--pipeline-batches", type=int, default=20, help="pipeline batches timed, after warm-up")
  parser.add_argument("--pipeline-warmup", type=int, default=3, help="pipeline batches drawn before timing")
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  args.sections = args.sections.split(",")
  args.models = args.models.split(",")
  for flag, given, allowed in (("--sections", args.sections, SECTIONS), ("--models", args.models, MODELS)):
    unknown = sorted(set(given) - set(allowed))
    if unknown:
      parser.error(f"{flag}: unknown {unknown}; choose from {sorted(allowed)}")
  if args.size % SIZE_DIVISIBILITY:
    parser.error(f"--size must be a multiple of {SIZE_DIVISIBILITY}")
  if args.repeats < 5:
    parser.error("--repeats must be at least 5")
  if args.train_repeats < 3:
    parser.error("--train-repeats must be at least 3")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
  env = environment()
  print(f"jax {env['jax']} ({env['jax_backend']}), torch {env['torch']} ({env['torch_threads']} threads), "
        f"CPU: {env['cpu']}, {env['cores']} cores, 1-min load average {env['load_average']:.2f}"
        + (f", XLA_FLAGS={env['xla_flags']}" if env["xla_flags"] else ""))
  results = {"environment": env, "args": vars(args), "sections": {}}
  for name in args.sections:
    if name == "pipeline":  # compared with our train step when that section ran first
      rows = pipeline_rows(args, results["sections"].get("train_step"))
    else:
      rows = SECTIONS[name](args)
    results["sections"][name] = rows
    print(f"\n## {name}\n\n{markdown_table(rows)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
