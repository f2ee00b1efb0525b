"""Every CPU core as a JAX device, so that data parallelism on a CPU machine uses all cores.

XLA's CPU backend runs one compiled UNet program on about one core, however many cores the machine
has (issue 12: the main job's user time equalled its wall time on 2 cores). Exposing C host devices
(``--xla_force_host_platform_device_count=C``) lets the existing ('data',) mesh split each batch
over the cores. The flag is read once, when JAX creates its CPU backend, so `configure` must run
before anything calls ``jax.devices()`` (``import jax`` alone is fine).

Resolution (`resolve_cpu_device_count`, pure):

* an explicit ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins (left untouched);
* ``JAX_PLATFORMS`` naming only non-CPU platforms: left untouched;
* ``DDM_OOD_CPU_DEVICES=N``: N devices exactly (``1`` turns the feature off);
* an accelerator plugin installed (CUDA, ROCm, TPU) and ``JAX_PLATFORMS`` not forcing the CPU: left
  untouched (the default backend will not be the CPU; a TPU VM has hundreds of cores);
* otherwise: the cores this process may run on, lowered to the largest count that divides every
  size in ``divides`` (the global training batch must split evenly over the devices).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import logging

ENV_VAR = 'DDM_OOD_CPU_DEVICES'
XLA_FLAG = '--xla_force_host_platform_device_count'


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unsupported)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def resolve_cpu_device_count(xla_flags: str | None, env_value: str | None, cores: int,
                             jax_platforms: str | None = None,
                             divides: Sequence[int] = (),
                             accelerator_installed: bool = False) -> int | None:
  """How many host CPU devices to request; None = leave ``XLA_FLAGS`` as it is.

  Args:
    xla_flags: the current ``XLA_FLAGS`` value (or None).
    env_value: the ``DDM_OOD_CPU_DEVICES`` value (or None / '' when unset).
    cores: cores available to the process.
    jax_platforms: the ``JAX_PLATFORMS`` value (or None).
    divides: sizes the device count must divide when it is chosen automatically (e.g. the global
      training batch). An explicit ``DDM_OOD_CPU_DEVICES`` is never adjusted.
    accelerator_installed: whether a GPU/TPU plugin of JAX is installed.

  Returns:
    N >= 2 to add ``--xla_force_host_platform_device_count=N``, or None.

  Raises:
    ValueError: ``DDM_OOD_CPU_DEVICES`` is not a positive integer.
  """
  if xla_flags and XLA_FLAG in xla_flags:
    return None
  platforms = [p.strip() for p in (jax_platforms or '').lower().split(',') if p.strip()]
  if platforms and 'cpu' not in platforms:
    return None
  if env_value is not None and env_value.strip():
    try:
      n = int(env_value)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f'{ENV_VAR}={env_value!r} must be a positive integer (the number of CPU '
                       f'devices; 1 = off); unset it to use all {cores} cores.')
    return n if n > 1 else None
  if accelerator_installed and platforms[:1] != ['cpu']:
    return None
  n = max(int(cores), 1)
  sizes = [int(s) for s in divides if int(s) > 0]
  while n > 1 and any(s % n for s in sizes):
    n -= 1
  return n if n > 1 else None


def accelerator_installed() -> bool:
  """Whether a JAX GPU or TPU plugin is installed (without initialising any backend)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  for dist in metadata.distributions():
    name = (dist.metadata['Name'] or '').lower().replace('_', '-')
    if name.startswith(('libtpu', 'jax-cuda', 'jax-rocm', 'jaxlib-cuda')):
      return True
  return False


def backends_initialized() -> bool:
  """Whether JAX has already created its backends (then XLA_FLAGS changes come too late)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def configure(divides: Sequence[int] = ()) -> int | None:
  """Adds the resolved host device count to ``os.environ['XLA_FLAGS']`` (before JAX starts).

  Args:
    divides: sizes the automatic count must divide (see `resolve_cpu_device_count`).

  Returns:
    The device count requested, or None when nothing was changed.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  n = resolve_cpu_device_count(flags, os.environ.get(ENV_VAR), available_cores(),
                               os.environ.get('JAX_PLATFORMS'), divides,
                               accelerator_installed())
  if n is None:
    return None
  if backends_initialized():
    logging.warning('JAX is already initialised; cannot expose %d CPU devices. Call '
                    'ddm_ood.cpu_devices.configure() before the first jax.devices(), or set '
                    'XLA_FLAGS=%s=%d.', n, XLA_FLAG, n)
    return None
  os.environ['XLA_FLAGS'] = f'{flags} {XLA_FLAG}={n}'.strip()
  logging.info('Using %d CPU devices (one per core; %s=1 turns this off).', n, ENV_VAR)
  return n


__all__ = ['ENV_VAR', 'XLA_FLAG', 'available_cores', 'resolve_cpu_device_count',
           'accelerator_installed', 'backends_initialized', 'configure']
