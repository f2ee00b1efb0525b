"""Chooses the seed method's scorer settings on validation images, never on test images.

  python scripts/validation_study.py --workdir=runs/fashion_mnist [--draws=1,4]
      [--t_mins=0,100,200,300,400,500] [--num_fit=500] [--num_val=250]

For every (ID, OOD) pair of the workdir's suite (config.eval.id_datasets x ood_datasets) it uses
only TRAINING splits: the detector is fitted on the first ``num_fit`` ID-train images, and ID
validation images (the next ``num_val`` ID-train images) are compared with the first ``num_val``
images of each OOD set's train split (test images are never loaded). For each number of noise
draws R it runs the library's scorer once over the whole grid (t_min = 0); the features of every
t_min follow from the per-timestep power sums (the 6-D feature is a sum over the grid window, and
the script checks that against the scorer run with that t_min on a few images). Prints one JSON:
validation AUROC per setting and pair, the mean over pairs, and the setting with the best mean.
Not a test; it takes minutes on a CPU (about 50 network evaluations per image for R = 4).

Selecting on OOD *training* images is OOD exposure: the README and report say how the embedded
default was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ddm_ood import checkpoint  # noqa: E402
from ddm_ood import data  # noqa: E402
from ddm_ood import detector  # noqa: E402
from ddm_ood import evaluate  # noqa: E402
from ddm_ood import metrics  # noqa: E402
from ddm_ood import schedule as schedule_lib  # noqa: E402
from ddm_ood import workdir as workdir_lib  # noqa: E402

KIND = 'stein_ssim'


def window_features(per_t: np.ndarray, per_d: np.ndarray, k0: int) -> np.ndarray:
  """6-D features of the grid window k >= k0 from per-timestep sums [N, K, 3] / [N, K-1, 3]."""
  return np.concatenate([per_t[:, k0:].sum(1), per_d[:, k0:].sum(1)], axis=-1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--draws', default='1,4')
  parser.add_argument('--t_mins', default='0,100,200,300,400,500')
  parser.add_argument('--num_fit', type=int, default=500)
  parser.add_argument('--num_val', type=int, default=250)
  args = parser.parse_args()

  config = workdir_lib.load_config(args.workdir)
  params, step = checkpoint.restore_ema_params(args.workdir, config)
  ev = config.eval
  n_fit, n_val = args.num_fit, args.num_val
  names = list(dict.fromkeys(tuple(ev.id_datasets) + tuple(ev.ood_datasets)))
  config.data.texture_crops = max(config.data.texture_crops, n_fit + n_val)
  config.data.synthetic_examples = max(config.data.synthetic_examples, n_val)
  grid = schedule_lib.scorer_timesteps(config.diffusion.num_timesteps, config.scorer.num_steps)
  t_mins = [int(t) for t in args.t_mins.split(',')]
  images = {}
  for name in names:
    need = n_fit + n_val if name in ev.id_datasets else n_val
    x = data.load_images(name, 'train', config.data, max_examples=need, seed=config.seed)
    if name in ev.id_datasets and len(x) <= n_fit:
      sys.exit(f'ID set {name!r} has only {len(x)} training images, none left for validation '
               f'after --num_fit={n_fit}; lower --num_fit.')
    images[name] = x
  out = dict(workdir=os.path.abspath(args.workdir), checkpoint_step=step, kind=KIND,
             grid=grid.tolist(), num_fit=n_fit, num_val=n_val, split='train only',
             sizes={n: int(len(x)) for n, x in images.items()}, settings={})
  t0 = time.time()
  for r in [int(v) for v in args.draws.split(',')]:
    cfg = config.copy_and_resolve_references()
    cfg.scorer.num_draws, cfg.scorer.t_min = r, 0
    cfg.eval.feature_kinds = (KIND,)
    ext = evaluate.FeatureExtractor(cfg, params, step)
    feats = {}
    for name, x in images.items():
      f = ext.features_of(x, np.arange(len(x), dtype=np.int32), label=f'{name}/train')
      feats[name] = (f[f'per_timestep/{KIND}'], f[f'per_timestep_deriv/{KIND}'])
    # The window sum equals the scorer run with that t_min (checked on a few images).
    t_check = next((t for t in t_mins if t > 0), None)
    if t_check is not None:
      cfg_c = cfg.copy_and_resolve_references()
      cfg_c.scorer.t_min = t_check
      x = images[ev.id_datasets[0]][:8]
      direct = evaluate.FeatureExtractor(cfg_c, params, step).features_of(
          x, np.arange(8, dtype=np.int32))[f'features/{KIND}']
      k0 = int(np.searchsorted(grid, t_check))
      derived = window_features(*[a[:8] for a in feats[ev.id_datasets[0]]], k0)
      np.testing.assert_allclose(derived, direct, rtol=2e-4, atol=1e-4 * np.abs(direct).max())
    for t_min in t_mins:
      k0 = int(np.searchsorted(grid, t_min))
      if k0 >= len(grid):
        print(f't_min={t_min} is past the grid {grid.tolist()}: skipped', file=sys.stderr)
        continue
      rows = {}
      for id_name in ev.id_datasets:
        f_id = window_features(*feats[id_name], k0)
        det = detector.fit_detector(f_id[:n_fit], config.detector, seed=config.seed)
        s_id = np.asarray(detector.anomaly_score(det.params, f_id[n_fit:]))
        for ood_name in ev.ood_datasets:
          if ood_name == id_name:
            continue
          f_ood = window_features(*feats[ood_name], k0)[-n_val:]
          s_ood = np.asarray(detector.anomaly_score(det.params, f_ood))
          rows[f'{id_name} vs {ood_name}'] = round(float(metrics.auroc(s_id, s_ood)), 4)
      out['settings'][f'R={r},t_min={t_min}'] = dict(
          num_draws=r, t_min=t_min, timesteps=grid[k0:].tolist(),
          mean_auroc=round(float(np.mean(list(rows.values()))), 4), auroc=rows)
      print(f'R={r} t_min={t_min}: mean validation AUROC '
            f'{np.mean(list(rows.values())):.4f}', file=sys.stderr, flush=True)
  best = max(out['settings'], key=lambda k: out['settings'][k]['mean_auroc'])
  out['best'] = best
  out['wall_time_s'] = round(time.time() - t0, 1)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
