"""Content checks of an evaluate run's outputs, shared by the end-to-end tests.

Every number in results.json, results.csv, results.md and report.md is checked against the
scores saved in scores.npz (recomputed with ddm_ood.metrics), not just for being in range.
"""

import csv
import json
import os

import numpy as np

from ddm_ood import metrics
from ddm_ood import provenance

METRICS = ('auroc', 'fpr95', 'aupr_in', 'aupr_out')


def load_outputs(workdir):
  """(results.json as a dict, scores.npz as a dict of arrays) of ``workdir/eval``."""
  ev = os.path.join(workdir, 'eval')
  with open(os.path.join(ev, 'results.json')) as f:
    results = json.load(f)
  with np.load(os.path.join(ev, 'scores.npz')) as f:
    scores = dict(f)
  # The network and scorer settings the scores (and score mode's thresholds) belong to.
  assert json.loads(str(scores.pop(provenance.SCORES_KEY))) == results['provenance']
  return results, scores


def check_rows_match_scores(results, scores):
  """Each row's metrics equal `metrics.ood_metrics` of its saved scores, exactly; scores.npz
  holds the ID-test and OOD-test scores of exactly the rows' (ID, method, OOD) triples."""
  want_keys = set()
  for r in results['rows']:
    s_id, s_ood = scores[f"{r['id']}|{r['kind']}|id"], scores[f"{r['id']}|{r['kind']}|{r['ood']}"]
    want_keys |= {f"{r['id']}|{r['kind']}|id", f"{r['id']}|{r['kind']}|{r['ood']}"}
    got = {k: r[k] for k in (*METRICS, 'n_id', 'n_ood')}
    assert got == metrics.ood_metrics(s_id, s_ood), r
  assert set(scores) == want_keys


AVERAGES = {'far': 'averages', 'near': 'near_averages'}


def suite_rows(results, suite):
  return [r for r in results['rows'] if r['suite'] == suite]


def check_averages(results):
  """results['averages'] / ['near_averages'][method] is the mean over that method's rows of the
  far / near suite, for every metric."""
  for suite, key in AVERAGES.items():
    rows = suite_rows(results, suite)
    kinds = list(dict.fromkeys(r['kind'] for r in rows))
    assert list(results[key]) == kinds, suite
    for k in kinds:
      sel = [r for r in rows if r['kind'] == k]
      for m in METRICS:
        np.testing.assert_allclose(results[key][k][m], np.mean([r[m] for r in sel]),
                                   rtol=1e-12, err_msg=f'{suite} {k} {m}')


def check_csv(results, path):
  """results.csv, parsed, equals the rows of results.json cell by cell (metrics to 6 decimals)."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results['rows'])
  for got, r in zip(rows, results['rows']):
    assert (got['id'], got['ood'], got['kind']) == (r['id'], r['ood'], r['kind'])
    assert got['role'] == r.get('role', '') and got['suite'] == r['suite']
    assert (int(got['n_id']), int(got['n_ood'])) == (r['n_id'], r['n_ood'])
    for m in METRICS:
      assert abs(float(got[m]) - r[m]) <= 5e-7 + 1e-12, (m, got, r)


def markdown_table(text, first_header):
  """(header cells, [row cells]) of the first markdown table whose header's first cell is
  ``first_header``; the separator line is dropped."""
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines)
               if l.startswith('|') and _cells(l)[0] == first_header)
  block = []
  for l in lines[start:]:
    if not l.startswith('|'):
      break
    block.append(_cells(l))
  assert set(''.join(block[1])) <= set('-:'), block[1]   # the |---| separator
  return block[0], block[2:]


def _cells(line):
  return [c.strip() for c in line.strip().strip('|').split('|')]


def check_results_table(results, text, suite='far'):
  """The '| ID | OOD | <method> AUROC | <method> FPR95 | ...' table in ``text`` holds one row
  per (ID, OOD) pair of ``suite`` with every method's AUROC and FPR95 (4 decimals), then the
  suite's average row."""
  header, body = markdown_table(text, 'ID')
  rows = suite_rows(results, suite)
  kinds = list(dict.fromkeys(r['kind'] for r in rows))
  assert header == ['ID', 'OOD'] + [f'{k} {m}' for k in kinds for m in ('AUROC', 'FPR95')]
  by = {(r['id'], r['ood'], r['kind']): r for r in rows}
  pairs = list(dict.fromkeys((r['id'], r['ood']) for r in rows))
  assert [tuple(row[:2]) for row in body] == pairs + [('**average**', '')]
  for row in body:
    for k in kinds:
      for m, name in (('auroc', 'AUROC'), ('fpr95', 'FPR95')):
        cell = row[header.index(f'{k} {name}')]
        want = (results[AVERAGES[suite]][k][m] if row[0] == '**average**' else
                by[(row[0], row[1], k)][m])
        assert abs(float(cell) - want) <= 5e-5 + 1e-12, (row, k, m)


def check_averages_table(results, text):
  """The report's '| method | role | AUROC | FPR95 | AUPR-In | AUPR-Out | ...' table equals
  results['averages'] (4 decimals) and each method's role."""
  header, body = markdown_table(text, 'method')
  assert header[:6] == ['method', 'role', 'AUROC', 'FPR95', 'AUPR-In', 'AUPR-Out']
  assert [row[0] for row in body] == list(results['averages'])
  roles = {r['kind']: r['role'] for r in results['rows'] if 'role' in r}
  for row in body:
    if row[0] in roles:
      assert row[1] == roles[row[0]], row
    for m, cell in zip(METRICS, row[2:6]):
      assert abs(float(cell) - results['averages'][row[0]][m]) <= 5e-5 + 1e-12, (row, m)


def check_run_outputs(workdir):
  """All of the above on an evaluated workdir; returns (results, scores)."""
  results, scores = load_outputs(workdir)
  check_rows_match_scores(results, scores)
  check_averages(results)
  ev = os.path.join(workdir, 'eval')
  check_csv(results, os.path.join(ev, 'results.csv'))
  with open(os.path.join(ev, 'results.md')) as f:
    text = f.read()
  check_results_table(results, text)
  if results['near_averages']:
    check_results_table(results, text.split('## Near-OOD')[1], 'near')
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  check_results_table(results, report.split('## Results')[1].split('## Averages')[0])
  check_averages_table(results, report.split('## Averages')[1])
  return results, scores
