"""The three CPU set-ups that ``--compare_devices`` benchmarks run, each in a fresh subprocess.

* ``one_core``: one JAX device, the process pinned to one core (its CPU affinity): the baseline
  for "all cores vs one";
* ``one_device``: one JAX device, every core allowed (XLA's thunk executor and intra-op threads
  already spread one device's ops over the cores);
* ``all_cores``: one JAX device per core (`ddm_ood.cpu_devices`, the default of ``main``);
* ``all_cores_system_malloc``: as ``all_cores`` but on glibc malloc (``DDM_OOD_MALLOC=system``),
  so its ratio to ``all_cores`` is what the allocator gives. The other modes choose the allocator
  as ``main`` does (`ddm_ood.host_malloc`): tcmalloc where installed, except ``one_device``
  (one device spread over several cores stays on glibc).
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Sequence


MODES = ('one_core', 'one_device', 'all_cores', 'all_cores_system_malloc')


def matmul_gflops_per_s(n: int = 2048, reps: int = 5) -> float:
  """float32 GFLOP/s of a jitted n x n matmul on the default device: on the CPU the peak that
  each mode's ``fraction_of_peak`` divides by (`peak.py`; measured in the same process, same
  cores)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(mm(a))
  return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def run_modes(argv: Sequence[str], parse: Callable[[str], dict], rate_key: str, name: str,
              rounds: int = 1) -> dict:
  """Runs ``argv`` once per mode, ``rounds`` times interleaved; returns runs and speed-ups.

  Interleaving (one_core, one_device, all_cores, one_core, ...) and taking each mode's median run
  keeps a drift in the machine's speed (these machines vary by tens of percent within minutes)
  out of the ratios.

  Args:
    argv: the child command line (``[sys.executable, script, ...]``).
    parse: the child's stdout -> its result dict (must hold ``rate_key``).
    rate_key: the throughput figure to compare (e.g. ``'steps_per_sec'``).
    name: the benchmark's name, for errors.
    rounds: how many times each mode runs.

  Returns:
    ``{'cores', 'rounds', 'one_core', 'one_device', 'all_cores', 'all_cores_system_malloc'``
    (each mode's median run, with ``rates``: every round's figure),
    ``'speedup_all_cores_vs_one_core', 'speedup_all_cores_vs_one_device',
    'speedup_tcmalloc_vs_system_malloc', 'loadavg'}``.
  """
  from ddm_ood.host_malloc import ACTIVE_ENV_VAR  # pylint: disable=g-import-not-at-top
  allowed = sorted(os.sched_getaffinity(0))
  runs = {m: [] for m in MODES}
  for _ in range(max(int(rounds), 1)):
    for mode in MODES:
      env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', ACTIVE_ENV_VAR)}
      if os.environ.get(ACTIVE_ENV_VAR):  # this process was re-executed: each child chooses anew
        env['LD_PRELOAD'] = env.get('LD_PRELOAD', '').replace(os.environ[ACTIVE_ENV_VAR], '')
      env.update(DDM_OOD_CPU_DEVICES=str(len(allowed) if mode.startswith('all_cores') else 1),
                 JAX_PLATFORMS='cpu')
      if mode == 'all_cores_system_malloc':
        env['DDM_OOD_MALLOC'] = 'system'
      pin = (lambda: os.sched_setaffinity(0, {allowed[0]})) if mode == 'one_core' else None
      proc = subprocess.run(list(argv), env=env, preexec_fn=pin, capture_output=True,
                            text=True, check=False)
      if proc.returncode:
        raise RuntimeError(f'{name} ({mode}) failed:\n{proc.stderr[-3000:]}')
      runs[mode].append(parse(proc.stdout))
  median = {}
  for mode, results in runs.items():
    ranked = sorted(results, key=lambda r: r[rate_key])
    median[mode] = {**ranked[(len(ranked) - 1) // 2], 'rates': [r[rate_key] for r in results]}
  rate = {m: median[m][rate_key] for m in MODES}
  return {'cores': len(allowed), 'rounds': len(runs['one_core']), **median,
          'speedup_all_cores_vs_one_core': rate['all_cores'] / rate['one_core'],
          'speedup_all_cores_vs_one_device': rate['all_cores'] / rate['one_device'],
          'speedup_tcmalloc_vs_system_malloc': rate['all_cores'] / rate['all_cores_system_malloc'],
          'loadavg': os.getloadavg()[0]}
