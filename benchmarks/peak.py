"""The measured matmul peak that every benchmark's ``fraction_of_peak`` divides by.

* CPU: a jitted float32 2048 x 2048 matmul (`core_modes.matmul_gflops_per_s`, the machine's
  float32 rate on the cores this process may use);
* GPU / TPU: a jitted bfloat16 8192 x 8192 x 8192 matmul with float32 accumulation (the tensor
  cores' rate: the ceiling for a bf16 network and the honest yardstick for a float32 one).

FLOPs come from `ddm_ood.flops.count_flops` (2 x multiply-adds of every matmul and convolution,
loops counted per iteration), never from XLA's cost analysis (a loop body once, cuDNN calls not
at all). Measured in the benchmark's own process, next to its timings.
"""

from __future__ import annotations

import time

import core_modes  # pylint: disable=g-bad-import-order


def matmul_peak(reps: int = 10) -> dict:
  """``{'peak_backend', 'peak_dtype', 'peak_n', 'peak_tflops_per_s'}`` of the default backend."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if backend == 'cpu':
    n, dtype, rate = 2048, 'float32', core_modes.matmul_gflops_per_s() / 1e3
  else:
    n, dtype = 8192, 'bfloat16'
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for _ in range(3):
      jax.block_until_ready(mm(a, b))
    t = time.perf_counter()
    for _ in range(reps):
      out = mm(a, b)
    jax.block_until_ready(out)
    rate = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
  return {'peak_backend': backend, 'peak_dtype': dtype, 'peak_n': n, 'peak_tflops_per_s': rate}


def rates(flops_per_call: float, seconds_per_call: float, peak: dict) -> dict:
  """Achieved TFLOP/s and its fraction of ``peak`` (from `matmul_peak`)."""
  achieved = flops_per_call / seconds_per_call / 1e12
  return {'tflops_per_s': achieved, 'fraction_of_peak': achieved / peak['peak_tflops_per_s']}
