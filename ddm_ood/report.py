"""The human-readable report of an evaluation: ``workdir/report.md`` and PNG plots.

Plots (``workdir/plots/``): ROC curves per ID set, ID vs OOD score histograms, per-timestep AUROC,
example inputs with their SSIM and weighted error maps, the EMA sample grid, the training loss.
"""

from __future__ import annotations

import glob
import os
import time

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from ddm_ood import data
from ddm_ood import kinds
from ddm_ood import metrics
from ddm_ood import protocol
from ddm_ood import settings
from ddm_ood import tables
from ddm_ood import workdir as workdir_lib

SEED_METHOD = kinds.SEED


def _grid(n: int, max_cols: int = 4):
  cols = min(n, max_cols)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis('off')
  return fig, axes.flat


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _pairs(results):
  return list(dict.fromkeys((r['id'], r['ood']) for r in results['rows']))


def plot_roc(results, scores, id_name: str, path: str) -> str:
  """ROC curves (OOD positive) of every feature kind, one panel per OOD set of ``id_name``."""
  oods = [o for i, o in _pairs(results) if i == id_name]
  kinds = list(dict.fromkeys(r['kind'] for r in results['rows']))
  fig, axes = _grid(len(oods))
  for ax, ood in zip(axes, oods):
    for kind in kinds:
      s_id, s_ood = scores[f'{id_name}|{kind}|id'], scores[f'{id_name}|{kind}|{ood}']
      fpr, tpr = metrics.roc_curve_points(s_id, s_ood)
      ax.plot(fpr, tpr, label=f'{kind} ({metrics.auroc(s_id, s_ood):.3f})')
    ax.plot([0, 1], [0, 1], 'k:', lw=0.8)
    ax.set(title=f'{id_name} vs {ood}', xlabel='FPR', ylabel='TPR')
    ax.legend(fontsize=7, loc='lower right')
  return _save(fig, path)


def plot_histograms(results, scores, id_name: str, kind: str, path: str) -> str:
  """Histograms of ID-test vs OOD-test anomaly scores of one feature kind."""
  oods = [o for i, o in _pairs(results) if i == id_name]
  fig, axes = _grid(len(oods))
  s_id = scores[f'{id_name}|{kind}|id']
  for ax, ood in zip(axes, oods):
    s_ood = scores[f'{id_name}|{kind}|{ood}']
    both = np.concatenate([s_id, s_ood])
    lo, hi = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    ax.hist(np.clip(s_id, lo, hi), bins, alpha=0.6, density=True, label=f'ID {id_name}')
    ax.hist(np.clip(s_ood, lo, hi), bins, alpha=0.6, density=True, label=f'OOD {ood}')
    ax.set(title=f'{kind}: {id_name} vs {ood}', xlabel='anomaly score (-log p)')
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_per_timestep(results, kind: str, path: str) -> str:
  """Per-timestep AUROC (one-Gaussian detector on each timestep's power sums)."""
  ids = list(dict.fromkeys(r['id'] for r in results['rows']))
  fig, axes = _grid(len(ids), max_cols=3)
  ts = results.get('kind_timesteps', {}).get(kind, results['timesteps'])
  for ax, id_name in zip(axes, ids):
    for r in results['rows']:
      if r['id'] == id_name and r['kind'] == kind and 'per_timestep_auroc' in r:
        ax.plot(ts, r['per_timestep_auroc'], marker='o', ms=3, label=r['ood'])
    ax.axhline(0.5, color='k', ls=':', lw=0.8)
    ax.set(title=f'{kind}, ID {id_name}', xlabel='timestep t_k', ylabel='AUROC', ylim=(0, 1.02))
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_examples(config, example_maps, datasets, path: str, num: int) -> str:
  """Example inputs with x0hat, the SSIM map and the weighted Stein error at a middle timestep,
  and the anomaly map (heat map of where the detector's evidence lies).

  ``example_maps(images, ids)`` returns `pixel_maps.trajectory_maps`' dict plus 'anomaly_map'
  [B, H, W] (the evaluate mode passes it in; the report runs no network itself).
  """
  rows, t_mid = [], None
  for name in datasets:
    images = data.load_images(name, 'test', config.data, max_examples=num, seed=config.seed)
    maps = example_maps(images, np.arange(len(images), dtype=np.int32))
    k = len(maps['timesteps']) // 2   # a middle timestep of the seed method's window
    t_mid = int(maps['timesteps'][k])
    for j in range(len(images)):
      m = {key: np.asarray(maps[key][j, k]) for key in ('x0hat', 'ssim', 'weighted_error')}
      m['anomaly_map'] = np.asarray(maps['anomaly_map'][j])
      rows.append((name, images[j], m))
  fig, axes = plt.subplots(len(rows), 5, figsize=(10, 2.1 * len(rows)), squeeze=False)
  for (name, img, m), ax in zip(rows, axes):
    def show(a, x, title, rgb=False, **kw):
      # Images keep their colours; per-pixel maps are averaged over channels.
      a.imshow(x if rgb and x.shape[-1] == 3 else x.mean(-1), **kw)
      a.set_title(title, fontsize=7)
      a.axis('off')
    show(ax[0], np.clip((img + 1) / 2, 0, 1), f'{name}', rgb=True, cmap='gray', vmin=0, vmax=1)
    show(ax[1], np.clip((m['x0hat'] + 1) / 2, 0, 1), f'x0hat, t={t_mid}', rgb=True, cmap='gray',
         vmin=0, vmax=1)
    show(ax[2], m['ssim'], f'SSIM map, t={t_mid}', cmap='viridis', vmin=-1, vmax=1)
    show(ax[3], np.abs(m['weighted_error']), f'|weighted error|, t={t_mid}', cmap='magma')
    show(ax[4], m['anomaly_map'][..., None], 'anomaly map (all t)', cmap='magma')
  return _save(fig, path)


