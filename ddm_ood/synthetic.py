"""Synthetic anomalies made from in-distribution images, for choosing settings without OOD data.

``make_anomalies(images, seed)`` corrupts each ID image by one of `CORRUPTIONS` (image ``i``
gets ``corruptions[i % len(corruptions)]``; its randomness comes from ``(seed, i)`` only), so a
zero-shot selection protocol can compare held-out ID images with anomalies of the same images
(`ddm_ood.selection`). Everything here sees ID images only. numpy, on the host; deterministic.

| corruption      | what changes                                                         |
|-----------------|----------------------------------------------------------------------|
| 'patch_shuffle' | the image's 4 x 4 grid of patches permuted: local texture kept, layout broken |
| 'cutpaste'      | a rectangle (30-60% of the side) of another ID image pasted at a random place |
| 'blend'         | the mean of the image and another ID image                            |
| 'blur'          | Gaussian blur, sigma 1.5 pixels (fine structure removed)              |
| 'noise'         | additive Gaussian noise, std 0.2 (in [-1, 1] units), clipped          |
| 'invert'        | -x (contrast polarity flipped)                                        |
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CORRUPTIONS = ('patch_shuffle', 'cutpaste', 'blend', 'blur', 'noise', 'invert')
GRID = 4                 # patch_shuffle: GRID x GRID patches
BLUR_SIGMA = 1.5
NOISE_STD = 0.2
_RNG_TAG = 0x5EED       # keeps these streams apart from other numpy streams of the same seed


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of one image [H, W, C] with reflect padding."""
  r = max(1, int(round(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode='reflect')
  rows = sum(k[j] * pad[j:j + x.shape[0]] for j in range(2 * r + 1))
  return sum(k[j] * rows[:, j:j + x.shape[1]] for j in range(2 * r + 1))


def _patch_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = x.shape[:2]
  ph, pw = h // GRID, w // GRID
  out = x.copy()
  patches = [x[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] for i in range(GRID) for j in range(GRID)]
  perm = rng.permutation(len(patches))
  if np.all(perm == np.arange(len(perm))):
    perm = np.roll(perm, 1)
  for n, p in enumerate(perm):
    i, j = divmod(n, GRID)
    out[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = patches[p]
  return out


def _cutpaste(x: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = x.shape[:2]
  ph = int(rng.integers(max(1, int(0.3 * h)), max(2, int(0.6 * h)) + 1))
  pw = int(rng.integers(max(1, int(0.3 * w)), max(2, int(0.6 * w)) + 1))
  sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
  dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
  out = x.copy()
  out[dy:dy + ph, dx:dx + pw] = donor[sy:sy + ph, sx:sx + pw]
  return out


def corrupt(x: np.ndarray, donor: np.ndarray, corruption: str,
            rng: np.random.Generator) -> np.ndarray:
  """One corrupted image [H, W, C] (float32 in [-1, 1]) from ``x`` and a donor ID image."""
  if corruption == 'patch_shuffle':
    y = _patch_shuffle(x, rng)
  elif corruption == 'cutpaste':
    y = _cutpaste(x, donor, rng)
  elif corruption == 'blend':
    y = 0.5 * (x + donor)
  elif corruption == 'blur':
    y = _gaussian_blur(x, BLUR_SIGMA)
  elif corruption == 'noise':
    y = x + NOISE_STD * rng.standard_normal(x.shape)
  elif corruption == 'invert':
    y = -x
  else:
    raise ValueError(f'Unknown corruption {corruption!r}; choose from {CORRUPTIONS}.')
  return np.clip(y, -1.0, 1.0).astype(np.float32)


def make_anomalies(images: np.ndarray, seed: int,
                   corruptions: Sequence[str] = CORRUPTIONS) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic anomalies of ID images, one per image.

  Args:
    images: ID images [N, H, W, C] float in [-1, 1], N >= 2 (the donor of image i is image
      ``(i + N // 2) % N``).
    seed: integer seed; image i's randomness is ``default_rng([seed, _RNG_TAG, i])``.
    corruptions: names from `CORRUPTIONS`; image i gets ``corruptions[i % len(corruptions)]``.

  Returns:
    (anomalies [N, H, W, C] float32, corruption index [N] int32 into ``corruptions``).

  Raises:
    ValueError: an unknown corruption, an empty list, fewer than 2 images, or a bad shape.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f'images must have shape [N, H, W, C], got {x.shape}.')
  if len(x) < 2:
    raise ValueError(f'make_anomalies needs at least 2 ID images (donors), got {len(x)}.')
  corruptions = tuple(corruptions)
  if not corruptions:
    raise ValueError(f'corruptions is empty; choose from {CORRUPTIONS}.')
  for c in corruptions:
    if c not in CORRUPTIONS:
      raise ValueError(f'Unknown corruption {c!r}; choose from {CORRUPTIONS}.')
  n = len(x)
  out = np.empty_like(x)
  which = np.arange(n, dtype=np.int32) % len(corruptions)
  for i in range(n):
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _RNG_TAG, i])
    out[i] = corrupt(x[i], x[(i + n // 2) % n], corruptions[which[i]], rng)
  return out, which


__all__ = ['CORRUPTIONS', 'corrupt', 'make_anomalies']
