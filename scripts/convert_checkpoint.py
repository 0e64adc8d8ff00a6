"""Converts an official Detectron2 `.pkl` or a transformers `save_pretrained` directory into a model directory.

  python scripts/convert_checkpoint.py --source=detectron2 --input=model_final_d8dbeb.pkl --output=/tmp/ade20k_r50
  python scripts/convert_checkpoint.py --source=hf --input=/path/to/maskformer-swin-tiny-ade --output=/tmp/swin_t

The output holds `model_config.json` and an orbax `variables/` checkpoint; load it with
`maskformer_jax.checkpoint.load_model(OUTPUT)`. The architecture is read from the checkpoint itself; for a `.pkl`,
`--config=configs/<file>.py` checks it against a config instead. Nothing in the input is executed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

from absl import app, flags  # noqa: E402

from maskformer_jax import cli  # noqa: E402
from maskformer_jax.checkpoint import save_model  # noqa: E402
from maskformer_jax.convert import load_detectron2_checkpoint, load_hf_checkpoint  # noqa: E402

_SOURCE = flags.DEFINE_enum("source", None, ["hf", "detectron2"], "Checkpoint format of --input.")
_INPUT = flags.DEFINE_string("input", None, "A Detectron2 .pkl file or a transformers save_pretrained directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (must not hold a checkpoint already).")
_CONFIG = cli.define_config(None, "Optional config whose `model` the .pkl must match.")
flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  del argv
  if _SOURCE.value == "hf":
    if _CONFIG.value is not None:
      raise app.UsageError("--config applies to --source=detectron2; a transformers directory has its own config.")
    model_config, variables = load_hf_checkpoint(_INPUT.value)
  else:
    model_config = _CONFIG.value.model if _CONFIG.value is not None else None
    model_config, variables = load_detectron2_checkpoint(_INPUT.value, model_config)
  save_model(_OUTPUT.value, model_config, variables)
  print(f"Wrote {_OUTPUT.value} ({model_config.backbone.name} backbone, {model_config.num_classes} classes).")


if __name__ == "__main__":
  cli.run(main)
