"""Tests for ddm_ood.metrics against sklearn.metrics (OOD = positive class)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from ddm_ood import metrics


def _sk(id_s, ood_s):
  y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
  s = np.r_[id_s, ood_s]
  return y, s


def _datasets():
  rng = np.random.default_rng(0)
  yield 'continuous', rng.normal(0, 1, 300), rng.normal(0.7, 1.2, 200)
  yield 'ties_0_3', rng.integers(0, 4, 257).astype(float), rng.integers(1, 4, 133).astype(float)
  yield 'all_equal', np.zeros(10), np.zeros(7)
  yield 'tiny', np.array([1.0]), np.array([1.0, 0.0])
  yield 'rounded', np.round(rng.normal(0, 1, 500), 1), np.round(rng.normal(0.3, 1, 400), 1)


@pytest.mark.parametrize('name,id_s,ood_s', list(_datasets()))
def test_matches_sklearn(name, id_s, ood_s):
  del name
  y, s = _sk(id_s, ood_s)
  np.testing.assert_allclose(metrics.auroc(id_s, ood_s), skm.roc_auc_score(y, s), atol=1e-12)
  np.testing.assert_allclose(metrics.aupr_out(id_s, ood_s),
                             skm.average_precision_score(y, s), atol=1e-12)
  np.testing.assert_allclose(metrics.aupr_in(id_s, ood_s),
                             skm.average_precision_score(1 - y, -s), atol=1e-12)
  fpr, tpr = metrics.roc_curve_points(id_s, ood_s)
  sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  # FPR95 equals the common roc_curve recipe with ID positive on -score.
  f_id, t_id, _ = skm.roc_curve(1 - y, -s, drop_intermediate=False)
  expected = f_id[np.searchsorted(t_id, 0.95, side='left')]
  np.testing.assert_allclose(metrics.fpr_at_tpr(id_s, ood_s), expected, atol=1e-12)


def test_fpr95_hand_computed():
  id_s = np.arange(1.0, 21.0)                   # 20 ID scores; 95% kept -> threshold 19
  ood_s = np.array([18.5, 19.0, 19.5, 21.0, 25.0])
  # Accepted as ID (score <= 19): 18.5 and the tie at 19 -> 2 / 5.
  assert metrics.fpr_at_tpr(id_s, ood_s) == pytest.approx(0.4)
  # 90%: threshold 18 -> none of the OOD accepted.
  assert metrics.fpr_at_tpr(id_s, ood_s, tpr=0.9) == 0.0
  assert metrics.fpr_at_tpr(id_s, ood_s, tpr=1.0) == pytest.approx(0.6)


def test_fpr95_separable_and_identical():
  rng = np.random.default_rng(1)
  id_s = rng.normal(0, 1, 2000)
  assert metrics.fpr_at_tpr(id_s, id_s.max() + 1 + rng.random(500)) == 0.0
  fpr = metrics.fpr_at_tpr(id_s, rng.normal(0, 1, 20000))
  assert abs(fpr - 0.95) < 0.02


def test_ood_metrics_dict_and_direction():
  rng = np.random.default_rng(2)
  out = metrics.ood_metrics(rng.normal(0, 1, 100), rng.normal(3, 1, 50))
  assert set(out) == {'auroc', 'fpr95', 'aupr_in', 'aupr_out', 'n_id', 'n_ood'}
  assert out['n_id'] == 100 and out['n_ood'] == 50
  assert out['auroc'] > 0.95 and out['fpr95'] < 0.3
  assert all(isinstance(out[k], float) for k in ('auroc', 'fpr95', 'aupr_in', 'aupr_out'))


@pytest.mark.parametrize('fn', [metrics.auroc, metrics.aupr_in, metrics.aupr_out,
                                metrics.fpr_at_tpr, metrics.ood_metrics,
                                metrics.roc_curve_points])
def test_validation(fn):
  good = np.array([0.0, 1.0, 2.0])
  with pytest.raises(ValueError, match='2 non-finite'):
    fn(good, np.array([np.nan, 1.0, np.nan]))
  with pytest.raises(ValueError, match='empty'):
    fn(np.array([]), good)
  with pytest.raises(ValueError, match='1-D'):
    fn(good[:, None], good)
