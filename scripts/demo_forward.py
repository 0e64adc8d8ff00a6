"""Runs MaskFormer on a real photo (scikit-image's coffee cup) and prints what comes out.

  python scripts/demo_forward.py                                  # ADE20K R50 architecture, random weights
  python scripts/demo_forward.py --config=configs/ade20k_swin_tiny.py
  python scripts/demo_forward.py --checkpoint=/tmp/ade20k_r50     # a directory from convert_checkpoint.py

Without --checkpoint the weights are random (nothing is downloaded), so the shapes and timings are real and the
predicted classes are not.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from absl import flags  # noqa: E402

from maskformer_jax import cli  # noqa: E402
from maskformer_jax.checkpoint import load_model  # noqa: E402
from maskformer_jax.inference import prepare_image  # noqa: E402
from maskformer_jax.models import build_model, compiler_options, init_variables  # noqa: E402

_CONFIG = cli.define_config("configs/ade20k_r50.py", "Config file (used without --checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory written by scripts/convert_checkpoint.py.")


def main(argv):
  del argv
  if _CHECKPOINT.value:
    model_config, variables = load_model(_CHECKPOINT.value)
  else:
    model_config = _CONFIG.value.model
    variables = init_variables(build_model(model_config), jax.random.key(0))
  model = build_model(model_config)
  photo = skimage.data.coffee()  # 400x600: a real, non-square photo
  images, (h, w) = prepare_image(photo, short_side=512)
  forward = jax.jit(lambda v, x: model.apply(v, x), compiler_options=compiler_options())
  start = time.perf_counter()
  outputs = jax.block_until_ready(forward(variables, images))
  first = time.perf_counter() - start
  start = time.perf_counter()
  outputs = jax.block_until_ready(forward(variables, images))
  second = time.perf_counter() - start

  print(f"photo {photo.shape} -> model input {images.shape} (resized {h}x{w}, padded to /32)")
  print(f"pred_logits {outputs['pred_logits'].shape}  pred_masks {outputs['pred_masks'].shape}  "
        f"aux_outputs {len(outputs['aux_outputs'])} x {{pred_logits {outputs['aux_outputs'][0]['pred_logits'].shape}, "
        f"pred_masks {outputs['aux_outputs'][0]['pred_masks'].shape}}}")
  probs = jax.nn.softmax(outputs["pred_logits"][0], axis=-1)[:, :-1]
  top = np.argsort(-np.asarray(probs.max(axis=0)))[:5]
  print(f"top classes by best query probability: {top.tolist()}")
  print(f"forward on {jax.devices()[0].platform}: first call {first:.1f} s (includes compilation), "
        f"second {second * 1000:.0f} ms")


if __name__ == "__main__":
  cli.run(main)
