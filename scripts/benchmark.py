"""Benchmarks maskformer-jax against transformers' PyTorch MaskFormer on the same CPU, side by side in one run.

    .venv/bin/python scripts/benchmark.py [--sections=forward,matching,loss] [--models=resnet50,swin_tiny]
        [--size=512] [--batch=1] [--match-batch=16] [--repeats=7] [--warmup=2] [--json=PATH]

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
import torch
import transformers
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from maskformer_jax.convert.hf import load_hf_checkpoint
from maskformer_jax.losses import maskformer_loss
from maskformer_jax.matching import match_queries
from maskformer_jax.models import SIZE_DIVISIBILITY, build_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from hf_reference import make_hf_model  # pylint: disable=wrong-import-position

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


def forward_rows(args) -> list[dict]:
  """Forward latency of ours vs transformers, same weights and input, one row per model."""
  rows = []
  for kind in args.models:
    hf_model = make_hf_model(kind)
    with tempfile.TemporaryDirectory() as tmp:
      hf_model.save_pretrained(tmp)
      model_config, variables = load_hf_checkpoint(tmp)
    model = build_model(model_config)

    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
    pixel_values = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    @jax.jit
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


SECTIONS = {"forward": forward_rows, "matching": matching_rows, "loss": loss_rows}


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
    rows = SECTIONS[name](args)
    results["sections"][name] = rows
    print(f"\n## {name}\n\n{markdown_table(rows)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
