"""Antialiased image resizing with ``jax.image.resize`` kernels applied by numpy on the CPU."""

from __future__ import annotations

import functools

import numpy as np

from ddm_ood.data.errors import DataError

_RESIZE_BATCH = 256


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] float32 1-D resampling matrix of ``jax.image.resize`` (antialiased)."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.local_devices(backend='cpu')[0]):  # this process's own CPU
    # jax.image.resize is separable and linear, so resizing the identity along one axis (the
    # other keeps its size: exact identity weights) yields the 1-D weight matrix.
    m = jax.image.resize(np.eye(n_in, dtype=np.float32), (n_out, n_in), method=method,
                         antialias=True)
  return np.ascontiguousarray(np.asarray(m, dtype=np.float32))


def resize_images(x: np.ndarray, size: int, *, method: str = 'linear') -> np.ndarray:
  """Antialiased resize of a batch of images to ``size x size``.

  Uses the separable ``jax.image.resize(..., antialias=True)`` kernels (computed once per shape
  on the CPU) applied with numpy matmuls in batches: deterministic and device-independent. The
  default 'linear' (triangle) kernel has non-negative weights, so values stay in the input range
  (no ringing on tiny sources such as the 8x8 digits); other methods are clipped to [-1, 1].

  Args:
    x: float images ``[N, h, w, C]`` (e.g. in ``[-1, 1]``).
    size: output height and width.
    method: a ``jax.image.resize`` method ('linear', 'cubic', 'lanczos3', ...).

  Returns:
    float32 ``[N, size, size, C]``; the input (as float32) when already that size.
  """
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 4:
    raise DataError(f'resize_images expects [N, h, w, C] images, got shape {x.shape}.')
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  mh = _resize_matrix(h, size, method)
  mw = _resize_matrix(w, size, method)
  out = np.empty((n, size, size, c), np.float32)
  m = _RESIZE_BATCH
  for i in range(0, n, m):
    b = x[i:i + m]
    k = b.shape[0]
    if k < m:
      # Fixed GEMM shapes: BLAS kernels differ by ~1 ulp across matrix sizes, and padding makes
      # every image's result independent of N (a max_examples prefix is bitwise identical).
      b = np.concatenate([b, np.zeros((m - k, h, w, c), np.float32)], axis=0)
    # Two plain 2-D GEMMs (one per axis) on transposed copies: much faster than batched einsum.
    y = np.ascontiguousarray(b.transpose(0, 2, 3, 1)).reshape(-1, h) @ mh.T   # [m*w*c, size]
    y = np.ascontiguousarray(y.reshape(m, w, c, size).transpose(0, 3, 2, 1))  # [m, size, c, w]
    y = y.reshape(-1, w) @ mw.T                                               # [m*size*c, size]
    out[i:i + k] = y.reshape(m, size, c, size).transpose(0, 1, 3, 2)[:k]
  if method not in ('linear', 'triangle', 'nearest'):
    np.clip(out, -1.0, 1.0, out=out)
  return out
