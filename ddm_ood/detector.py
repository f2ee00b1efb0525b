"""Density detector on trajectory features: fit with sklearn, score with pure JAX.

A fitted detector is a `DetectorParams` pytree of plain arrays, ONE representation for every
model fitted here: a Gaussian mixture over standardised features ``z = (x - mean) / scale`` (a
sklearn ``GaussianMixture`` of any covariance type, expanded to full precision Cholesky factors;
or a Gaussian KDE, one equal-weight component per training point). `log_density` is the density
of the ORIGINAL features (the ``-sum(log scale)`` Jacobian term included), and
`anomaly_score` ``= -log_density``: HIGHER = MORE out-of-distribution. The model selection, the
KDE's space and the ``config.detector`` fields are described in docs/method.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import settings

COVARIANCE_TYPES = settings.COVARIANCE_TYPES


class DetectorParams(NamedTuple):
  """A fitted density as plain arrays (a JAX pytree; pass it straight into ``jax.jit``).

  The density is a Gaussian mixture over the standardised features ``z = (x - mean) / scale``.

  Attributes:
    mean: [D] scaler mean.
    scale: [D] scaler standard deviation (positive).
    log_weights: [M] log mixture weights (logsumexp = 0).
    means: [M, D] component means in the standardised space.
    prec_chol: [M, D, D] precision Cholesky factors, sklearn convention: the precision is
      ``prec_chol[m] @ prec_chol[m].T`` and each factor is triangular with a positive diagonal
      (so its log-determinant is the sum of the log-diagonal).
  """
  mean: Any
  scale: Any
  log_weights: Any
  means: Any
  prec_chol: Any

  @property
  def dim(self) -> int:
    return int(self.means.shape[-1])

  @property
  def n_components(self) -> int:
    return int(self.means.shape[0])


@dataclasses.dataclass(frozen=True)
class FittedDetector:
  """A fitted detector: the jittable ``params`` plus JSON-serialisable metadata ``info``.

  ``info`` is deliberately NOT part of the pytree; jit ``log_density(fitted.params, x)``.
  Keys: 'kind' ('gmm' | 'kde'), 'dim', 'n_fit', 'seed', and for 'gmm': 'n_components',
  'covariance_type', 'cv_scores' (list of {n_components, covariance_type, mean_loglik,
  fold_logliks, error}), 'converged', 'n_iter', 'warnings'; for 'kde': 'bandwidth',
  'standardized'.
  """
  params: DetectorParams
  info: dict
  # Set when the detector was fitted on aggregated per-timestep statistics: ``features =
  # features.reduce(reducer, stats)`` (a pytree of plain arrays, see `ddm_ood.features`).
  reducer: Any = None

  def score(self, features) -> jax.Array:
    """Anomaly scores [M] (higher = more OOD) of features [M, D]."""
    return anomaly_score(self.params, features)

  def score_stats(self, stats) -> jax.Array:
    """Anomaly scores [M] of flattened per-timestep statistics [M, P] (needs ``reducer``)."""
    if self.reducer is None:
      raise ValueError('This detector was fitted on features, not on per-timestep statistics; '
                       'call score(features).')
    from ddm_ood import features as features_lib  # pylint: disable=g-import-not-at-top
    return anomaly_score(self.params, features_lib.reduce(self.reducer, stats))


# --------------------------------------------------------------------------------------------
# Conversion from sklearn objects
# --------------------------------------------------------------------------------------------


def _full_prec_chol(prec_chol: np.ndarray, covariance_type: str, n_components: int,
                    dim: int) -> np.ndarray:
  """Expands sklearn ``precisions_cholesky_`` of any covariance type to [M, D, D]."""
  p = np.asarray(prec_chol, dtype=np.float64)
  if covariance_type == 'full':
    out = p
  elif covariance_type == 'tied':
    out = np.broadcast_to(p, (n_components, dim, dim))
  elif covariance_type == 'diag':
    out = p[:, :, None] * np.eye(dim)[None]
  elif covariance_type == 'spherical':
    out = p[:, None, None] * np.eye(dim)[None]
  else:
    raise ValueError(f'Unknown covariance_type {covariance_type!r}; expected one of '
                     f'{COVARIANCE_TYPES}.')
  return np.ascontiguousarray(out.reshape(n_components, dim, dim))


def params_from_sklearn(scaler, gmm) -> DetectorParams:
  """Converts a fitted ``StandardScaler`` (or None = identity) and ``GaussianMixture``.

  Args:
    scaler: fitted ``sklearn.preprocessing.StandardScaler`` with ``mean_``/``scale_`` of shape
      [D], or None for no scaling.
    gmm: fitted ``sklearn.mixture.GaussianMixture`` on the scaled features.

  Returns:
    DetectorParams (float64 numpy arrays) whose :func:`log_density` equals
    ``gmm.score_samples(scaler.transform(x)) - log(scaler.scale_).sum()``.
  """
  means = np.asarray(gmm.means_, dtype=np.float64)
  m, d = means.shape
  if scaler is None:
    mean, scale = np.zeros(d), np.ones(d)
  else:
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
  return DetectorParams(
      mean=mean, scale=scale,
      log_weights=np.log(np.asarray(gmm.weights_, dtype=np.float64)),
      means=means,
      prec_chol=_full_prec_chol(gmm.precisions_cholesky_, gmm.covariance_type, m, d))


def kde_params(train: np.ndarray, bandwidth: float, mean=None, scale=None) -> DetectorParams:
  """Gaussian KDE as a mixture: one equal-weight component per training point.

  Args:
    train: [N, D] training points in the space the KDE lives in (already standardised if
      ``mean``/``scale`` are given).
    bandwidth: kernel standard deviation in that space.
    mean: [D] scaler mean (default 0).
    scale: [D] scaler scale (default 1).

  Returns:
    DetectorParams equal to ``KernelDensity(bandwidth=bandwidth).fit(train)`` on the scaled space.
  """
  train = np.asarray(train, dtype=np.float64)
  n, d = train.shape
  bandwidth = float(bandwidth)
  if not (bandwidth > 0 and math.isfinite(bandwidth)):
    raise ValueError(f'KDE bandwidth must be positive and finite, got {bandwidth}.')
  return DetectorParams(
      mean=np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64),
      scale=np.ones(d) if scale is None else np.asarray(scale, dtype=np.float64),
      log_weights=np.full((n,), -math.log(n)),
      means=train.copy(),
      prec_chol=np.broadcast_to(np.eye(d) / bandwidth, (n, d, d)).copy())


# --------------------------------------------------------------------------------------------
# Pure-JAX scoring
# --------------------------------------------------------------------------------------------


@jax.jit
def log_density(params: DetectorParams, features) -> jax.Array:
  """Log density of the ORIGINAL features under the fitted mixture (pure JAX, jittable).

  ``log p(x) = logsumexp_m [log w_m + log N(z; mu_m, P_m^-1)] - sum(log scale)`` with
  ``z = (x - mean) / scale``. Computation dtype is that of ``params.means`` after JAX's dtype
  canonicalisation (float32 unless x64 is enabled). Already wrapped in ``jax.jit`` (eager
  op-by-op dispatch cost seconds of compiles); nesting it in another jit/vmap is fine. Memory is O(M * n_components * D); chunk
  very large inputs (a KDE has one component per training point). NaN inputs give NaN rows.

  Args:
    params: DetectorParams.
    features: [M, D] features.

  Returns:
    [M] log densities.
  """
  means = jnp.asarray(params.means)
  dtype = means.dtype
  x = jnp.asarray(features).astype(dtype)
  if x.ndim != 2 or x.shape[1] != means.shape[1]:
    raise ValueError(f'features must have shape [M, {means.shape[1]}], got {x.shape}.')
  mean = jnp.asarray(params.mean, dtype)
  scale = jnp.asarray(params.scale, dtype)
  prec_chol = jnp.asarray(params.prec_chol, dtype)
  log_weights = jnp.asarray(params.log_weights, dtype)
  d = means.shape[1]

  z = (x - mean) / scale                                        # [M, D]
  diff = z[:, None, :] - means[None, :, :]                      # [M, K, D]
  y = jnp.einsum('mkd,kde->mke', diff, prec_chol)               # [M, K, D]
  maha = jnp.sum(jnp.square(y), axis=-1)                        # [M, K]
  log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), axis=-1)  # [K]
  log_comp = -0.5 * (d * math.log(2 * math.pi) + maha) + log_det + log_weights
  return jax.nn.logsumexp(log_comp, axis=-1) - jnp.sum(jnp.log(scale))


@jax.jit
def anomaly_score(params: DetectorParams, features) -> jax.Array:
  """THE anomaly score [M] of features [M, D]: ``-log_density``; higher = more OOD."""
  return -log_density(params, features)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _validate_features(features) -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f'features must be a 2-D array [N, D], got shape {x.shape}.')
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f'features must be non-empty, got shape {x.shape}.')
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f'features must be numeric, got dtype {x.dtype}.')
  x = x.astype(np.float64)
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    n_nan = int(np.isnan(x).any(axis=1).sum())
    raise ValueError(
        f'{rows.size} of {x.shape[0]} feature rows are not finite ({n_nan} with NaN, '
        f'{rows.size - n_nan} with only inf); first rows: {rows[:10].tolist()}. '
        'Check the scorer inputs (finite images in [-1, 1]) and the scorer config.')
  return x


def _resolve_bandwidth(bw, n: int, d: int) -> float:
  if bw == 'scott':
    return n ** (-1.0 / (d + 4))
  if bw == 'silverman':
    return (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
  return float(bw)


def _fit_kde(x: np.ndarray, det: settings.DetectorSettings, seed: int) -> FittedDetector:
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  standardize = det.kde_standardize
  n, d = x.shape
  bandwidth = _resolve_bandwidth(det.kde_bandwidth, n, d)
  if standardize:
    scaler = StandardScaler().fit(x)
    params = kde_params(scaler.transform(x), bandwidth, scaler.mean_, scaler.scale_)
  else:
    params = kde_params(x, bandwidth)
  info = dict(kind='kde', dim=d, n_fit=n, seed=int(seed), bandwidth=bandwidth,
              standardized=standardize, n_components=n)
  return FittedDetector(params, info)


def _make_gmm(n_components, covariance_type, det: settings.DetectorSettings, seed):
  from sklearn.mixture import GaussianMixture  # pylint: disable=g-import-not-at-top
  return GaussianMixture(
      n_components=int(n_components), covariance_type=covariance_type,
      reg_covar=det.reg_covar, max_iter=det.max_iter, random_state=int(seed))


def _fit_gmm(x: np.ndarray, det: settings.DetectorSettings, seed: int) -> FittedDetector:
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import KFold  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  n, d = x.shape
  folds = det.cv_folds
  if n < 2 * folds:
    raise ValueError(f'Need at least 2 * cv_folds = {2 * folds} samples to fit the detector, '
                     f'got {n}.')
  grid_n = sorted({int(k) for k in det.n_components})
  cov_types = det.covariance_types

  splits = list(KFold(n_splits=folds, shuffle=True, random_state=int(seed)).split(x))
  max_feasible = min(len(tr) for tr, _ in splits)
  feasible = [k for k in grid_n if k <= max_feasible]
  fit_warnings = []
  if len(feasible) < len(grid_n):
    skipped = [k for k in grid_n if k > max_feasible]
    if feasible:
      msg = (f'detector: n_components {skipped} exceed the CV training-fold size '
             f'{max_feasible} (N={n}); skipped.')
    else:
      feasible = [max_feasible]
      msg = (f'detector: every n_components in {grid_n} exceeds the CV training-fold size '
             f'{max_feasible} (N={n}); clamped to n_components={max_feasible}.')
    logging.warning(msg)
    fit_warnings.append(msg)

  candidates = [(k, c) for k in feasible for c in cov_types]
  cv_scores = []
  for k, c in candidates:
    fold_ll, error = [], None
    for tr, va in splits:
      scaler = StandardScaler().fit(x[tr])
      try:
        with warnings.catch_warnings():
          warnings.simplefilter('ignore', ConvergenceWarning)
          gmm = _make_gmm(k, c, det, seed).fit(scaler.transform(x[tr]))
      except (ValueError, np.linalg.LinAlgError) as e:  # ill-defined covariance etc.
        error = f'{type(e).__name__}: {e}'
        break
      ll = gmm.score_samples(scaler.transform(x[va])) - np.log(scaler.scale_).sum()
      fold_ll.append(float(np.mean(ll)))
    ok = error is None and all(math.isfinite(v) for v in fold_ll)
    cv_scores.append(dict(n_components=k, covariance_type=c,
                          mean_loglik=float(np.mean(fold_ll)) if ok else None,
                          fold_logliks=fold_ll, error=error))

  # Best first; ties keep grid order (stable sort) -> deterministic.
  order = sorted(range(len(candidates)),
                 key=lambda i: -(cv_scores[i]['mean_loglik']
                                 if cv_scores[i]['mean_loglik'] is not None else -math.inf))
  order = [i for i in order if cv_scores[i]['mean_loglik'] is not None] or list(range(
      len(candidates)))
  scaler = StandardScaler().fit(x)
  z = scaler.transform(x)
  gmm, last_error = None, None
  for i in order:
    k, c = candidates[i]
    try:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ConvergenceWarning)
        gmm = _make_gmm(k, c, det, seed).fit(z)
      for w in caught:
        if issubclass(w.category, ConvergenceWarning):
          fit_warnings.append(f'refit (k={k}, {c}): {w.message}')
      break
    except (ValueError, np.linalg.LinAlgError) as e:
      last_error = e
      fit_warnings.append(f'refit (k={k}, {c}) failed: {e}')
      gmm = None
  if gmm is None:
    raise ValueError(f'Every GaussianMixture candidate failed to fit; last error: {last_error}')
  for msg in fit_warnings:
    if msg.startswith('refit'):
      logging.warning('detector: %s', msg)

  params = params_from_sklearn(scaler, gmm)
  info = dict(kind='gmm', dim=d, n_fit=n, seed=int(seed), n_components=int(gmm.n_components),
              covariance_type=gmm.covariance_type, cv_folds=folds, cv_scores=cv_scores,
              converged=bool(gmm.converged_), n_iter=int(gmm.n_iter_), warnings=fit_warnings)
  return FittedDetector(params, info)


def fit_detector(features: np.ndarray, det_cfg, seed: int = 0) -> FittedDetector:
  """Fits the ID density on features of ID training images (numpy / sklearn, not jittable).

  D > 1: ``StandardScaler`` + ``GaussianMixture``; (n_components, covariance_type) is chosen by
  the mean held-out log-likelihood of ``KFold(cv_folds, shuffle=True, random_state=seed)`` (the
  scaler is refitted inside each fold) over ``det_cfg.n_components x det_cfg.covariance_types``.
  Grid values larger than the smallest CV training fold are skipped (if none remain, the grid is
  clamped to that size, with a logged warning). The best is refitted on all data with
  ``random_state=seed``. D == 1: Gaussian KDE with ``det_cfg.kde_bandwidth`` (on the raw or,
  with ``kde_standardize``, the standardised statistic; docs/method.md).

  Args:
    features: [N, D] finite features.
    det_cfg: ``config.detector`` or `settings.DetectorSettings` (n_components,
      covariance_types, cv_folds, kde_bandwidth, max_iter, reg_covar, kde_standardize,
      sklearn_threads; a missing field takes its `default_config` value).
    seed: seeds the CV split and the GMM initialisation.

  Returns:
    FittedDetector(params, info).

  Raises:
    ValueError: non 2-D / non-finite features (message lists the bad rows), too few samples
      (GMM needs N >= 2 * cv_folds), or a bad config value.
  """
  det = settings.detector(det_cfg)
  x = _validate_features(features)
  if x.shape[1] == 1:
    return _fit_kde(x, det, seed)
  threads = det.sklearn_threads
  if threads <= 0:
    return _fit_gmm(x, det, seed)
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  with threadpool_limits(limits=threads):
    return _fit_gmm(x, det, seed)
