"""From per-timestep power sums to the detector's feature vector (docs/method.md, "Aggregation").

The scorer returns, per image and kind, the power sums ``<v_k>_p`` (p = 1, 2, 3) at every grid
timestep k and ``<D v_k>_p`` of the finite differences. Flattened, that is one statistics vector
``s`` of length ``P = 3K + 3(K - 1)`` (`flatten_stats`). Every aggregation is an affine map of it,
``f = (s - mean) @ weight``, fitted from ID-train statistics only (`fit_reducer`):

==============  ===============================================================  ====
aggregation     f                                                                D
==============  ===============================================================  ====
'sum'           the paper's plain sum over the window: ``sum_k <v_k>_p``, ...     6
'zsum'          ``sum_k (<v_k>_p - mu_kp) / sd_kp`` (mu, sd over ID-train images)   6
'concat'        every ``(<v_k>_p - mu_kp) / sd_kp`` of the window, side by side    6W-3
==============  ===============================================================  ====

W is the number of grid timesteps ``t_k >= t_min`` (the window). 'zsum' gives every timestep the
same ID-train spread, so the small-t terms, whose size is set by image texture rather than by
being out of distribution, cannot bury the others; 'concat' hands the timesteps to the density
model. A `Reducer` is a pytree of plain arrays: ``reduce`` is pure and jittable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ('sum', 'zsum', 'concat')
_MIN_STD = 1e-12


class Reducer(NamedTuple):
  """An affine map from flattened statistics [P] to features [D]: ``(s - mean) @ weight``.

  Attributes:
    mean: [P] float32.
    weight: [P, D] float32.
  """
  mean: jnp.ndarray
  weight: jnp.ndarray


def num_stats(num_steps: int) -> int:
  """P = 3K + 3(K - 1), the length of a flattened statistics vector for K grid timesteps."""
  return 6 * num_steps - 3


def flatten_stats(per_t, per_d):
  """[..., K, 3] power sums and [..., K-1, 3] derivative power sums -> [..., 6K - 3].

  Layout: the K x 3 per-timestep sums (k-major), then the (K - 1) x 3 derivative sums.
  Works on numpy and jax arrays.
  """
  xp = jnp if isinstance(per_t, jnp.ndarray) and not isinstance(per_t, np.ndarray) else np
  lead = per_t.shape[:-2]
  return xp.concatenate([per_t.reshape(lead + (-1,)), per_d.reshape(lead + (-1,))], axis=-1)


DRAWS = ('all', 'first')


def draw_stats(per_draw, per_draw_deriv, draws: str = 'all'):
  """Flattened statistics [..., 6K - 3] of per-draw power sums, the R draws reduced.

  Args:
    per_draw: [..., R, K, 3] power sums of each draw (the scorer's 'per_draw').
    per_draw_deriv: [..., R, K - 1, 3] (the scorer's 'per_draw_deriv').
    draws: 'all' (averaged over the R draws) or 'first' (draw 0 only: the paper's R = 1).
  """
  if draws not in DRAWS:
    raise ValueError(f'draws={draws!r} is not one of {DRAWS}.')
  if draws == 'first':
    return flatten_stats(per_draw[..., 0, :, :], per_draw_deriv[..., 0, :, :])
  return flatten_stats(per_draw.mean(-3), per_draw_deriv.mean(-3))


def window_columns(num_steps: int, k0: int) -> tuple[np.ndarray, np.ndarray]:
  """Column indices of the window k >= k0: (value columns [W, 3], derivative columns [W-1, 3])."""
  if not 0 <= k0 < num_steps:
    raise ValueError(f'window start {k0} must be in [0, {num_steps}) (the grid has {num_steps} '
                     'timesteps).')
  k = np.arange(k0, num_steps)
  val = 3 * k[:, None] + np.arange(3)
  der = 3 * num_steps + 3 * k[:-1, None] + np.arange(3)
  return val, der


def fit_reducer(stats: np.ndarray, num_steps: int, k0: int = 0,
                aggregation: str = 'zsum') -> Reducer:
  """Fits the aggregation on ID-train statistics.

  Args:
    stats: flattened statistics of ID-train images [N, 6K - 3] (`flatten_stats`).
    num_steps: K, the grid size.
    k0: first grid index of the window (timesteps ``t_k`` with ``k >= k0``).
    aggregation: one of `AGGREGATIONS`.

  Returns:
    A `Reducer` with D = 6 ('sum', 'zsum') or 6W - 3 ('concat').

  Raises:
    ValueError: unknown aggregation, bad window, wrong shape or non-finite statistics.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f'Unknown aggregation {aggregation!r}; choose from {AGGREGATIONS}.')
  s = np.asarray(stats, np.float64)
  p = num_stats(num_steps)
  if s.ndim != 2 or s.shape[1] != p:
    raise ValueError(f'stats must have shape [N, {p}] for a grid of {num_steps} timesteps, got '
                     f'{s.shape}.')
  if not np.isfinite(s).all():
    raise ValueError('stats contain NaN or inf; check the scorer input images.')
  val, der = window_columns(num_steps, k0)
  mean = np.zeros(p)
  scale = np.ones(p)
  if aggregation != 'sum':
    if len(s) < 2:
      raise ValueError(f"aggregation={aggregation!r} needs at least 2 ID-train images to "
                       f'estimate the spread, got {len(s)}.')
    mean = s.mean(0)
    scale = 1.0 / np.maximum(s.std(0), _MIN_STD)
  if aggregation == 'concat':
    cols = np.concatenate([val.ravel(), der.ravel()])
    weight = np.zeros((p, cols.size))
    weight[cols, np.arange(cols.size)] = scale[cols]
  else:
    weight = np.zeros((p, 6))
    for j in range(3):
      weight[val[:, j], j] = scale[val[:, j]]
      weight[der[:, j], 3 + j] = scale[der[:, j]]
  return Reducer(mean=np.asarray(mean, np.float32), weight=np.asarray(weight, np.float32))


def reduce(reducer: Reducer, stats):
  """Features [..., D] from flattened statistics [..., P]; pure and jittable."""
  return (jnp.asarray(stats, jnp.float32) - reducer.mean) @ reducer.weight


def timestep_weights(reducer: Reducer, num_steps: int) -> np.ndarray:
  """Per-timestep weight [K] of the p = 2 power sum in the features (0 outside the window).

  For 'sum' it is 1 on the window, for 'zsum' / 'concat' 1 / sd_k2: the weights under which an
  anomaly map's pixel sum is the feature's p = 2 statistic (`pixel_maps.make_anomaly_map_fn`).
  """
  w = np.asarray(reducer.weight)
  return np.abs(w[3 * np.arange(num_steps) + 1]).sum(axis=1).astype(np.float32)


__all__ = ['DRAWS', 'draw_stats', 'AGGREGATIONS', 'Reducer', 'num_stats', 'flatten_stats',
           'window_columns', 'fit_reducer', 'reduce', 'timestep_weights']
