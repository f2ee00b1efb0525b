"""Data-parallel device mesh helpers: one ('data',) mesh over every device of every host.

The same code runs on one CPU, on several simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and on a TPU pod slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over all global devices.

  The axis type is Auto (GSPMD propagation): recent JAX makes `jax.make_mesh` default to
  Explicit axes, under which e.g. flax's Dropout mask (replicated) cannot be combined with a
  batch-sharded activation.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over the 'data' mesh axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Replicates an array on every device of the mesh."""
  return NamedSharding(mesh, P())


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places every leaf of a pytree, replicated, on the mesh."""
  return jax.device_put(tree, replicated_sharding(mesh))


def global_batch_from_local(local_batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Assembles this host's rows [B_local, ...] into a global array [B_local * hosts, ...].

  On one host this is a sharded `device_put`; on several, each host passes its own slice.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.make_array_from_process_local_data(sharding, local_batch)


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads the leading axis of x [N, ...] up to a multiple of ``multiple`` by repeating row 0.

  Returns:
    (padded [M, ...], mask [M] bool with True on the N real rows). Compiled code keeps fixed
    shapes this way; the mask drops the padding afterwards, so no real row is ever lost.
  """
  n = x.shape[0]
  if n == 0:
    raise ValueError('Cannot pad an empty batch.')
  m = -(-n // multiple) * multiple
  mask = np.arange(m) < n
  if m == n:
    return x, mask
  pad = np.broadcast_to(x[:1], (m - n,) + x.shape[1:])
  return np.concatenate([x, pad], axis=0), mask


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` for multi-host runs (no-op on a single host).

  Explicit arguments (all three, e.g. from main's ``--coordinator_address``, ``--num_processes``
  and ``--process_id`` flags) start a job anywhere, e.g. several processes on one machine with
  JAX's CPU collectives. Without them, multi-host jobs are detected through the environment
  variables the cluster sets (TPU pod slices, SLURM, ``JAX_COORDINATOR_ADDRESS`` with a cluster
  JAX auto-detects); single-host runs (one CPU, one TPU VM, Colab) skip it. Must run before
  anything else touches JAX devices.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: number of processes of the job.
    process_id: this process's index in [0, num_processes).

  Raises:
    ValueError: only some of the three arguments were given, or they are out of range.
  """
  import os
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          'A multi-process run needs all of --coordinator_address (host:port of process 0), '
          f'--num_processes and --process_id; got coordinator_address={coordinator_address!r}, '
          f'num_processes={num_processes}, process_id={process_id}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes}).')
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  multi = any(os.environ.get(v) for v in (
      'JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS'))
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if multi or tpu_hosts.count(',') >= 1:
    try:
      jax.distributed.initialize()
    except RuntimeError as e:  # already initialised
      if 'already' not in str(e):
        raise


def all_processes(flag: bool) -> bool:
  """True when ``flag`` is True on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def to_host(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly multi-host sharded) array to a numpy array on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


__all__ = ['DATA_AXIS', 'data_mesh', 'batch_sharding', 'replicated_sharding', 'replicate',
           'global_batch_from_local', 'pad_to_multiple', 'maybe_initialize_distributed',
           'all_processes', 'to_host']
