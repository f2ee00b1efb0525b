"""tcmalloc under XLA:CPU, so that a CPU run reuses its buffers instead of faulting them in anew.

XLA:CPU takes every execution's buffers from the C allocator. glibc serves blocks above its mmap
threshold (32 MiB at most) with fresh ``mmap`` pages and unmaps them on ``free``, so each train
step of a large network faults its whole working set in again and the kernel zero-fills it. At
CelebA size and batch 64 that was a third of the step's CPU time (9.3M minor page faults in a
two-step benchmark; glibc's tunables did not help). tcmalloc keeps freed pages for reuse: the
same step ran 1.9-2.0x faster (issue 12, README "Development").

The allocator is chosen when a process starts, so `maybe_reexec` re-executes the command line
once with ``LD_PRELOAD`` set. Only entry points call it (``python -m ddm_ood.main``, the
benchmarks); importing the library never re-executes anything. Results do not depend on the
allocator (a test compares trained parameters and scorer features bitwise).

Resolution (`resolve_preload`, pure):

* ``DDM_OOD_MALLOC=system``: nothing (glibc);
* ``LD_PRELOAD`` already names tcmalloc or jemalloc: nothing (the user chose);
* ``JAX_PLATFORMS`` naming only non-CPU platforms, or an accelerator plugin installed and
  ``JAX_PLATFORMS`` not forcing the CPU: nothing (the host allocator is off the hot path there);
* one JAX device spread over several cores (``DDM_OOD_CPU_DEVICES=1`` or an ``XLA_FLAGS`` device
  count of 1 on a multi-core machine): nothing, unless ``DDM_OOD_MALLOC`` names a library. There
  the CelebA-size step ran 1.5-1.7x slower on tcmalloc than on glibc (0.089-0.103 vs 0.154-0.155
  steps/s at batch 16), while one device per core (the default) and one pinned core gained;
* ``DDM_OOD_MALLOC=PATH``: that shared library (an error if it does not exist);
* otherwise (``DDM_OOD_MALLOC`` unset or ``auto``): the first tcmalloc found in the system's
  library directories (``apt-get install libtcmalloc-minimal4``), or nothing with a hint.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from absl import logging

from ddm_ood import cpu_devices

ENV_VAR = 'DDM_OOD_MALLOC'
# Set in the re-executed child: the preloaded library, and a guard against re-executing again.
ACTIVE_ENV_VAR = 'DDM_OOD_MALLOC_ACTIVE'
LIBRARY_NAMES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
SEARCH_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
               '/usr/lib', '/usr/local/lib')
_MALLOC_NAMES = ('tcmalloc', 'jemalloc')
# tcmalloc reports every allocation above 1 GiB on stderr; a CelebA-size step makes several.
_QUIET = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50)}


def find_tcmalloc(search_dirs: Sequence[str] = SEARCH_DIRS) -> str | None:
  """The path of the first tcmalloc shared library in ``search_dirs``, or None."""
  for name in LIBRARY_NAMES:
    for d in search_dirs:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def resolve_preload(env_value: str | None, ld_preload: str | None, jax_platforms: str | None,
                    accelerator_installed: bool, found: str | None,
                    one_device_spread: bool = False) -> str | None:
  """Which shared library to preload; None = run with the allocator the process has.

  Args:
    env_value: the ``DDM_OOD_MALLOC`` value (None / '' / 'auto' = automatic).
    ld_preload: the current ``LD_PRELOAD`` value (or None).
    jax_platforms: the ``JAX_PLATFORMS`` value (or None).
    accelerator_installed: whether a GPU/TPU plugin of JAX is installed.
    found: what `find_tcmalloc` returned.
    one_device_spread: whether the CPU backend will run one device on several cores
      (`one_device_on_many_cores`).

  Returns:
    A library path, or None.

  Raises:
    ValueError: ``DDM_OOD_MALLOC`` names a file that does not exist.
  """
  choice = (env_value or '').strip()
  if choice.lower() == 'system':
    return None
  if _preloaded_malloc(ld_preload):
    return None
  platforms = [p.strip() for p in (jax_platforms or '').lower().split(',') if p.strip()]
  if platforms and 'cpu' not in platforms:
    return None
  if accelerator_installed and platforms[:1] != ['cpu']:
    return None
  if choice and choice.lower() != 'auto':
    if not os.path.isfile(choice):
      raise ValueError(f'{ENV_VAR}={choice!r}: no such file. Give the path of a malloc shared '
                       f"library (e.g. libtcmalloc_minimal.so.4), 'auto' or 'system'.")
    return choice
  return None if one_device_spread else found


def one_device_on_many_cores(xla_flags: str | None, cpu_devices_env: str | None, cores: int,
                             jax_platforms: str | None, accelerator_installed: bool) -> bool:
  """Whether the CPU backend will run one JAX device on more than one core (pure).

  An explicit ``--xla_force_host_platform_device_count`` decides; otherwise
  `ddm_ood.cpu_devices.resolve_cpu_device_count` (without the batch divisibility, which only
  `main` knows later). An invalid ``DDM_OOD_CPU_DEVICES`` counts as False (cpu_devices reports it).
  """
  if cores <= 1:
    return False
  match = re.search(re.escape(cpu_devices.XLA_FLAG) + r'=(\d+)', xla_flags or '')
  if match:
    return int(match.group(1)) <= 1
  try:
    n = cpu_devices.resolve_cpu_device_count(xla_flags, cpu_devices_env, cores, jax_platforms,
                                             (), accelerator_installed)
  except ValueError:
    return False
  return n is None


def _preloaded_malloc(ld_preload: str | None) -> str | None:
  """The tcmalloc / jemalloc entry of an ``LD_PRELOAD`` value, or None."""
  for entry in (ld_preload or '').replace(':', ' ').split():
    if any(n in os.path.basename(entry) for n in _MALLOC_NAMES):
      return entry
  return None


def active() -> str | None:
  """The malloc library preloaded into this process (by `maybe_reexec` or the user), or None."""
  return os.environ.get(ACTIVE_ENV_VAR) or _preloaded_malloc(os.environ.get('LD_PRELOAD'))


def describe() -> str:
  """One line for the log: which allocator this process runs on, and how to change it."""
  if os.environ.get(ACTIVE_ENV_VAR):
    return f'Host allocator: {active()} ({ENV_VAR}=system for glibc malloc).'
  if active():
    return f'Host allocator: {active()} (LD_PRELOAD).'
  if find_tcmalloc():
    hint = (f' (tcmalloc is used only with one CPU device per core, unless {ENV_VAR}=system; '
            f'{ENV_VAR}=PATH forces a library.)')
  else:
    hint = (' XLA:CPU runs large networks up to 2x faster on tcmalloc: apt-get install '
            'libtcmalloc-minimal4.')
  return f'Host allocator: the system malloc.{hint}'


def maybe_reexec(argv: Sequence[str] | None = None) -> None:
  """Re-executes this process once with tcmalloc preloaded, when `resolve_preload` picks one.

  Call it first thing in an entry point, before any work (the process image is replaced; nothing
  after this call runs in the parent). Returns normally when there is nothing to do, when this
  process is already the re-executed child, or when ``exec`` fails (a warning; glibc is used).

  Args:
    argv: the full command line to re-execute, interpreter included; default
      ``[sys.executable, *sys.orig_argv[1:]]`` (keeps ``-m module`` / ``-c code``).
  """
  if os.environ.get(ACTIVE_ENV_VAR):
    return
  accelerator = cpu_devices.accelerator_installed()
  platforms = os.environ.get('JAX_PLATFORMS')
  spread = one_device_on_many_cores(
      os.environ.get('XLA_FLAGS'), os.environ.get(cpu_devices.ENV_VAR),
      cpu_devices.available_cores(), platforms, accelerator)
  try:
    lib = resolve_preload(os.environ.get(ENV_VAR), os.environ.get('LD_PRELOAD'), platforms,
                          accelerator, find_tcmalloc(), spread)
  except ValueError as e:
    print(f'ddm_ood: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  if lib is None:
    return
  argv = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
  env = dict(os.environ, **_QUIET)
  env['LD_PRELOAD'] = ' '.join(p for p in (lib, env.get('LD_PRELOAD', '')) if p)
  env[ACTIVE_ENV_VAR] = lib
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(argv[0], argv, env)
  except OSError as e:
    logging.warning('Could not re-execute with %s preloaded (%s); using glibc malloc.', lib, e)


__all__ = ['ENV_VAR', 'ACTIVE_ENV_VAR', 'find_tcmalloc', 'resolve_preload',
           'one_device_on_many_cores', 'active', 'describe', 'maybe_reexec']
