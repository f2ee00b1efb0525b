"""Pixel-level localisation: paste foreign patches into ID images and ask a map to find them.

``paste_patches(images, donors, seed)`` pastes a random square crop of a donor image (e.g. an
OOD image: an MNIST digit into Fashion-MNIST) at a random place of each image and returns the
pasted-pixel masks; ``pixel_auroc(maps, masks)`` is the AUROC of telling pasted pixels from the
rest by the map's value, pooled over all pixels of all images (`ddm_ood.metrics.auroc`, pasted
pixels positive, ties counted 1/2); ``localisation_auroc`` does it for each map that
`ddm_ood.pixel_maps.make_anomaly_map_fn` returns (the SSIM-weighted 'map' and the 'baseline' without
SSIM). numpy, on the host; deterministic.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ddm_ood import metrics

_RNG_TAG = 0x10CA1   # keeps these streams apart from other numpy streams of the same seed


def paste_patches(images, donors, seed: int, frac: tuple[float, float] = (0.3, 0.5)
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Pastes a random square crop of a donor image at a random place of each image.

  Image ``i`` gets a crop of ``donors[i % M]``; the side is ``round(u * H)`` for ``u`` uniform in
  ``frac`` (at least 1 pixel, at most min(H, W)), the crop's source and destination corners are
  uniform over the valid positions. Image i's randomness is ``default_rng([seed, TAG, i])``, so
  it does not depend on N or on the other images.

  Args:
    images: [N, H, W, C] float in [-1, 1] (ID images).
    donors: [M, H, W, C] float in [-1, 1] (the images patches come from; same H, W, C).
    seed: integer seed.
    frac: (low, high) range of the patch side as a fraction of H, 0 < low <= high <= 1.

  Returns:
    (pasted [N, H, W, C] float32, masks [N, H, W] bool: True on the pasted pixels).

  Raises:
    ValueError: bad shapes, mismatched image sizes, no donors or a bad ``frac``.
  """
  x = np.asarray(images, np.float32)
  d = np.asarray(donors, np.float32)
  if x.ndim != 4 or d.ndim != 4:
    raise ValueError(f'images and donors must have shape [N, H, W, C], got {x.shape} and '
                     f'{d.shape}.')
  if x.shape[1:] != d.shape[1:]:
    raise ValueError(f'donors must have the images\' [H, W, C] = {x.shape[1:]}, got '
                     f'{d.shape[1:]}; resize / convert the donors first (gray -> RGB: '
                     'np.repeat(d, 3, axis=-1)).')
  if len(d) == 0:
    raise ValueError('donors is empty; pass at least one donor image.')
  lo, hi = float(frac[0]), float(frac[1])
  if not 0 < lo <= hi <= 1:
    raise ValueError(f'frac must satisfy 0 < low <= high <= 1, got {frac}.')
  n, h, w = x.shape[:3]
  out = x.copy()
  masks = np.zeros((n, h, w), bool)
  for i in range(n):
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _RNG_TAG, i])
    side = int(np.clip(round(rng.uniform(lo, hi) * h), 1, min(h, w)))
    sy, sx = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    dy, dx = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out[i, dy:dy + side, dx:dx + side] = d[i % len(d), sy:sy + side, sx:sx + side]
    masks[i, dy:dy + side, dx:dx + side] = True
  return out, masks


def pixel_auroc(maps, masks) -> float:
  """AUROC of the map's value separating masked (positive) from other pixels, pooled.

  Args:
    maps: [N, H, W] anomaly maps (higher = more anomalous).
    masks: [N, H, W] bool, True where the image was altered.

  Returns:
    AUROC in [0, 1]: 1 when every altered pixel scores above every other pixel, 0.5 for a
    constant map.

  Raises:
    ValueError: shapes differ, or the masks have no positive or no negative pixel.
  """
  m = np.asarray(maps)
  y = np.asarray(masks, bool)
  if m.shape != y.shape or m.ndim != 3:
    raise ValueError(f'maps and masks must both have shape [N, H, W], got {m.shape} and '
                     f'{y.shape}.')
  if y.all() or not y.any():
    raise ValueError(f'masks must mark some but not all pixels, got {int(y.sum())} of {y.size}.')
  return metrics.auroc(m[~y], m[y])


def localisation_auroc(map_fn_outputs: Mapping[str, np.ndarray], masks) -> dict:
  """Pixel AUROC of each map of `make_anomaly_map_fn`'s output.

  Args:
    map_fn_outputs: {'map': [N, H, W], 'baseline': [N, H, W]} (numpy or jax arrays; other
      [N, H, W] entries are scored too).
    masks: [N, H, W] bool from `paste_patches`.

  Returns:
    {name: pixel AUROC} with at least 'map' and 'baseline'.
  """
  missing = {'map', 'baseline'} - set(map_fn_outputs)
  if missing:
    raise ValueError(f'map_fn_outputs lacks {sorted(missing)}; pass the dict that '
                     'pixel_maps.make_anomaly_map_fn returns.')
  return {name: pixel_auroc(np.asarray(v), masks) for name, v in map_fn_outputs.items()}


__all__ = ['paste_patches', 'pixel_auroc', 'localisation_auroc']
