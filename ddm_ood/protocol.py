"""Which detectors the suite fits, per ID set, and how their settings are chosen.

Methods (rows of the results; ``config.eval.feature_kinds`` says which kinds exist):

=========================  ====================================================================
method                     detector
=========================  ====================================================================
'zero_shot'                THE default: the ID-only protocol's pick among every selected kind
                           of ``config.eval.feature_kinds`` (forward / DDIM path, SSIM weight on
                           or off, fused kinds), each at its own selected setting: the kind
                           whose setting reached the best criterion on held-out ID-train images
                           vs their synthetic anomalies. No OOD image, no override.
'<kind>' (selected kinds)  the kind at its zero-shot setting: `selection.select_zero_shot` over
                           ``config.select`` (window x aggregation, then the complexity
                           statistics on or off; the R draws averaged)
'stein_ssim@published'     the paper as published: R = 1 (the first draw), whole grid, plain sum
'stein_ssim@oracle'        ``config.select.oracle``: chosen on OOD *train* splits (R x window,
                           plain sum), the OOD-exposed ablation; with its leave-one-out check
'diffpath_6d' / '_1d'      the DiffPath baselines as their authors compute them
=========================  ====================================================================

Everything a zero-shot method uses comes from the ID set's train split: the first
``eval.num_fit`` images fit the detectors, the next ``select.num_val`` are the held-out images
of the selection (and the source of its synthetic anomalies).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from absl import logging
import numpy as np

from ddm_ood import detector
from ddm_ood import kinds as kinds_lib
from ddm_ood import metrics
from ddm_ood import scorer
from ddm_ood import selection

SEED_KIND = kinds_lib.SEED
BASELINE_KINDS = kinds_lib.BASELINES
ZERO_SHOT = kinds_lib.DEFAULT_METHOD
PUBLISHED = '@published'
ORACLE = '@oracle'
VARIANT_NAMES = {ZERO_SHOT: 'zero-shot default', SEED_KIND + PUBLISHED: 'as published',
                 SEED_KIND + ORACLE: 'oracle (OOD-train)'}


def base_kind(method: str) -> str:
  """'stein_ssim@oracle' -> 'stein_ssim'; 'zero_shot' stays (its kind is chosen per ID set:
  `Fitted.setting['kind']`)."""
  return method.split('@')[0]


def role(method: str) -> str:
  """'method' (the default and the seed method's variants), 'ablation' or 'baseline'."""
  if method == ZERO_SHOT:
    return 'method'
  return kinds_lib.get(base_kind(method)).role


def selected_kinds(kinds) -> list[str]:
  """The kinds whose settings the zero-shot protocol chooses: the default's candidates."""
  return [k for k in kinds if kinds_lib.get(k).selected]


def methods(config) -> list[str]:
  """The result rows' methods, in report order."""
  kinds = list(config.eval.feature_kinds)
  out = [ZERO_SHOT] if selected_kinds(kinds) else []
  for kind in kinds:
    out.append(kind)
    if kind == SEED_KIND:
      out.append(kind + PUBLISHED)
      if config.select.oracle:
        out.append(kind + ORACLE)
  return out


@dataclasses.dataclass
class Fitted:
  """One method's detector on one ID set and how it was chosen."""
  detector: detector.FittedDetector
  setting: dict | None          # selection.Setting.describe(); None for the baselines
  selection: list | None = None  # the selection table (zero-shot)


def needs_selection(kinds) -> bool:
  """Whether any kind picks its setting by the zero-shot selection (the baselines do not)."""
  return bool(selected_kinds(kinds))


def t_mins(config) -> list[int]:
  """Candidate window starts: ``config.select.t_min_fractions`` of T, as timesteps."""
  t = int(config.diffusion.num_timesteps)
  return [int(round(f * t)) for f in config.select.t_min_fractions]


def grid_of(config, kind: str) -> np.ndarray:
  return scorer.kind_timesteps(config.diffusion.num_timesteps, config.scorer, kind)


def _select_kind(config, kind, fit, val, syn) -> tuple[selection.Setting,
                                                        detector.FittedDetector, list[dict]]:
  """A selected kind's zero-shot setting: the best window x aggregation, then the complexity
  statistics added where ``config.select.complexity`` allows it and they raise the criterion."""
  sel = config.select
  grid = grid_of(config, kind)
  corruptions, quantile = tuple(sel.corruptions), float(sel.criterion_quantile)
  complexity = tuple(dict.fromkeys(bool(c) for c in sel.complexity))
  cands = selection.candidates([kind], len(grid), grid, t_mins(config), sel.aggregations,
                               complexity=complexity[:1])
  best, det, table = selection.select_zero_shot(
      cands, fit, val, syn, syn['corruption'], corruptions, len(grid), config.detector,
      config.seed, quantile)
  crit = max(r['criterion'] for r in table)
  for c in complexity[1:]:
    other = dataclasses.replace(best, complexity=c)
    det_other = selection.fit(other, fit, len(grid), config.detector, config.seed)
    table.append(selection.judge(det_other, other, val, syn, syn['corruption'], corruptions,
                                 quantile))
    if table[-1]['criterion'] > crit:
      best, det, crit = other, det_other, table[-1]['criterion']
  return best, det, table


def fit_id_set(config, kinds, fit, val, syn) -> dict[str, Fitted]:
  """Every non-oracle method's detector for one ID set.

  Args:
    config: the run's config.
    kinds: ``config.eval.feature_kinds``.
    fit, val, syn: flat statistics dicts of the fit images, the held-out images and their
      synthetic anomalies (``syn['corruption']`` the corruption index of each); ``val`` and
      ``syn`` are unused (may be empty / None) when `needs_selection` is False.

  Returns:
    {method: Fitted}; ZERO_SHOT's ``selection`` lists each candidate kind's best row, its
    ``setting`` names the kind it picked.
  """
  out, winners = {}, []
  for kind in kinds:
    if not kinds_lib.get(kind).selected:
      det = detector.fit_detector(fit[f'features/{kind}'], config.detector, seed=config.seed)
      out[kind] = Fitted(det, None)
      continue
    grid = grid_of(config, kind)
    best, det, table = _select_kind(config, kind, fit, val, syn)
    row = max(table, key=lambda r: r['criterion'])
    out[kind] = Fitted(det, best.describe(grid, config.scorer.num_draws), table)
    winners.append((row['criterion'], kind, row))
    logging.info('zero-shot selection [%s]: %s (criterion %.4f, mean AUROC %.4f)', kind, best,
                 row['criterion'], row['mean_auroc'])
    if kind == SEED_KIND:
      pub = selection.Setting(kind, 'first', 0, 'sum')
      out[kind + PUBLISHED] = Fitted(selection.fit(pub, fit, len(grid), config.detector,
                                                   config.seed), pub.describe(grid, 1))
  if winners:
    # Earliest kind of config.eval.feature_kinds wins ties.
    crit, kind, _ = max(winners, key=lambda w: w[0])
    out[ZERO_SHOT] = Fitted(out[kind].detector, out[kind].setting, [w[2] for w in winners])
    logging.info('zero-shot default: %s (criterion %.4f)', kind, crit)
  return out


def method_scores(fitted: Fitted, method: str, feats: Mapping[str, np.ndarray]) -> np.ndarray:
  """Anomaly scores [N] of a set under one method's detector."""
  if fitted.setting is None:
    return np.asarray(fitted.detector.score(feats[f'features/{base_kind(method)}']))
  setting = selection.Setting.from_description(fitted.setting)
  return selection.score(fitted.detector, setting, feats)


def oracle(config, id_names, fits: Mapping[str, Mapping], vals: Mapping[str, Mapping],
           ood_train: Mapping[str, Mapping], ood_test: Callable[[str], Mapping],
           id_tests: Mapping[str, Mapping], also=()) -> tuple[dict, dict]:
  """The OOD-train selection for the seed kind, and its leave-one-OOD-set-out check.

  Args:
    also: further ID sets (e.g. the near-OOD pairs' ID sets, in ``fits``) that get the setting
      chosen on ``id_names`` x ``ood_train`` without taking part in the choice.

  Returns:
    ({id_name: Fitted} of the globally chosen setting, loo) where ``loo[ood_name]`` holds the
    setting chosen without that OOD set and its test AUROC per ID set, next to the AUROC of the
    setting chosen with it.
  """
  grid = grid_of(config, SEED_KIND)
  cands = selection.candidates([SEED_KIND], len(grid), grid, t_mins(config), ('sum',),
                               draws=('first', 'all'))
  cache = {}

  def fitted(id_name, s):
    if (id_name, s) not in cache:
      cache[(id_name, s)] = selection.fit(s, fits[id_name], len(grid), config.detector,
                                          config.seed)
    return cache[(id_name, s)]

  best, table = selection.select_oracle(cands, id_names, fitted, vals, ood_train)
  chosen = {i: Fitted(fitted(i, best), best.describe(grid, config.scorer.num_draws), table)
            for i in [*id_names, *also]}

  def test_auroc(s, id_name, ood_name):
    det = fitted(id_name, s)
    return float(metrics.auroc(selection.score(det, s, id_tests[id_name]),
                               selection.score(det, s, ood_test(ood_name))))

  loo = {}
  for ood_name in ood_train:
    best_wo, _ = selection.select_oracle(cands, id_names, fitted, vals, ood_train,
                                         exclude=[ood_name])
    loo[ood_name] = dict(
        setting_without=best_wo.describe(grid, config.scorer.num_draws),
        setting_with=best.describe(grid, config.scorer.num_draws),
        auroc_without={i: test_auroc(best_wo, i, ood_name) for i in id_names if i != ood_name},
        auroc_with={i: test_auroc(best, i, ood_name) for i in id_names if i != ood_name})
  return chosen, loo


__all__ = ['SEED_KIND', 'BASELINE_KINDS', 'ZERO_SHOT', 'PUBLISHED', 'ORACLE', 'VARIANT_NAMES',
           'base_kind', 'role', 'selected_kinds', 'methods', 'Fitted', 'fit_id_set',
           'method_scores', 'oracle']
