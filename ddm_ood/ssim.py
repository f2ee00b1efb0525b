"""Same-size SSIM maps through dm-pix.

`dm_pix.ssim` filters with a *valid* convolution, so its map is smaller than the image
(H - filter_size + 1). The scorer needs a weight per pixel, so here dm-pix is given a
``filter_fn`` that pads symmetrically before a valid separable Gaussian filter. numpy's
``'symmetric'`` padding (edge sample repeated: ``d c b a | a b c d``) is what
``scipy.ndimage``/skimage call ``'reflect'``; the padding is folded into one banded [H, H] / [W, W]
matrix per axis (`reflect_filter_matrix`), so the map equals
``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=max_val, full=True, channel_axis=-1)[1]``
up to float32 rounding (and dm-pix's clipping of negative variances, which only matters
where a window is exactly constant). Note that skimage's scalar ``mssim`` averages only the
interior of that map (a border of ``filter_size // 2`` is cropped); `ssim_map(...).mean()`
averages everything.

Data range: the images of this project live in [-1, 1], so ``max_val = 2``
(``c1 = (k1 * 2)^2``, ``c2 = (k2 * 2)^2``). Noise maps need an explicit normalisation chosen by
the caller (the scorer clips them to [-4, 4] and uses ``max_val = 8``).
"""

from __future__ import annotations

from typing import Callable

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_MAX_VAL = 2.0  # data range of images in [-1, 1]


def gaussian_taps(filter_size: int, filter_sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian taps, identical to dm-pix's (and to scipy's for odd sizes).

  Returns:
    float64 [filter_size].
  """
  hw = filter_size // 2
  shift = (2 * hw - filter_size + 1) / 2
  f = np.exp(-0.5 * ((np.arange(filter_size) - hw + shift) / filter_sigma) ** 2)
  return f / f.sum()


def reflect_filter_matrix(n: int, filter_size: int = 11, filter_sigma: float = 1.5) -> np.ndarray:
  """The same-size 1-D Gaussian filter with symmetric padding as a matrix.

  ``(M @ z)[i] = sum_j taps[j] * zpad[i + j]`` where ``zpad`` is ``z`` padded with numpy
  ``'symmetric'`` mode (``d c b a | a b c d | d c b a``) by ``(filter_size - 1) // 2`` on the left
  and the rest on the right. Folding the padding into the matrix makes the filter one small matmul
  per axis.

  Args:
    n: signal length (>= the padding on each side).
    filter_size: number of taps.
    filter_sigma: Gaussian standard deviation.

  Returns:
    float64 [n, n].
  """
  taps = gaussian_taps(filter_size, filter_sigma)
  left = (filter_size - 1) // 2
  m = np.zeros((n, n))
  for i in range(n):
    for j, w in enumerate(taps):
      src = i + j - left
      while not 0 <= src < n:   # symmetric reflection (repeated for very short signals)
        src = -src - 1 if src < 0 else 2 * n - src - 1
      m[i, src] += w
  return m


def same_size_gaussian_filter(filter_size: int = 11,
                              filter_sigma: float = 1.5) -> Callable[[jax.Array], jax.Array]:
  """A separable Gaussian blur over axes (-3, -2) that keeps the spatial size.

  Equivalent to padding with numpy ``'symmetric'`` mode (= scipy.ndimage ``'reflect'``) and a
  valid convolution with the taps of `gaussian_taps`; implemented as one [H, H] and one [W, W]
  matmul (`reflect_filter_matrix`) at HIGHEST precision (no bf16 passes on TPU/GPU). This compiles
  to two dot ops instead of dozens of shifted slices.

  Args:
    filter_size: number of taps (>= 1).
    filter_sigma: Gaussian standard deviation in pixels (> 0).

  Returns:
    ``filter_fn(z [..., H, W, C]) -> [..., H, W, C]``.
  """
  hp = jax.lax.Precision.HIGHEST

  def filter_fn(z: jax.Array) -> jax.Array:
    mh = jnp.asarray(reflect_filter_matrix(z.shape[-3], filter_size, filter_sigma), z.dtype)
    mw = jnp.asarray(reflect_filter_matrix(z.shape[-2], filter_size, filter_sigma), z.dtype)
    z = jnp.einsum('ij,...jwc->...iwc', mh, z, precision=hp)
    return jnp.einsum('ij,...hjc->...hic', mw, z, precision=hp)

  return filter_fn


def ssim_map(a: jax.Array, b: jax.Array, *, max_val: float, filter_size: int = 11,
             filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-pixel SSIM map at image resolution, computed with `dm_pix.ssim`.

  Per channel (no colour transform), Gaussian window ``filter_size`` / ``filter_sigma``, population
  (co)variances, symmetric padding at the border. Jittable and vmappable.

  Args:
    a: images [..., H, W, C], float (any number of leading axes, including none).
    b: images of the same shape as ``a``.
    max_val: data range of the inputs (2.0 for images in [-1, 1]).
    filter_size: Gaussian window size; H and W must be >= filter_size.
    filter_sigma: Gaussian standard deviation.
    k1: SSIM stabiliser, c1 = (k1 * max_val)^2.
    k2: SSIM stabiliser, c2 = (k2 * max_val)^2.

  Returns:
    SSIM map [..., H, W, C] in [-1, 1] (float32 for float32 inputs); 1 where a == b.

  Raises:
    ValueError: mismatched shapes, rank < 3, non-float input or images smaller than the window.
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f'ssim_map needs equal shapes, got {a.shape} and {b.shape}.')
  if a.ndim < 3:
    raise ValueError(f'ssim_map expects images [..., H, W, C], got shape {a.shape}.')
  if not (jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
    raise ValueError(f'ssim_map expects float images, got {a.dtype} and {b.dtype}.')
  h, w = a.shape[-3], a.shape[-2]
  if filter_size < 1 or filter_sigma <= 0:
    raise ValueError(f'Invalid SSIM filter: size {filter_size}, sigma {filter_sigma}.')
  if h < filter_size or w < filter_size:
    raise ValueError(f'Images of {h}x{w} pixels are smaller than the SSIM window '
                     f'({filter_size}x{filter_size}); use larger images or a smaller '
                     'config.scorer.ssim_filter_size.')
  lead = a.shape[:-3]
  flat = (-1,) + a.shape[-3:] if len(lead) != 1 else a.shape
  out = dm_pix.ssim(a.reshape(flat), b.reshape(flat), max_val=max_val, filter_size=filter_size,
                    filter_sigma=filter_sigma, k1=k1, k2=k2, return_map=True,
                    filter_fn=same_size_gaussian_filter(filter_size, filter_sigma))
  return out.reshape(a.shape)


__all__ = ['IMAGE_MAX_VAL', 'gaussian_taps', 'reflect_filter_matrix', 'same_size_gaussian_filter', 'ssim_map']
