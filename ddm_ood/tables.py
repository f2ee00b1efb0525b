"""Markdown tables of a results dict (``workdir/eval/results.json``); pure formatting, no I/O."""

from __future__ import annotations

import numpy as np

from ddm_ood import protocol


def _f(x) -> str:
  return '' if x is None else f'{x:.4f}'


def results_table(results: dict) -> str:
  """One row per (ID, OOD) pair, AUROC / FPR95 columns per method, and the average row."""
  kinds = list(dict.fromkeys(r['kind'] for r in results['rows']))
  pairs = list(dict.fromkeys((r['id'], r['ood']) for r in results['rows']))
  by = {(r['id'], r['ood'], r['kind']): r for r in results['rows']}
  head = '| ID | OOD | ' + ' | '.join(f'{k} AUROC | {k} FPR95' for k in kinds) + ' |'
  lines = [head, '|' + '---|' * (2 + 2 * len(kinds))]
  for id_name, ood_name in pairs:
    cells = []
    for k in kinds:
      r = by.get((id_name, ood_name, k))
      cells += [f"{r['auroc']:.4f}", f"{r['fpr95']:.4f}"] if r else ['', '']
    lines.append(f'| {id_name} | {ood_name} | ' + ' | '.join(cells) + ' |')
  avg = results['averages']
  cells = []
  for k in kinds:
    cells += [f"{avg[k]['auroc']:.4f}", f"{avg[k]['fpr95']:.4f}"]
  lines.append('| **average** | | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def averages_table(results: dict) -> str:
  """Suite averages per method with its role and the settings it ran with."""
  lines = ['| method | role | AUROC | FPR95 | AUPR-In | AUPR-Out | settings (per ID set) |',
           '|---|---|---|---|---|---|---|']
  for k, v in results['averages'].items():
    lines.append(f'| {k} | {protocol.role(k)} | {v["auroc"]:.4f} | {v["fpr95"]:.4f} | '
                 f'{v["aupr_in"]:.4f} | {v["aupr_out"]:.4f} | {settings_text(results, k)} |')
  return '\n'.join(lines)


def settings_text(results: dict, method: str) -> str:
  """'fashion_mnist: R=4 t>=0 zsum; ...' (empty for the baselines)."""
  parts = []
  for id_name, per in (results.get('settings') or {}).items():
    s = (per.get(method) or {}).get('setting')
    if s:
      parts.append(f"{id_name}: R={s['num_draws']} t>={s['t_min']} {s['aggregation']}")
  return '; '.join(parts)


def variants_table(results: dict, kind: str = protocol.SEED_KIND) -> str:
  """The seed method's variants (as published / zero-shot default / oracle) and the baselines,
  per pair and on average, same checkpoint and images."""
  methods = [m for m in (kind + protocol.PUBLISHED, kind, kind + protocol.ORACLE)
             if m in results['averages']]
  methods += [m for m in results['averages'] if protocol.role(m) == 'baseline']
  names = [protocol.VARIANT_NAMES.get(m[len(kind):], m) if m.startswith(kind) else m
           for m in methods]
  by = {(r['id'], r['ood'], r['kind']): r['auroc'] for r in results['rows']}
  pairs = list(dict.fromkeys((r['id'], r['ood']) for r in results['rows']))
  lines = ['| ID | OOD | ' + ' | '.join(names) + ' |', '|' + '---|' * (2 + len(methods))]
  for id_name, ood in pairs:
    lines.append(f'| {id_name} | {ood} | ' +
                 ' | '.join(_f(by.get((id_name, ood, m))) for m in methods) + ' |')
  lines.append('| **average AUROC** | | ' + ' | '.join(
      _f(results['averages'][m]['auroc']) for m in methods) + ' |')
  return '\n'.join(lines)


def loo_table(results: dict, kind: str = protocol.SEED_KIND) -> str | None:
  """Leave-one-OOD-set-out: each OOD set's test AUROC (mean over ID sets) when the oracle
  selection saw it, when it did not, and under the zero-shot default (which sees no OOD set)."""
  loo = results.get('leave_one_out')
  if not loo:
    return None
  by = {(r['id'], r['ood'], r['kind']): r['auroc'] for r in results['rows']}
  lines = ['| OOD set | oracle, set seen | oracle, set left out | setting chosen without it | '
           'zero-shot default |', '|---|---|---|---|---|']
  seen_all, wo_all, zs_all = [], [], []
  for ood, d in loo.items():
    ids = list(d['auroc_with'])
    if not ids:
      continue
    seen = float(np.mean([d['auroc_with'][i] for i in ids]))
    wo = float(np.mean([d['auroc_without'][i] for i in ids]))
    zs = [by[(i, ood, kind)] for i in ids if (i, ood, kind) in by]
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
  """The zero-shot protocol per ID set and kind: the chosen setting and its criterion (mean
  AUROC of held-out ID images vs their synthetic anomalies), and the best criterion each kind
  reached: what the protocol would pick if it also chose among the kinds."""
  lines = ['| ID | kind | chosen | criterion | per corruption |', '|---|---|---|---|---|']
  for id_name, per in (results.get('settings') or {}).items():
    for method, d in per.items():
      if not d.get('selection') or '@' in method or (kinds and method not in kinds):
        continue
      best = max(d['selection'], key=lambda r: r['criterion'])
      s = d['setting']
      corr = ', '.join(f'{c} {a:.2f}' for c, a in best['auroc'].items())
      lines.append(f"| {id_name} | {method} | R={s['num_draws']} t>={s['t_min']} "
                   f"{s['aggregation']} | {best['criterion']:.4f} | {corr} |")
  return '\n'.join(lines)


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


__all__ = ['results_table', 'averages_table', 'settings_text', 'variants_table', 'loo_table',
           'selection_table', 'localisation_table']
