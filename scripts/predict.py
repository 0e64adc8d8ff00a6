"""Segments images with MaskFormer weights and writes a picture and the raw label maps of each.

  python scripts/predict.py --config=configs/shapes_swin_mini.py --checkpoint=workdirs/shapes \\
      --input=photos/ --output=predictions/
  python scripts/predict.py --config=configs/ade20k_r50.py --checkpoint=/tmp/ade20k_r50_model \\
      --input=photo.jpg --output=/tmp/out

--checkpoint is a training workdir (its latest step, or --step) or a model directory written by
scripts/convert_checkpoint.py. For each image NAME: NAME.png (the image, coloured semantic regions, outlined and
labelled panoptic segments, a legend), NAME_semantic.png (class index per pixel) and, when the config's dataset
tells things from stuff, NAME_panoptic.png with NAME_segments.json (COCO panoptic format).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

from absl import flags  # noqa: E402

from maskformer_jax import cli, visualize  # noqa: E402

_CONFIG = cli.define_config(None, "Config file, e.g. configs/shapes_swin_mini.py (test settings, class names).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or model directory holding the weights.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
_INPUT = flags.DEFINE_string("input", None, "An image file, or a directory of images (PNG, JPEG, BMP, WebP).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the pictures and label maps (created if missing).")
flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])


def main(argv):
  del argv
  written = visualize.predict_files(_CONFIG.value, _CHECKPOINT.value, _INPUT.value, _OUTPUT.value, _STEP.value)
  print(f"Wrote {len(written)} pictures and their label maps to {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
