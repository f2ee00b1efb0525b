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


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` on multi-host TPU/GPU clusters (no-op elsewhere).

  Multi-host jobs are detected through the environment variables the cluster sets; single-host
  runs (one CPU, one TPU VM, Colab) skip it.
  """
  import os
  multi = any(os.environ.get(v) for v in (
      'JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS'))
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if multi or tpu_hosts.count(',') >= 1:
    try:
      jax.distributed.initialize()
    except RuntimeError as e:  # already initialised
      if 'already' not in str(e):
        raise


def to_host(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly multi-host sharded) array to a numpy array on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


__all__ = ['DATA_AXIS', 'data_mesh', 'batch_sharding', 'replicated_sharding', 'replicate',
           'global_batch_from_local', 'pad_to_multiple', 'maybe_initialize_distributed',
           'to_host']