def plot_samples(grid_png: str, path: str) -> str:
  """The trainer's latest EMA sample grid, enlarged (nearest neighbour) with its step."""
  from PIL import Image
  grid = np.asarray(Image.open(grid_png))
  fig, ax = plt.subplots(figsize=(6, 6))
  ax.imshow(grid, cmap='gray', interpolation='nearest')
  ax.set_title(os.path.basename(grid_png), fontsize=8)
  ax.axis('off')
  return _save(fig, path)


def plot_loss(workdir: str, path: str) -> str | None:
  """Training loss curve from ``workdir/metrics.jsonl`` (None when there is none)."""
  recs = [r for r in workdir_lib.read_metrics(workdir) if 'loss' in r]
  if not recs:
    return None
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r['step'] for r in recs], [r['loss'] for r in recs])
  ax.set(xlabel='step', ylabel='eps MSE loss', yscale='log', title='training loss')
  return _save(fig, path)


def default_vs_baselines(results, method: str) -> list[str]:
  """Lines naming every pair on which ``method`` does not beat the best baseline."""
  by = {(r['id'], r['ood'], r['kind']): r['auroc'] for r in results['rows']}
  baselines = [k for k in results['averages'] if protocol.role(k) == 'baseline']
  lines = []
  for id_name, ood in _pairs(results):
    own = by.get((id_name, ood, method))
    base = {k: by[(id_name, ood, k)] for k in baselines if (id_name, ood, k) in by}
    if own is None or not base:
      continue
    best = max(base, key=base.get)
    if own < base[best] - 5e-5:  # differences invisible at 4 decimals are ties
      lines.append(f'- {id_name} vs {ood}: {method} {own:.4f} < {best} {base[best]:.4f}')
  return lines


def plot_localisation(loc: dict, path: str) -> str:
  """Pasted-patch examples: image, true patch, anomaly map, baseline map (one row each)."""
  ex = {k: np.asarray(v) for k, v in loc['examples'].items()}
  n = len(ex['images'])
  fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
  for i in range(n):
    img = ex['images'][i]
    panels = [((img + 1) / 2).squeeze(-1) if img.shape[-1] == 1 else (img + 1) / 2,
              ex['masks'][i], ex['map'][i], ex['baseline'][i]]
    for j, (title, p) in enumerate(zip(('input (patch pasted)', 'pasted region',
                                        'anomaly map', 'baseline map'), panels)):
      ax = axes[i, j]
      ax.imshow(p, cmap='gray' if j < 2 else 'magma')
      ax.set_axis_off()
      if i == 0:
        ax.set_title(title, fontsize=8)
  return _save(fig, path)


