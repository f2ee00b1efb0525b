"""Convolution weight gradients on XLA:CPU: XLA's own vs matmul formulations (prints one JSON).

  python benchmarks/conv_grad_bench.py [--repeats=5]

The CelebA-size train step spends ~40% of its op time in XLA's weight-gradient convolutions
(``op_profile.py``; README). XLA computes dW as a convolution of the input with the output
gradient as the kernel: a window the size of the feature map over only B input features. This
benchmark times, for the UNets' convolution shapes [B, H, W, C_in] -> C_out (kernel k x k, SAME,
stride 1), the weight gradient ``jax.vjp(conv, w)`` three ways (each also as a fraction of the
``core_modes`` matmul rate measured in the same run), after checking that they agree:

* ``xla``: ``lax.conv_general_dilated``'s own gradient;
* ``taps``: one [C_in, B*H*W] x [B*H*W, C_out] matmul per kernel tap over a strided slice of the
  padded input;
* ``im2col``: the taps concatenated into one [B*H*W, k*k*C_in] matrix, then one matmul.

The alternatives were tried inside the train step (a ``jax.custom_vjp`` conv) and not adopted:
isolated wins here did not survive there (README, "Development"). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import core_modes  # noqa: E402  pylint: disable=g-import-not-at-top
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from ddm_ood import compile_cache  # noqa: E402
from ddm_ood import flops as flops_lib  # noqa: E402

NHWC = ('NHWC', 'HWIO', 'NHWC')
# (B per device, H, W, C_in, C_out, k): CelebA-size network at batch 16 on 2 devices, then the
# default Fashion-MNIST network at batch 64 on 2 devices.
SHAPES = [(8, 32, 32, 128, 128, 3), (8, 32, 32, 384, 128, 3), (8, 16, 16, 256, 256, 3),
          (8, 8, 8, 256, 256, 3), (8, 32, 32, 256, 128, 1),
          (32, 28, 28, 16, 16, 3), (32, 14, 14, 32, 32, 3), (32, 7, 7, 32, 32, 3),
          (32, 28, 28, 32, 16, 1)]


def _taps(x, k):
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  return [lax.slice(xp, (0, i, j, 0), (b, i + h, j + w, c)) for i in range(k) for j in range(k)]


def weight_grad(method: str, x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  """dW [k, k, C_in, C_out] of a SAME, stride-1 conv with input x [B, H, W, C_in], grad g."""
  c_in, c_out = x.shape[-1], g.shape[-1]
  if method == 'xla':
    w0 = jnp.zeros((k, k, c_in, c_out), x.dtype)
    return jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                      dimension_numbers=NHWC), w0)[1](g)[0]
  n = g.shape[0] * g.shape[1] * g.shape[2]
  g2 = g.reshape(n, c_out)
  taps = _taps(x, k)
  if method == 'taps':
    dw = jnp.stack([lax.dot_general(t.reshape(n, c_in), g2, (((0,), (0,)), ((), ())))
                    for t in taps])
  elif method == 'im2col':
    dw = lax.dot_general(jnp.concatenate(taps, axis=-1).reshape(n, k * k * c_in), g2,
                         (((0,), (0,)), ((), ())))
  else:
    raise ValueError(f'Unknown method {method!r}.')
  return dw.reshape(k, k, c_in, c_out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  compile_cache.configure()
  rows = []
  for (b, h, w, c_in, c_out, k) in SHAPES:
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (b, h, w, c_in))
    g = jax.random.normal(kg, (b, h, w, c_out))
    # The useful work of dW = that of the forward conv (`ddm_ood.flops`: padding taps excluded).
    flops = flops_lib.count_flops(
        lambda x_, w_: lax.conv_general_dilated(x_, w_, (1, 1), 'SAME', dimension_numbers=NHWC),
        x, jax.ShapeDtypeStruct((k, k, c_in, c_out), x.dtype))
    row, ref = {'shape': [b, h, w, c_in, c_out, k]}, None
    for method in ('xla', 'taps', 'im2col'):
      fn = jax.jit(lambda x_, g_, m=method: weight_grad(m, x_, g_, k))
      out = np.asarray(fn(x, g))
      if ref is None:
        ref = out
      row[f'{method}_max_rel_diff'] = float(np.abs(out - ref).max() / np.abs(ref).max())
      best = float('inf')
      for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(args.repeats):
          res = fn(x, g)
        jax.block_until_ready(res)
        best = min(best, (time.perf_counter() - t0) / args.repeats)
      row[f'{method}_ms'] = best * 1e3
      row[f'{method}_gflops_per_s'] = flops / best / 1e9
    rows.append(row)
  mm = core_modes.matmul_gflops_per_s()
  for row in rows:
    for method in ('xla', 'taps', 'im2col'):
      row[f'{method}_fraction_of_matmul'] = row[f'{method}_gflops_per_s'] / mm
  print(json.dumps({'backend': jax.default_backend(), 'devices': jax.device_count(),
                    'matmul_2048_gflops_per_s': mm, 'loadavg': os.getloadavg()[0],
                    'rows': rows}))


if __name__ == '__main__':
  main()
