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


def kind_stats(per_draw, per_draw_deriv, base_kinds, draws: str = 'all', extra=None):
  """The statistics a setting's reducer reads: [..., parts * (6K - 3) (+ E)].

  Args:
    per_draw: {base kind: [..., R, K, 3]} per-draw power sums (the scorer's 'per_draw').
    per_draw_deriv: {base kind: [..., R, K - 1, 3]}.
    base_kinds: the kind's base kinds (`kinds.Kind.base_kinds`; a fused kind's parts), in order.
    draws: 'all' or 'first' (`draw_stats`).
    extra: None or per-image statistics [..., E] appended last (`ddm_ood.complexity`).

  Works on numpy and jax arrays (jittable).
  """
  blocks = [draw_stats(per_draw[b], per_draw_deriv[b], draws) for b in base_kinds]
  if extra is not None:
    blocks.append(extra)
  if len(blocks) == 1:
    return blocks[0]
  xp = jnp if any(isinstance(b, jnp.ndarray) and not isinstance(b, np.ndarray)
                  for b in blocks) else np
  return xp.concatenate([xp.asarray(b, blocks[0].dtype) for b in blocks], axis=-1)


def window_columns(num_steps: int, k0: int) -> tuple[np.ndarray, np.ndarray]:
  """Column indices of the window k >= k0: (value columns [W, 3], derivative columns [W-1, 3])."""
  if not 0 <= k0 < num_steps:
    raise ValueError(f'window start {k0} must be in [0, {num_steps}) (the grid has {num_steps} '
                     'timesteps).')
  k = np.arange(k0, num_steps)
  val = 3 * k[:, None] + np.arange(3)
  der = 3 * num_steps + 3 * k[:-1, None] + np.arange(3)
  return val, der


def fit_reducer(stats: np.ndarray, num_steps: int, k0: int = 0, aggregation: str = 'zsum',
                parts: int = 1, extra: int = 0) -> Reducer:
  """Fits the aggregation on ID-train statistics.

  Args:
    stats: statistics of ID-train images [N, parts * (6K - 3) + extra]: ``parts`` blocks of
      flattened power sums (`flatten_stats`; one per part of a fused kind), then ``extra``
      per-image statistics (e.g. `ddm_ood.complexity`).
    num_steps: K, the grid size.
    k0: first grid index of the window (timesteps ``t_k`` with ``k >= k0``), in every block.
    aggregation: one of `AGGREGATIONS`, applied to each block on its own.
    parts: number of power-sum blocks.
    extra: number of trailing per-image statistics, standardised on the ID-train images and
      passed through as features.

  Returns:
    A `Reducer` with D = parts * 6 ('sum', 'zsum') or parts * (6W - 3) ('concat'), plus
    ``extra``.

  Raises:
    ValueError: unknown aggregation, bad window, wrong shape or non-finite statistics.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f'Unknown aggregation {aggregation!r}; choose from {AGGREGATIONS}.')
  s = np.asarray(stats, np.float64)
  block = num_stats(num_steps)
  p = parts * block + extra
  if s.ndim != 2 or s.shape[1] != p:
    what = f'{parts} x {block} + {extra}' if parts > 1 or extra else f'{p}'
    raise ValueError(f'stats must have shape [N, {p}] ({what}) for a grid of {num_steps} '
                     f'timesteps, got {s.shape}.')
  if not np.isfinite(s).all():
    raise ValueError('stats contain NaN or inf; check the scorer input images.')
  val, der = window_columns(num_steps, k0)
  standardise = aggregation != 'sum' or extra
  if standardise and len(s) < 2:
    raise ValueError(f'aggregation={aggregation!r} with {extra} extra statistics needs at least '
                     f'2 ID-train images to estimate the spread, got {len(s)}.')
  spread = 1.0 / np.maximum(s.std(0), _MIN_STD) if standardise else np.ones(p)
  mean = s.mean(0) if standardise else np.zeros(p)
  scale = spread if aggregation != 'sum' else np.ones(p)
  if aggregation == 'sum':
    mean[:parts * block] = 0.0
  columns = []   # per output feature: the input columns it sums
  for b in range(parts):
    off = b * block
    if aggregation == 'concat':
      columns += [[off + c] for c in np.concatenate([val.ravel(), der.ravel()])]
    else:
      columns += [list(off + val[:, j]) for j in range(3)]
      columns += [list(off + der[:, j]) for j in range(3)]
  weight = np.zeros((p, len(columns) + extra))
  for j, cols in enumerate(columns):
    weight[cols, j] = scale[cols]
  for e in range(extra):
    c = parts * block + e
    weight[c, len(columns) + e] = spread[c]
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


__all__ = ['DRAWS', 'draw_stats', 'kind_stats', 'AGGREGATIONS', 'Reducer', 'num_stats', 'flatten_stats',
           'window_columns', 'fit_reducer', 'reduce', 'timestep_weights']
