"""Which criterion quantile would the ID data itself choose? Leave one corruption family out.

  python3 scripts/criterion_check.py --workdir=runs/fashion_mnist [--quantiles=0.01,0.25,0.333,0.5,1]

Reads the evaluated workdir's ``eval/results.json``: for every ID set, the protocol's finalists
(each candidate kind at its selected window, aggregation and complexity) with their AUROC on each
synthetic corruption made from held-out ID-train images. For each quantile q and each corruption
family F, the finalist with the best criterion (`selection.criterion`, quantile q) over the other
families' corruptions is picked, and its mean AUROC on F's corruptions read. Prints, as JSON, that
held-out-family AUROC per ID set and its average per q. Only ID-derived anomalies are read (no OOD
set), so the choice of ``select.criterion_quantile`` it informs stays zero-shot. It re-ranks the
finalists only: each kind's window was chosen with the configured quantile on every family.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddm_ood import selection  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddm_ood import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def held_out_family_aurocs(finalists: list[dict], quantile: float) -> dict[str, float]:
  """Per family: the mean AUROC on its corruptions of the finalist picked on the other families."""
  family = {name: c.family for name, c in synthetic.REGISTRY.items()}
  out = {}
  for held in synthetic.FAMILIES:
    def others(row, held=held):
      return {c: v for c, v in row['auroc'].items() if family[c] != held}
    best = max(finalists, key=lambda row: selection.criterion(others(row), quantile))
    out[held] = float(np.mean([v for c, v in best['auroc'].items() if family[c] == held]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='an evaluated workdir')
  parser.add_argument('--quantiles', default='0.01,0.25,0.3333333333333333,0.5,1')
  args = parser.parse_args()
  with open(os.path.join(args.workdir, 'eval', 'results.json')) as f:
    settings = json.load(f)['settings']
  quantiles = [float(q) for q in args.quantiles.split(',')]
  per_set = {}
  for id_set, rows in settings.items():
    finalists = rows['zero_shot']['selection']
    per_set[id_set] = {str(q): float(np.mean(list(held_out_family_aurocs(finalists, q).values())))
                       for q in quantiles}
  average = {str(q): float(np.mean([v[str(q)] for v in per_set.values()])) for q in quantiles}
  print(json.dumps({'held_out_family_auroc': average, 'per_id_set': per_set}, indent=1))


if __name__ == '__main__':
  main()
