"""Benchmarks maskformer-jax against transformers' PyTorch MaskFormer on the same CPU, side by side in one run.

    .venv/bin/python scripts/benchmark.py [--sections=forward] [--models=resnet50,swin_tiny] [--size=512]
        [--batch=1] [--repeats=7] [--warmup=2] [--json=PATH]

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

Prints a markdown table; `--json=PATH` also writes the rows and the environment as JSON. Timings are only
meaningful on an otherwise idle machine (the header shows the load average). `XLA_FLAGS` from the environment
applies to our side and is printed in the header.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from maskformer_jax.convert.hf import load_hf_checkpoint
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


def _ms(timing: dict) -> str:
  return f"{timing['median_ms']:.1f} (min {timing['min_ms']:.1f})"


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


SECTIONS = {"forward": forward_rows}


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
  parser.add_argument("--sections", default="forward", help=f"comma-separated, from {sorted(SECTIONS)}")
  parser.add_argument("--models", default="resnet50,swin_tiny", help=f"comma-separated, from {list(MODELS)}")
  parser.add_argument("--size", type=int, default=512, help=f"square input side, a multiple of {SIZE_DIVISIBILITY}")
  parser.add_argument("--batch", type=int, default=1)
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
