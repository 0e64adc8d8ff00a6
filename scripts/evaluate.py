"""Evaluates MaskFormer weights on a dataset split and writes `eval_results.json` into --workdir.

  python scripts/evaluate.py --config=configs/shapes_swin_mini.py --workdir=workdirs/shapes
  python scripts/evaluate.py --config=configs/ade20k_r50.py --workdir=/tmp/eval --checkpoint=/tmp/ade20k_r50_model

--checkpoint is a training workdir or a model directory written by scripts/convert_checkpoint.py (default: the
--workdir itself, at its latest step, or --step). Values are in percent, as in the paper's tables: mIoU, fwIoU,
mACC, pAcc and per-class IoU for every dataset; PQ, SQ, RQ (overall, _th, _st, per class) for panoptic ones.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

from absl import flags  # noqa: E402

from maskformer_jax import cli, evaluation  # noqa: E402

_CONFIG = cli.define_config(None, "Config file, e.g. configs/shapes_swin_mini.py (data and test settings).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where eval_results.json goes; also the default --checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or model directory holding the weights.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (default: config.data.eval_split).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results = evaluation.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _STEP.value,
                                           _SPLIT.value)
  print(json.dumps(evaluation.summary(results)))


if __name__ == "__main__":
  cli.run(main)