def write_report(config, workdir: str, results: dict, scores: dict, example_maps) -> str:
  """Writes ``workdir/report.md`` and its plots; returns the report path.

  ``example_maps(images, ids) -> dict`` gives the per-example maps of `plot_examples`.
  """
  plots = os.path.join(workdir, 'plots')
  os.makedirs(plots, exist_ok=True)
  ids = list(dict.fromkeys(r['id'] for r in results['rows']))
  kinds = list(dict.fromkeys(r['kind'] for r in results['rows']))
  main_kind = next((k for k in (protocol.ZERO_SHOT, SEED_METHOD) if k in kinds), kinds[0])
  t_kind = SEED_METHOD if SEED_METHOD in kinds else kinds[0]   # has per-timestep statistics
  figs = []
  for id_name in ids:
    safe = workdir_lib.safe_name(id_name)
    figs.append((f'ROC curves, ID {id_name}', plot_roc(results, scores, id_name,
                                                        os.path.join(plots, f'roc_{safe}.png'))))
    figs.append((f'Anomaly-score histograms ({main_kind}), ID {id_name}',
                 plot_histograms(results, scores, id_name, main_kind,
                                 os.path.join(plots, f'hist_{safe}.png'))))
  if any('per_timestep_auroc' in r for r in results['rows']):
    figs.append((f'Per-timestep AUROC ({t_kind})',
                 plot_per_timestep(results, t_kind, os.path.join(plots, 'per_timestep_auroc.png'))))
  example_sets = list(dict.fromkeys(list(config.eval.id_datasets[:1]) +
                                    list(config.eval.ood_datasets)))[:4]
  figs.append(('Example inputs, denoised estimates, SSIM maps and weighted Stein errors',
               plot_examples(config, example_maps, example_sets, os.path.join(plots, 'examples.png'),
                             config.eval.num_examples_plot)))
  samples = sorted(glob.glob(os.path.join(workdir, 'samples', '*.png')))
  if samples:
    figs.append(('EMA samples (DDIM)', plot_samples(samples[-1],
                                                    os.path.join(plots, 'samples.png'))))
  loss = plot_loss(workdir, os.path.join(plots, 'loss_curve.png'))
  if loss:
    figs.append(('Training loss', loss))

  if results.get('localisation'):
    figs.append(('Localisation: OOD patches pasted into ID-test images',
                 plot_localisation(results['localisation'],
                                   os.path.join(plots, 'localisation.png'))))
  # First to last logged step of the metrics file (compilation excluded).
  times = [r['time'] for r in workdir_lib.read_metrics(workdir) if r.get('time') is not None]
  train_time = max(times) - min(times) if len(times) > 1 else None
  not_better = default_vs_baselines(results, main_kind)
  near = bool(results.get('near_averages'))
  lines = [
      '# ddm_ood report', '',
      f'- workdir: `{workdir}`',
      f'- checkpoint step: {results["checkpoint_step"]}',
      f'- training wall time (first to last logged step): {train_time:.0f} s' if train_time
      else '- training wall time: n/a',
      f'- evaluation wall time: {results["wall_time_s"]:.0f} s '
      f'({results["backend"]}, {results["num_devices"]} device(s))',
      f'- written: {time.strftime("%Y-%m-%d %H:%M:%S")}',
      f'- base DDM trained on `{config.data.dataset}` at {config.data.image_size}x'
      f'{config.data.image_size}x{config.data.channels}; {config.diffusion.schedule} schedule, '
      f'T = {config.diffusion.num_timesteps}',
      f'- scorer: mode `{config.scorer.mode}`, K = {config.scorer.num_steps} timesteps '
      f'{results["timesteps"]} (seed family: t >= {settings.scorer(config.scorer).t_min}, window and '
      f'aggregation chosen per ID set, see the settings column; DiffPath baselines: all), noise `{config.scorer.noise}`, draws {config.scorer.num_draws}, '
      f'SSIM pair `{config.scorer.ssim_pair}`, weight `{config.scorer.ssim_weight}`, '
      f'scale_by_sigma {config.scorer.scale_by_sigma}',
      f'- detector fitted on {config.eval.num_fit or "all"} ID-train images per set; '
      f'{config.eval.num_test or "all"} test images per set; grid n_components '
      f'{list(config.detector.n_components)} x {list(config.detector.covariance_types)}',
      '', '## Results (AUROC higher is better, FPR95 lower is better; OOD = positive)', '',
      tables.results_table(results, 'far'), '',
      '## Averages over the suite', '', tables.averages_table(results), '',
      '## The zero-shot default, the seed method as published and as an oracle, and the '
      'baselines (AUROC)', '',
      tables.variants_table(results), '',
      '"zero-shot default": the kind and its settings chosen per ID set from ID-train images '
      'only (held-out images vs their synthetic anomalies). "as published": the seed method '
      '(`stein_ssim`) with R = 1, whole grid, plain sum. "oracle": the seed method chosen on '
      'the OOD sets\' train splits (OOD exposure; an ablation).', '',
      *(['## Near-OOD: class splits (AUROC, every method)', '',
         tables.variants_table(results, 'near', every=True), '',
         '## Near-OOD averages', '', tables.averages_table(results, 'near'), '']
        if near else []),
      '## Zero-shot selection (ID-train images only)', '', tables.selection_table(results), '',
      '### Per-corruption AUROC of each candidate kind (held-out ID images vs their synthetic '
      'anomalies)', '', tables.corruption_table(results), '',
      *(['## Leave-one-OOD-set-out: how much does the oracle selection overfit?', '',
         tables.loo_table(results), ''] if tables.loo_table(results) else []),
      *(['## Localisation (pixel-level AUROC)', '', tables.localisation_table(results), '']
        if tables.localisation_table(results) else []),
      '', f'## Where the default ({main_kind}) does not beat the best baseline', '',
      *(not_better or ['- none: it is best or tied on every pair.']),
      '', '## Plots', '']
  for title, path in figs:
    lines += [f'### {title}', '', f'![{title}](plots/{os.path.basename(path)})', '']
  out = os.path.join(workdir, 'report.md')
  workdir_lib.atomic_write(out, '\n'.join(lines) + '\n')
  return out
