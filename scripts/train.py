"""Trains MaskFormer: `--config=configs/<file>.py`, `--config.a.b=value` overrides, `--workdir`.

  python scripts/train.py --config=configs/shapes_swin_mini.py --workdir=workdirs/shapes
  python scripts/train.py --config=configs/ade20k_r50.py --workdir=/tmp/ade --config.solver.batch_size=32

Running the same command again resumes from the latest checkpoint in --workdir. For several processes (hosts, or
processes on one machine) pass --num_processes, --process_id and --coordinator_address to each; on Cloud TPU,
Slurm or Kubernetes pass --distributed alone and JAX finds its peers.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

from absl import flags  # noqa: E402

from maskformer_jax import cli, sharding  # noqa: E402

_CONFIG = cli.define_config(None, "Config file, e.g. configs/shapes_swin_mini.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard summaries.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _DISTRIBUTED.value or _NUM_PROCESSES.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from maskformer_jax import train  # pylint: disable=import-outside-toplevel  (after distributed init)
  metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items())))


if __name__ == "__main__":
  cli.run(main)
