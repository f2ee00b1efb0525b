"""OOD detection metrics (numpy, float64).

Conventions: scores are anomaly scores, HIGHER = MORE anomalous (``detector.anomaly_score``).
OOD is the positive class for AUROC, AUPR-Out and the ROC curve; AUPR-In uses ID as positive with
the negated score. FPR95 follows the OOD literature (ID positive, see :func:`fpr_at_tpr`).

Tie handling matches sklearn exactly: AUROC is the trapezoidal ROC area = Mann-Whitney U with
1/2 per tied (ID, OOD) pair; average precision uses sklearn's step definition
``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (tied samples enter together).
"""

from __future__ import annotations

import numpy as np


def _check(name: str, scores) -> np.ndarray:
  x = np.asarray(scores)
  if x.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {x.shape}.')
  if x.size == 0:
    raise ValueError(f'{name} is empty.')
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ValueError(f'{name} must be numeric, got dtype {x.dtype}.')
  x = x.astype(np.float64)
  bad = ~np.isfinite(x)
  if bad.any():
    raise ValueError(f'{name} has {int(bad.sum())} non-finite values of {x.size} '
                     f'({int(np.isnan(x).sum())} NaN).')
  return x


def _check_pair(id_scores, ood_scores):
  return _check('id_scores', id_scores), _check('ood_scores', ood_scores)


def _binary_clf_curve(y_true: np.ndarray, y_score: np.ndarray):
  """sklearn's _binary_clf_curve: (fps, tps, thresholds) at distinct thresholds, descending."""
  order = np.argsort(y_score, kind='mergesort')[::-1]
  y_score = y_score[order]
  y_true = y_true[order]
  distinct = np.flatnonzero(np.diff(y_score))
  idx = np.r_[distinct, y_true.size - 1]
  tps = np.cumsum(y_true, dtype=np.float64)[idx]
  fps = 1.0 + idx - tps
  return fps, tps, y_score[idx]


def _average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
  fps, tps, _ = _binary_clf_curve(y_true, y_score)
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  recall_prev = np.r_[0.0, recall[:-1]]
  return float(np.sum((recall - recall_prev) * precision))


def _labels_and_scores(id_scores, ood_scores):
  s = np.concatenate([id_scores, ood_scores])
  y = np.concatenate([np.zeros(id_scores.size), np.ones(ood_scores.size)])
  return y, s


def auroc(id_scores, ood_scores) -> float:
  """Area under the ROC curve with OOD as the positive class.

  Equals ``sklearn.metrics.roc_auc_score(y, s)`` with y = 1 for OOD: the probability that a random
  OOD sample scores higher than a random ID sample, ties counted 1/2.

  Args:
    id_scores: [N_id] anomaly scores of ID samples.
    ood_scores: [N_ood] anomaly scores of OOD samples.

  Returns:
    AUROC in [0, 1].
  """
  a, b = _check_pair(id_scores, ood_scores)
  s = np.concatenate([a, b])
  # Average ranks (1-based) with ties sharing the mean rank.
  _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts, dtype=np.float64)                 # last rank of each tie group
  avg_rank = upper - (counts - 1) / 2.0
  ranks = avg_rank[inv.reshape(-1)]
  n_id, n_ood = a.size, b.size
  u = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2.0
  return float(u / (n_id * n_ood))


def aupr_out(id_scores, ood_scores) -> float:
  """Average precision with OOD positive and the anomaly score: AUPR-Out in [0, 1].

  Equals ``sklearn.metrics.average_precision_score(y, s)`` with y = 1 for OOD; arguments as
  `auroc`.
  """
  y, s = _labels_and_scores(*_check_pair(id_scores, ood_scores))
  return _average_precision(y, s)


def aupr_in(id_scores, ood_scores) -> float:
  """As `aupr_out` with ID positive and the negated anomaly score: AUPR-In in [0, 1].

  Equals ``sklearn.metrics.average_precision_score(1 - y, -s)`` with y = 1 for OOD.
  """
  y, s = _labels_and_scores(*_check_pair(id_scores, ood_scores))
  return _average_precision(1.0 - y, -s)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
  """FPR at ``tpr`` TPR of ID ('FPR95'): fraction of OOD samples accepted as ID.

  For THIS metric ID is the positive class (OOD literature convention). A sample is accepted as
  ID when its anomaly score is <= t, where t is the SMALLEST score for which at least a fraction
  ``tpr`` of ID samples are accepted (t is the ceil(tpr * N_id)-th smallest ID score). Samples
  tied with t are accepted (ID and OOD alike). The result is ``mean(ood_scores <= t)``, identical
  to ``fpr[searchsorted(tpr_curve, tpr)]`` on ``sklearn.metrics.roc_curve(y_id, -s,
  drop_intermediate=False)``. Lower is better; separable data gives 0, identical
  distributions about ``tpr``.

  Args:
    id_scores: [N_id] anomaly scores of ID samples.
    ood_scores: [N_ood] anomaly scores of OOD samples.
    tpr: target fraction of ID samples kept, in (0, 1].

  Returns:
    FPR in [0, 1].
  """
  _, b = _check_pair(id_scores, ood_scores)
  return float(np.mean(b <= id_threshold(id_scores, tpr)))


def id_threshold(id_scores, tpr: float = 0.95) -> float:
  """The score threshold at which `fpr_at_tpr` is measured: a sample is ID iff score <= it.

  The ``ceil(tpr * N_id)``-th smallest ID score: the smallest score that accepts at least a
  fraction ``tpr`` of the ID samples (ties with it accepted).

  Args:
    id_scores: [N_id] anomaly scores of ID samples.
    tpr: target fraction of ID samples kept, in (0, 1].

  Returns:
    The threshold (one of ``id_scores``).
  """
  a = _check('id_scores', id_scores)
  if not 0.0 < tpr <= 1.0:
    raise ValueError(f'tpr must be in (0, 1], got {tpr}.')
  a = np.sort(a)
  frac = np.arange(1, a.size + 1) / a.size   # ID fraction accepted at each sorted ID score
  k = int(np.searchsorted(frac, tpr, side='left'))
  return float(a[min(k, a.size - 1)])


def roc_curve_points(id_scores, ood_scores):
  """ROC curve (OOD positive), every distinct threshold, starting at (0, 0).

  Equals ``sklearn.metrics.roc_curve(y, s, drop_intermediate=False)[:2]`` with y = 1 for OOD;
  arguments as `auroc`. Returns (fpr [P], tpr [P]) float64 arrays, non-decreasing, from (0, 0)
  to (1, 1).
  """
  a, b = _check_pair(id_scores, ood_scores)
  y, s = _labels_and_scores(a, b)
  fps, tps, _ = _binary_clf_curve(y, s)
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return fpr, tpr


def ood_metrics(id_scores, ood_scores) -> dict:
  """All OOD metrics for one (ID test, OOD test) pair.

  Args:
    id_scores: [N_id] anomaly scores of ID samples (higher = more anomalous).
    ood_scores: [N_ood] anomaly scores of OOD samples.

  Returns:
    dict(auroc, fpr95, aupr_in, aupr_out) as Python floats, plus n_id and n_ood as ints.
  """
  a, b = _check_pair(id_scores, ood_scores)
  return dict(auroc=auroc(a, b), fpr95=fpr_at_tpr(a, b, 0.95), aupr_in=aupr_in(a, b),
              aupr_out=aupr_out(a, b), n_id=int(a.size), n_ood=int(b.size))
