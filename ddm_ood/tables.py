"""Markdown tables of a results dict (``workdir/eval/results.json``); pure formatting, no I/O."""

from __future__ import annotations

import numpy as np

from ddm_ood import protocol


def _f(x) -> str:
  return '' if x is None else f'{x:.4f}'


def _rows(results: dict, suite: str | None) -> list[dict]:
  return [r for r in results['rows'] if suite is None or r.get('suite', 'far') == suite]


def _averages(results: dict, suite: str) -> dict:
  return results.get('averages' if suite == 'far' else 'near_averages') or {}


def results_table(results: dict, suite: str | None = None) -> str:
  """One row per (ID, OOD) pair (of ``suite``: 'far', 'near' or None = all), AUROC / FPR95
  columns per method, and the far suite's average row (the near one's for suite='near')."""
  rows = _rows(results, suite)
  kinds = list(dict.fromkeys(r['kind'] for r in rows))
  pairs = list(dict.fromkeys((r['id'], r['ood']) for r in rows))
  by = {(r['id'], r['ood'], r['kind']): r for r in rows}
  head = '| ID | OOD | ' + ' | '.join(f'{k} AUROC | {k} FPR95' for k in kinds) + ' |'
  lines = [head, '|' + '---|' * (2 + 2 * len(kinds))]
  for id_name, ood_name in pairs:
    cells = []
    for k in kinds:
      r = by.get((id_name, ood_name, k))
      cells += [f"{r['auroc']:.4f}", f"{r['fpr95']:.4f}"] if r else ['', '']
    lines.append(f'| {id_name} | {ood_name} | ' + ' | '.join(cells) + ' |')
  avg = _averages(results, 'near' if suite == 'near' else 'far')
  cells = []
  for k in kinds:
    cells += [f"{avg[k]['auroc']:.4f}", f"{avg[k]['fpr95']:.4f}"] if k in avg else ['', '']
  lines.append('| **average** | | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def averages_table(results: dict, suite: str = 'far') -> str:
  """Suite averages per method with its role and the settings it ran with."""
  lines = ['| method | role | AUROC | FPR95 | AUPR-In | AUPR-Out | settings (per ID set) |',
           '|---|---|---|---|---|---|---|']
  ids = list(dict.fromkeys(r['id'] for r in _rows(results, suite)))
  for k, v in _averages(results, suite).items():
    lines.append(f'| {k} | {protocol.role(k)} | {v["auroc"]:.4f} | {v["fpr95"]:.4f} | '
                 f'{v["aupr_in"]:.4f} | {v["aupr_out"]:.4f} | {settings_text(results, k, ids)} |')
  return '\n'.join(lines)


def setting_text(s: dict, with_kind: bool = False) -> str:
  """'R=4 t>=100 zsum' (+ ' +complexity'; 'stein_ddim: ...' with the kind)."""
  text = f"R={s['num_draws']} t>={s['t_min']} {s['aggregation']}"
  text += ' +complexity' if s.get('complexity') else ''
  return f"{s['kind']}: {text}" if with_kind else text


def settings_text(results: dict, method: str, ids=None) -> str:
  """'fashion_mnist: R=4 t>=0 zsum; ...' (empty for the baselines); the default names the kind
  it picked per ID set."""
  parts = []
  for id_name, per in (results.get('settings') or {}).items():
    s = (per.get(method) or {}).get('setting')
    if s and (ids is None or id_name in ids):
      parts.append(f'{id_name}: {setting_text(s, method == protocol.ZERO_SHOT)}')
  return '; '.join(parts)


def variant_methods(results: dict, suite: str = 'far', every: bool = False) -> list[str]:
  """The columns of `variants_table`: the seed method as published, the zero-shot default, the
  oracle and the baselines; ``every``: all methods, the default first."""
  avg = _averages(results, suite)
  if every:
    first = [m for m in (protocol.ZERO_SHOT,) if m in avg]
    return first + [m for m in avg if m not in first]
  methods = [m for m in (protocol.SEED_KIND + protocol.PUBLISHED, protocol.ZERO_SHOT,
                         protocol.SEED_KIND + protocol.ORACLE) if m in avg]
  return methods + [m for m in avg if protocol.role(m) == 'baseline']


def variants_table(results: dict, suite: str = 'far', every: bool = False) -> str:
  """AUROC per pair of ``suite`` and on average: the default, the seed method's variants and the
  baselines (`variant_methods`), same checkpoint and images."""
  methods = variant_methods(results, suite, every)
  names = [protocol.VARIANT_NAMES.get(m, m) for m in methods]
  rows = _rows(results, suite)
  by = {(r['id'], r['ood'], r['kind']): r['auroc'] for r in rows}
  pairs = list(dict.fromkeys((r['id'], r['ood']) for r in rows))
  lines = ['| ID | OOD | ' + ' | '.join(names) + ' |', '|' + '---|' * (2 + len(methods))]
  for id_name, ood in pairs:
    lines.append(f'| {id_name} | {ood} | ' +
                 ' | '.join(_f(by.get((id_name, ood, m))) for m in methods) + ' |')
  avg = _averages(results, suite)
  lines.append('| **average AUROC** | | ' + ' | '.join(
      _f(avg[m]['auroc']) for m in methods) + ' |')
  return '\n'.join(lines)


def loo_table(results: dict, kind: str = protocol.SEED_KIND) -> str | None:
  """Leave-one-OOD-set-out: each OOD set's test AUROC (mean over ID sets) when the oracle
  selection saw it, when it did not, and under the zero-shot default (which sees no OOD set)."""
  loo = results.get('leave_one_out')
  if not loo:
    return None
  by = {(r['id'], r['ood'], r['kind']): r['auroc'] for r in results['rows']}
  default = protocol.ZERO_SHOT if protocol.ZERO_SHOT in results['averages'] else kind
  lines = ['| OOD set | oracle, set seen | oracle, set left out | setting chosen without it | '
           'zero-shot default |', '|---|---|---|---|---|']
  seen_all, wo_all, zs_all = [], [], []
  for ood, d in loo.items():
    ids = list(d['auroc_with'])
    if not ids:
      continue
    seen = float(np.mean([d['auroc_with'][i] for i in ids]))
    wo = float(np.mean([d['auroc_without'][i] for i in ids]))
    zs = [by[(i, ood, default)] for i in ids if (i, ood, default) in by]
    zs_mean = float(np.mean(zs)) if zs else None
    s = d['setting_without']
    seen_all.append(seen)
    wo_all.append(wo)
    if zs_mean is not None:
      zs_all.append(zs_mean)
    lines.append(f"| {ood} | {seen:.4f} | {wo:.4f} | R={s['num_draws']} t>={s['t_min']} | "
                 f'{_f(zs_mean)} |')
  lines.append(f'| **mean** | {np.mean(seen_all):.4f} | {np.mean(wo_all):.4f} | | '
               f'{_f(np.mean(zs_all) if zs_all else None)} |')
  return '\n'.join(lines)


def selection_table(results: dict, kinds=None) -> str:
  """The zero-shot protocol per ID set: each candidate kind's chosen setting with its criterion
  (the low quantile of its per-corruption AUROCs of held-out ID images vs their synthetic
  anomalies) and mean AUROC; the zero-shot default is the row marked **picked**."""
  lines = ['| ID | kind | chosen setting | criterion | mean AUROC | worst corruption |',
           '|---|---|---|---|---|---|']
  for id_name, per in (results.get('settings') or {}).items():
    picked = ((per.get(protocol.ZERO_SHOT) or {}).get('setting') or {}).get('kind')
    for method, d in per.items():
      if (not d.get('selection') or '@' in method or method == protocol.ZERO_SHOT
          or (kinds and method not in kinds)):
        continue
      best = max(d['selection'], key=lambda r: r['criterion'])
      worst = min(best['auroc'], key=best['auroc'].get)
      mark = ' **picked**' if method == picked else ''
      lines.append(f"| {id_name} | {method}{mark} | {setting_text(d['setting'])} | "
                   f"{best['criterion']:.4f} | {best.get('mean_auroc', best['criterion']):.4f} | "
                   f"{worst} {best['auroc'][worst]:.2f} |")
  return '\n'.join(lines)


def corruption_table(results: dict) -> str:
  """Per ID set, the per-corruption AUROC (held-out ID images vs their synthetic anomalies) of
  each candidate kind at its chosen setting: what each kind catches and misses."""
  out = []
  for id_name, per in (results.get('settings') or {}).items():
    zs = per.get(protocol.ZERO_SHOT) or {}
    cands = zs.get('selection') or []
    if not cands:
      continue
    corr = list(cands[0]['auroc'])
    lines = [f'**{id_name}** (picked: {zs["setting"]["kind"]})', '',
             '| kind | ' + ' | '.join(corr) + ' | criterion |', '|' + '---|' * (len(corr) + 2)]
    for row in cands:
      lines.append(f"| {row['setting']['kind']} | " + ' | '.join(
          f"{row['auroc'][c]:.2f}" for c in corr) + f" | {row['criterion']:.4f} |")
    out.append('\n'.join(lines))
  return '\n\n'.join(out)


def localisation_table(results: dict) -> str | None:
  """Pixel-level AUROC of locating pasted OOD patches, anomaly map vs the baseline map."""
  loc = results.get('localisation')
  if not loc:
    return None
  return '\n'.join([
      '| ID images | pasted from | images | anomaly map (SSIM-weighted) | baseline map '
      '(squared Stein error, no SSIM) |', '|---|---|---|---|---|',
      f"| {loc['id']} test | {loc['donor']} test | {loc['num_images']} | "
      f"{loc['auroc_map']:.4f} | {loc['auroc_baseline']:.4f} |"])


__all__ = ['results_table', 'averages_table', 'setting_text', 'settings_text', 'variant_methods',
           'variants_table', 'loo_table', 'selection_table', 'corruption_table',
           'localisation_table']
