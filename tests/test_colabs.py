"""The quickstart notebook runs top to bottom at tiny size; the reproduction notebook parses."""

import ast
import os

import nbformat
import pytest

from tests import results_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path):
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(os.path.join(ROOT, 'colabs', 'quickstart.ipynb'), as_version=4)
  params = nb.cells[1]
  assert params.source.startswith('# Parameters')
  params.source = f"TINY = True\nWORKDIR = {str(tmp_path / 'wd')!r}\nREPO = {ROOT!r}\nREPO_URL = ''"
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': ROOT}})
  client.execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                    for o in c.get('outputs', []))
  assert '| **average** |' in outputs
  assert 'anomaly score' in outputs
  # The run's metrics match its saved scores and the report's tables match results.json.
  results_check.check_run_outputs(str(tmp_path / 'wd'))
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert len(images) >= 5  # the report plots are shown


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'celeba_reproduction.ipynb'])
def test_notebook_code_parses(name):
  nb = nbformat.read(os.path.join(ROOT, 'colabs', name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      ast.parse(cell.source)
