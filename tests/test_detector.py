"""Tests for ddm_ood.detector: sklearn fit, pure-JAX scoring, persistence.

Precision: equality with sklearn is checked in float64 (``jax.enable_x64(True)`` context) to
atol 1e-5 (it is ~1e-10 in practice); the default float32 path is checked to rtol 1e-5 relative
to the log-density's magnitude (atol = 1e-5 * max |log p|).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity
from sklearn.preprocessing import StandardScaler

from configs import default
from ddm_ood import detector
from ddm_ood import workdir
from ddm_ood import metrics


def _cfg(**overrides):
  cfg = default.get_config().detector
  cfg.n_components = (2, 4)
  cfg.covariance_types = ('full', 'diag')
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _data(n=600, d=6, shift=0.0, seed=0):
  a = np.random.default_rng(123).normal(size=(d, d)) / np.sqrt(d)   # same law for every seed
  rng = np.random.default_rng(seed)
  # Two ID clusters along (1, ..., 1); `shift` moves along (1, -1, 1, ...), orthogonal to it.
  x = rng.normal(size=(n, d)) @ a + shift * (-1.0) ** np.arange(d)
  x[: n // 2] += 3.0
  # Features on very different scales (exercises the scaler and its Jacobian).
  return x * np.logspace(0, 3, d)


def _sklearn_log_density(x_fit, x_test, k, cov, cfg, seed=0):
  scaler = StandardScaler().fit(x_fit)
  gmm = GaussianMixture(k, covariance_type=cov, reg_covar=cfg.reg_covar, max_iter=cfg.max_iter,
                        random_state=seed).fit(scaler.transform(x_fit))
  return gmm.score_samples(scaler.transform(x_test)) - np.log(scaler.scale_).sum()


def test_shifted_data_scores_higher():
  cfg = _cfg()
  fitted = detector.fit_detector(_data(), cfg)
  assert fitted.info['kind'] == 'gmm'
  id_scores = np.asarray(detector.anomaly_score(fitted.params, _data(seed=1)))
  ood_scores = np.asarray(fitted.score(_data(seed=2, shift=1.0)))
  assert ood_scores.mean() > id_scores.mean()
  assert metrics.auroc(id_scores, ood_scores) > 0.9


@pytest.mark.parametrize('cov', detector.COVARIANCE_TYPES)
def test_log_density_matches_sklearn(cov):
  cfg = _cfg(n_components=(3,), covariance_types=(cov,))
  x, x_test = _data(), _data(n=200, seed=3, shift=0.3)
  fitted = detector.fit_detector(x, cfg, seed=0)
  assert fitted.info['covariance_type'] == cov and fitted.info['n_components'] == 3
  expected = _sklearn_log_density(x, x_test, 3, cov, cfg)
  with jax.enable_x64(True):
    got = np.asarray(detector.log_density(fitted.params, x_test))
    assert got.dtype == np.float64
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  # Default float32 path (jitted), relative to the magnitude of the log density.
  got32 = np.asarray(jax.jit(detector.log_density)(fitted.params, x_test.astype(np.float32)))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
  # Sign convention; eager vs jit float32 differ by rounding only.
  np.testing.assert_allclose(np.asarray(detector.anomaly_score(fitted.params, x_test)), -got32,
                             rtol=0, atol=1e-5 * np.abs(expected).max())


def test_jit_and_pytree():
  cfg = _cfg(n_components=(2,))
  fitted = detector.fit_detector(_data(n=200), cfg)
  assert len(jax.tree_util.tree_leaves(fitted.params)) == 5
  f = jax.jit(detector.anomaly_score)
  x = jnp.asarray(_data(n=50, seed=4), jnp.float32)
  out = f(fitted.params, x)
  # The jitted score is -log p of the GMM sklearn fits with the chosen covariance type.
  want = -_sklearn_log_density(_data(n=200), np.asarray(x, np.float64), 2,
                               fitted.info['covariance_type'], cfg)
  assert out.shape == (50,)
  np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5 * np.abs(want).max())
  # vmap-free batching consistency: scoring in two chunks equals scoring at once.
  np.testing.assert_allclose(np.r_[f(fitted.params, x[:20]), f(fitted.params, x[20:])],
                             np.asarray(out), rtol=1e-6)
  with pytest.raises(ValueError, match='shape'):
    detector.log_density(fitted.params, x[:, :3])


@pytest.mark.parametrize('standardize', [False, True])
def test_kde_matches_sklearn(standardize):
  rng = np.random.default_rng(0)
  x = rng.normal(40.0, 12.0, size=(300, 1))
  x_test = rng.normal(45.0, 20.0, size=(100, 1))
  cfg = _cfg(kde_bandwidth=5.0)
  cfg.kde_standardize = standardize
  bw = 0.3 if standardize else 5.0
  if standardize:
    cfg.kde_bandwidth = bw
  fitted = detector.fit_detector(x, cfg)
  assert fitted.info['kind'] == 'kde' and fitted.info['standardized'] == standardize
  if standardize:
    scaler = StandardScaler().fit(x)
    expected = (KernelDensity(bandwidth=bw).fit(scaler.transform(x))
                .score_samples(scaler.transform(x_test)) - np.log(scaler.scale_).sum())
  else:
    expected = KernelDensity(bandwidth=bw).fit(x).score_samples(x_test)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(detector.log_density)(fitted.params, x_test))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  got32 = np.asarray(detector.log_density(fitted.params, x_test))
  np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_small_data_grid_clamped(caplog):
  x = _data(n=12)
  cfg = _cfg(n_components=(50, 100), covariance_types=('diag', 'spherical'))
  with caplog.at_level(logging.WARNING):
    fitted = detector.fit_detector(x, cfg)   # 3 folds -> training folds of 8
  assert fitted.info['n_components'] == 8
  assert any('clamped' in r.getMessage() for r in caplog.records)
  # The clamped GMM is sklearn's with 8 components, refitted on all 12 points.
  want = -_sklearn_log_density(x, x, 8, fitted.info['covariance_type'], cfg)
  np.testing.assert_allclose(np.asarray(fitted.score(x)), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  # Partly feasible grid: infeasible values are skipped, not clamped.
  fitted = detector.fit_detector(x, _cfg(n_components=(1, 2, 50), covariance_types=('diag',)))
  assert {c['n_components'] for c in fitted.info['cv_scores']} == {1, 2}
  with pytest.raises(ValueError, match='at least'):
    detector.fit_detector(x[:5], cfg)


def test_nan_features_raise():
  x = _data(n=100)
  x[[3, 17], 2] = np.nan
  with pytest.raises(ValueError, match=r'2 of 100 .*\[3, 17\].*scorer inputs'):
    detector.fit_detector(x, _cfg())
  with pytest.raises(ValueError, match='2-D'):
    detector.fit_detector(x[:, 0], _cfg())


def test_save_load_round_trip(tmp_path):
  fitted = detector.fit_detector(_data(n=200), _cfg())
  path = tmp_path / 'sub' / 'det.npz'
  workdir.save_detector(fitted, str(path))
  assert sorted(p.name for p in path.parent.iterdir()) == ['det.npz']   # no temp file left
  loaded = workdir.load_detector(str(path))
  assert loaded.info == fitted.info
  for a, b in zip(loaded.params, fitted.params):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = _data(n=50, seed=5)
  np.testing.assert_array_equal(np.asarray(loaded.score(x)), np.asarray(fitted.score(x)))
  # KDE round trip, path without .npz suffix kept as given.
  kde = detector.fit_detector(_data(n=40)[:, :1], _cfg())
  workdir.save_detector(kde, str(tmp_path / 'kde'))
  assert workdir.load_detector(str(tmp_path / 'kde')).info['kind'] == 'kde'


def test_deterministic():
  x = _data(n=300)
  cfg = _cfg()
  a = detector.fit_detector(x, cfg, seed=7)
  b = detector.fit_detector(x, cfg, seed=7)
  assert a.info == b.info
  for u, v in zip(a.params, b.params):
    np.testing.assert_array_equal(u, v)
