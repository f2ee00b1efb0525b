"""Start-up of ``--mode=score`` with and without the persistent compilation cache (prints JSON).

  python benchmarks/startup_bench.py --workdir=runs/fashion_mnist [--images=8] [--rounds=2]

Scores the same folder (``--images`` test images of the workdir's first ID set, written as PNGs
to a temporary folder) with ``python -m ddm_ood.main --mode=score`` in fresh processes, in this
order per round: ``cold`` (an empty cache folder), ``warm`` (the same folder again: a second start),
``off`` (``--compilation_cache=off``). For each it reports the seconds from starting the process
to its first score (the line 'score: k / n images'), the part of it after ``main`` began (the
'Persistent compilation cache' line; before it: the interpreter, imports and the tcmalloc
re-exec, which no cache can shorten) and the cache's size, checks that every run wrote the same
CSV byte for byte, and gives cold / warm ratios (medians over rounds). The workdir is only read.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_images(workdir: str, n: int, folder: str) -> None:
  """The first ``n`` test images of the workdir's first ID set as 8-bit PNGs in ``folder``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ddm_ood import data  # pylint: disable=g-import-not-at-top
  from ddm_ood import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  images = data.load_images(config.eval.id_datasets[0], 'test', config.data, max_examples=n)
  os.makedirs(folder, exist_ok=True)
  for i, x in enumerate(images):
    a = np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(os.path.join(folder, f'{i:04d}.png'))


def score_once(workdir: str, folder: str, out: str, cache: str) -> dict:
  """One ``--mode=score`` process; times read as its log lines arrive."""
  cmd = [sys.executable, '-m', 'ddm_ood.main', '--mode=score', f'--workdir={workdir}',
         f'--images=folder:{folder}', f'--out={out}', f'--compilation_cache={cache}',
         '--alsologtostderr']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('DDM_OOD_COMPILATION_CACHE', None)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  main_start = first = None
  tail = []
  for line in proc.stderr:
    now = time.perf_counter() - t0
    tail = (tail + [line])[-30:]
    if main_start is None and 'Persistent compilation cache' in line:
      main_start = now
    if first is None and 'score: ' in line and ' images' in line and '/' in line:
      first = now
  if proc.wait() or first is None:
    raise RuntimeError(f'score mode failed:\n{"".join(tail)}')
  return {'to_first_score_s': first, 'main_to_first_score_s': first - main_start,
          'process_s': time.perf_counter() - t0}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained and evaluated workdir')
  parser.add_argument('--images', type=int, default=8, help='test images to score')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--runs', default='cold,warm,off', help='which runs, in this order')
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  tmp = tempfile.mkdtemp(prefix='ddm_ood_startup_')
  try:
    folder = os.path.join(tmp, 'images')
    write_images(workdir, args.images, folder)
    runs = {name: [] for name in args.runs.split(',')}
    csvs = []
    for r in range(max(args.rounds, 1)):
      cache = os.path.join(tmp, f'cache{r}')
      for name in runs:
        out = os.path.join(tmp, f'{name}{r}.csv')
        runs[name].append(score_once(workdir, folder, out, 'off' if name == 'off' else cache))
        if name == 'cold':
          size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
          runs[name][-1]['cache_mib'] = size / 2 ** 20
        with open(out, 'rb') as f:
          csvs.append(f.read())
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    report = {'workdir': workdir, 'images': args.images, 'rounds': args.rounds, 'runs': runs,
              'median': med, 'csv_identical': all(c == csvs[0] for c in csvs),
              'loadavg': os.getloadavg()[0]}
    for slow in ('cold', 'off'):
      if slow in med and 'warm' in med:
        for key, what in (('to_first_score_s', 'to_first_score'),
                          ('main_to_first_score_s', 'after_main_start')):
          report[f'{slow}_over_warm_{what}'] = med[slow][key] / med['warm'][key]
    print(json.dumps(report, indent=1))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
