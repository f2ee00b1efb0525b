"""Data-parallel device mesh helpers: one ('data',) mesh over every device of every host.

The same code runs on one CPU, on several simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and on a TPU pod slice.
"""

from __future__ import annotations

import os
import sys
import threading

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


DEFAULT_JOIN_TIMEOUT_S = 300    # jax.distributed.initialize's own default


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 timeout_s: int = DEFAULT_JOIN_TIMEOUT_S) -> None:
  """Calls `jax.distributed.initialize` for multi-host runs (no-op on a single host).

  Explicit arguments (all three, e.g. from main's ``--coordinator_address``, ``--num_processes``
  and ``--process_id`` flags) start a job anywhere, e.g. several processes on one machine with
  JAX's CPU collectives. Without them, multi-host jobs are detected through the environment
  variables the cluster sets (TPU pod slices, SLURM, ``JAX_COORDINATOR_ADDRESS`` with a cluster
  JAX auto-detects); single-host runs (one CPU, one TPU VM, Colab) skip it. Must run before
  anything else touches JAX devices.

  Joining is bounded: if not every process has joined within ``timeout_s`` seconds, this process
  prints one ``ddm_ood: error:`` line naming the flags to check and exits with status 1 (JAX
  itself would abort the process with a C++ stack trace, which no ``except`` can catch).

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: number of processes of the job.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for every process to join.

  Raises:
    ValueError: only some of the three arguments were given, or they (or ``timeout_s``) are
      out of range.
  """
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
    if timeout_s <= 0:
      raise ValueError(f'--distributed_timeout_s={timeout_s} must be positive (seconds).')
    if num_processes > 1:
      _join(dict(coordinator_address=coordinator_address, num_processes=num_processes,
                 process_id=process_id),
            f'process {process_id} of --num_processes={num_processes} could not join the job at '
            f'--coordinator_address={coordinator_address}', timeout_s)
    return
  if multi_host_environment():
    try:
      _join({}, 'this process could not join the multi-host job the cluster environment '
            'describes', timeout_s)
    except RuntimeError as e:  # already initialised
      if 'already' not in str(e):
        raise


def multi_host_environment() -> bool:
  """Whether the cluster's environment variables describe a multi-host job (TPU pod slice,
  SLURM, ``JAX_COORDINATOR_ADDRESS``); `maybe_initialize_distributed` then joins it."""
  multi = any(os.environ.get(v) for v in (
      'JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS'))
  return multi or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') >= 1


def _join(kwargs: dict, what: str, timeout_s: int) -> None:
  """`jax.distributed.initialize(**kwargs)` under a watchdog that exits with one line after
  ``timeout_s`` (JAX's own timeout, a little later, would abort with a C++ stack trace)."""
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout_s):
      print(f'ddm_ood: error: {what} within {timeout_s} s (--distributed_timeout_s). Start every '
            'process with the same --coordinator_address and --num_processes and its own '
            '--process_id (0 .. num_processes - 1), with process 0 reachable at that address; a '
            'process that stopped early printed its own error. Raise --distributed_timeout_s if '
            'the processes start far apart.', file=sys.stderr, flush=True)
      os._exit(1)   # the main thread is blocked inside JAX's C++ connect

  threading.Thread(target=watchdog, name='join_watchdog', daemon=True).start()
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s) + 30)
  finally:
    joined.set()


_STATUS_BYTES = 4096


def first_error(message: str | None) -> str | None:
  """Exchanges every process's status; returns the first error of any process (or None).

  A collective: every process of the job calls it at the same point, with its own error message
  or None. A process's message is prefixed with its index when there are several, so every
  process reports the same line and they all stop together instead of waiting for a peer that
  has exited. One process: returns ``message``.
  """
  if jax.process_count() == 1:
    return message
  from jax.experimental import multihost_utils
  buf = np.zeros(_STATUS_BYTES + 1, np.uint8)
  if message is not None:
    data = message.encode('utf-8')[:_STATUS_BYTES]
    buf[0], buf[1:1 + len(data)] = 1, np.frombuffer(data, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(buf))
  for index, row in enumerate(every):
    if row[0]:
      text = bytes(row[1:]).rstrip(b'\0').decode('utf-8', errors='replace')
      return f'process {index}: {text}'
  return None


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
           'multi_host_environment', 'all_processes', 'first_error', 'DEFAULT_JOIN_TIMEOUT_S',
           'to_host']
