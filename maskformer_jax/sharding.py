"""Device mesh, shardings and global batches: one code path from one CPU to a multi-host pod.

The batch is split over the mesh's `data` axis and the training state is replicated; the loss is computed over the
global batch (global-view semantics), so nothing here needs a collective of its own. An `fsdp` or `model` axis can
be added to `config.mesh` and to the parameter specs without touching the trainer.
"""
import jax
import numpy as np

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize`, before any other JAX call of a multi-process run.

  With no arguments JAX detects Cloud TPU, Slurm, Kubernetes or MPI clusters. CPU devices of different processes
  talk through gloo, which must be chosen before the backend starts (it does not affect accelerators).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(axes) -> jax.sharding.Mesh:
  """A mesh over all devices from `config.mesh`, `((name, size), ...)`; one size may be -1 (the rest)."""
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh must have a {DATA_AXIS!r} axis for the batch; got {axes}.")
  num_devices = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis size may be -1; got {axes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {axes} needs {int(np.prod(sizes))} devices but {num_devices} are present.")
  # Auto axes: the partitioner propagates the batch sharding through the model (GSPMD-style data parallelism).
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dimension split over the data axis, the rest replicated."""
  return jax.sharding.NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """The per-process batch; raises if the global batch does not split evenly over processes and devices."""
  data_devices = mesh.shape[DATA_AXIS]
  if global_batch % data_devices or global_batch % jax.process_count():
    raise ValueError(f"solver.batch_size={global_batch} must be a multiple of the {data_devices} devices on the "
                     f"'{DATA_AXIS}' axis and of the {jax.process_count()} processes.")
  return global_batch // jax.process_count()


def global_batch(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's numpy batch -> global `jax.Array`s sharded over the data axis (each process gives its rows)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
