"""Choosing a method's settings: from ID images only (zero-shot) or, as an oracle, from OOD-train.

A `Setting` is one way to turn the scorer's per-timestep statistics into a detector: which kind
(trajectory and map, or a fused kind's parts), which noise draws (all R averaged, or only the
first: R = 1), which window of the grid (``k0``: timesteps ``t_k``, ``k >= k0``), which
aggregation (`ddm_ood.features`) and whether the image's complexity statistics
(`ddm_ood.complexity`) join the feature vector.

* `select_zero_shot`: fits each candidate on ID-train images, then scores held-out ID-train images
  against synthetic anomalies made from those same images (`ddm_ood.synthetic`) and keeps the
  candidate with the best `criterion`: a low quantile of its per-corruption AUROCs, so that one
  easy corruption cannot carry the choice. No OOD image is involved.
* `select_oracle`: the same candidates judged on OOD *train* splits (ID held-out vs each OOD set),
  averaged over every (ID, OOD) pair; ``exclude`` leaves OOD sets out (the leave-one-out check).
  OOD exposure: an ablation that shows what tuning on the anomalies buys, never a default.

Statistics come as the flat dicts `evaluate.FeatureExtractor.features` returns
('per_draw/<kind>' [N, R, K, 3], 'per_draw_deriv/<kind>' [N, R, K-1, 3] per base kind,
'complexity/image' [N, 2]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ddm_ood import complexity as complexity_lib
from ddm_ood import detector
from ddm_ood import features as features_lib
from ddm_ood import kinds as kinds_lib
from ddm_ood import metrics

DRAWS = features_lib.DRAWS
COMPLEXITY_KEY = 'complexity/image'


@dataclasses.dataclass(frozen=True)
class Setting:
  """One candidate way from per-timestep statistics to a detector."""
  kind: str
  draws: str = 'all'          # 'all': the R draws averaged; 'first': draw 0 only (R = 1)
  k0: int = 0                 # first grid index of the window
  aggregation: str = 'zsum'   # one of features.AGGREGATIONS
  complexity: bool = False    # the image's complexity statistics join the features

  def describe(self, grid: Sequence[int], num_draws: int) -> dict:
    """JSON-ready description (with the window's timesteps and the effective R)."""
    return dict(kind=self.kind, draws=self.draws,
                num_draws=1 if self.draws == 'first' else int(num_draws),
                t_min=int(grid[self.k0]), k0=self.k0, aggregation=self.aggregation,
                complexity=self.complexity)

  @classmethod
  def from_description(cls, d: Mapping) -> 'Setting':
    return cls(d['kind'], d['draws'], int(d['k0']), d['aggregation'],
               bool(d.get('complexity', False)))


def stats_of(feats: Mapping[str, np.ndarray], kind: str, draws: str = 'all',
             complexity: bool = False) -> np.ndarray:
  """Statistics [N, parts * (6K - 3) (+ 2)] of ``kind`` with the draws averaged ('all') or draw
  0: each base kind's flattened power sums (a fused kind's parts side by side), then the image's
  complexity statistics when ``complexity``."""
  base = kinds_lib.get(kind).base_kinds
  return features_lib.kind_stats({b: feats[f'per_draw/{b}'] for b in base},
                                 {b: feats[f'per_draw_deriv/{b}'] for b in base}, base, draws,
                                 feats[COMPLEXITY_KEY] if complexity else None)


def reducer_shape(setting: Setting) -> dict:
  """``parts`` and ``extra`` of `features.fit_reducer` for a setting's statistics."""
  return dict(parts=len(kinds_lib.get(setting.kind).base_kinds),
              extra=complexity_lib.DIM if setting.complexity else 0)


def fit(setting: Setting, fit_feats: Mapping[str, np.ndarray], num_steps: int, det_cfg,
        seed: int) -> detector.FittedDetector:
  """Reducer + detector of ``setting`` fitted on ID-train statistics."""
  stats = stats_of(fit_feats, setting.kind, setting.draws, setting.complexity)
  reducer = features_lib.fit_reducer(stats, num_steps, setting.k0, setting.aggregation,
                                     **reducer_shape(setting))
  fitted = detector.fit_detector(np.asarray(features_lib.reduce(reducer, stats)), det_cfg,
                                 seed=seed)
  return dataclasses.replace(fitted, reducer=reducer)


def score(fitted: detector.FittedDetector, setting: Setting,
          feats: Mapping[str, np.ndarray]) -> np.ndarray:
  """Anomaly scores [N] of a set under a fitted setting."""
  return np.asarray(fitted.score_stats(stats_of(feats, setting.kind, setting.draws,
                                                setting.complexity)))


def candidates(kinds: Iterable[str], num_steps: int, grid: Sequence[int],
               t_mins: Iterable[int], aggregations: Iterable[str],
               draws: Iterable[str] = ('all',),
               complexity: Iterable[bool] = (False,)) -> list[Setting]:
  """Every combination, in a fixed order (ties go to the earliest); t_min snaps to the grid."""
  k0s = sorted({min(int(np.searchsorted(np.asarray(grid), t)), num_steps - 1) for t in t_mins})
  return [Setting(kind, d, k0, a, c) for kind in kinds for d in draws for k0 in k0s
          for a in aggregations for c in complexity]


def criterion(per_corruption: Mapping[str, float], quantile: float = 1.0) -> float:
  """The protocol's criterion: the mean of the lowest ``ceil(quantile * F)`` of F per-corruption
  AUROCs (1.0: the plain mean; -> 0: the worst one). A low quantile judges a candidate by the
  anomalies it misses, so one easy corruption cannot carry the choice."""
  if not 0 < quantile <= 1:
    raise ValueError(f'criterion quantile must be in (0, 1], got {quantile}.')
  a = np.sort(np.asarray(list(per_corruption.values()), np.float64))
  if not a.size:
    raise ValueError('No synthetic anomalies to judge the candidates on.')
  return float(a[:max(1, int(np.ceil(quantile * a.size - 1e-9)))].mean())


def _best(table: list[dict]) -> int:
  score_ = [row['criterion'] for row in table]
  return int(np.argmax(score_))   # first maximum: the earliest candidate wins ties


def judge(fitted: detector.FittedDetector, setting: Setting, val_feats, syn_feats,
          syn_which: np.ndarray, corruptions: Sequence[str], quantile: float = 1.0) -> dict:
  """One selection-table row: the per-corruption AUROC of held-out ID images vs their synthetic
  anomalies under a fitted setting, their mean and the `criterion`."""
  s_val, s_syn = score(fitted, setting, val_feats), score(fitted, setting, syn_feats)
  per = {c: float(metrics.auroc(s_val, s_syn[syn_which == j]))
         for j, c in enumerate(corruptions) if np.any(syn_which == j)}
  return dict(setting=dataclasses.asdict(setting), criterion=criterion(per, quantile),
              mean_auroc=float(np.mean(list(per.values()))), auroc=per)


def select_zero_shot(cands: Sequence[Setting], fit_feats, val_feats, syn_feats,
                     syn_which: np.ndarray, corruptions: Sequence[str], num_steps: int,
                     det_cfg, seed: int, quantile: float = 1.0
                     ) -> tuple[Setting, detector.FittedDetector, list[dict]]:
  """The candidate whose detector best separates held-out ID images from their corruptions.

  Args:
    cands: candidate settings.
    fit_feats: statistics of the ID-train images the detectors are fitted on.
    val_feats: statistics of held-out ID-train images [V].
    syn_feats: statistics of their synthetic anomalies [V'] (`synthetic.make_anomalies`).
    syn_which: corruption index [V'] of each anomaly.
    corruptions: names of the corruption indices.
    num_steps: K.
    det_cfg: ``config.detector``.
    seed: detector seed.
    quantile: of the `criterion` (``config.select.criterion_quantile``).

  Returns:
    (best setting, its detector fitted on ``fit_feats``, one row per candidate (`judge`):
    'criterion', 'mean_auroc' and 'auroc' per corruption).
  """
  table, fitted_all = [], []
  for s in cands:
    fitted = fit(s, fit_feats, num_steps, det_cfg, seed)
    table.append(judge(fitted, s, val_feats, syn_feats, syn_which, corruptions, quantile))
    fitted_all.append(fitted)
  i = _best(table)
  return cands[i], fitted_all[i], table


def select_oracle(cands: Sequence[Setting], id_names: Sequence[str],
                  fitted: Callable[[str, Setting], detector.FittedDetector],
                  val_feats: Mapping[str, Mapping], ood_train: Mapping[str, Mapping],
                  exclude: Iterable[str] = ()) -> tuple[Setting, list[dict]]:
  """The candidate with the best mean AUROC of ID held-out vs OOD-train over all pairs.

  Args:
    cands: candidate settings.
    id_names: the ID sets.
    fitted: ``fitted(id_name, setting)`` -> its detector (fitted on that ID set's train images).
    val_feats: {id_name: statistics of its held-out ID-train images}.
    ood_train: {ood_name: statistics of its train-split images}.
    exclude: OOD sets left out of the criterion (leave-one-out).

  Returns:
    (best setting, one row per candidate with 'criterion' and per-pair 'auroc').
  """
  exclude = set(exclude)
  table = []
  for s in cands:
    per = {}
    for id_name in id_names:
      det = fitted(id_name, s)
      s_val = score(det, s, val_feats[id_name])
      for ood_name, feats in ood_train.items():
        if ood_name == id_name or ood_name in exclude:
          continue
        per[f'{id_name} vs {ood_name}'] = float(metrics.auroc(s_val, score(det, s, feats)))
    table.append(dict(setting=dataclasses.asdict(s), criterion=float(np.mean(list(per.values()))),
                      auroc=per))
  return cands[_best(table)], table


__all__ = ['DRAWS', 'COMPLEXITY_KEY', 'Setting', 'stats_of', 'reducer_shape', 'fit', 'score',
           'candidates', 'criterion', 'judge', 'select_zero_shot', 'select_oracle']
