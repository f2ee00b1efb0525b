"""The dependency rule of docs/design.md: no import cycles; the pure core never imports the shell.

Every ``import`` / ``from ... import`` of a ddm_ood module counts, at module level or inside a
function (a lazy import is still a dependency).
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ddm_ood')
# The pure core: functions of arrays and configs; no files, no logging of runs, no CLI.
CORE = {'schedule', 'unet', 'layers', 'diffusers_unet2d', 'network', 'flops', 'ssim',
        'trajectory', 'kinds', 'settings', 'default_config', 'scorer', 'pixel_maps', 'inputs',
        'features', 'metrics', 'detector', 'synthetic', 'localisation', 'complexity'}


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('__init__') else rel] = os.path.join(dirpath, f)
  return out


def _top(name: str) -> str:
  """'data.sources' -> 'data' (packages count as one node)."""
  return name.split('.')[0]


def import_graph() -> dict[str, set[str]]:
  """{module: ddm_ood modules it imports}, packages collapsed to their top-level name."""
  graph: dict[str, set[str]] = {}
  for name, path in _modules().items():
    if name == '__init__':
      continue
    node = _top(name)
    deps = graph.setdefault(node, set())
    for n in ast.walk(ast.parse(open(path).read())):
      targets = []
      if isinstance(n, ast.Import):
        targets = [a.name for a in n.names]
      elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
        targets = ([f'{n.module}.{a.name}' for a in n.names] if n.module == 'ddm_ood'
                   else [n.module])
      elif isinstance(n, ast.ImportFrom) and n.level > 0:   # relative: inside a package
        targets = [f'ddm_ood.{node}']
      for t in targets:
        if t.startswith('ddm_ood.'):
          dep = _top(t[len('ddm_ood.'):])
          if dep != node:
            deps.add(dep)
  return graph


def test_graph_sees_the_known_edges():
  g = import_graph()
  assert 'scorer' in g['evaluate'] and 'schedule' in g['scorer'] and 'data' in g['config_checks']
  assert 'config_checks' in g['workdir']
  assert {'data', 'train', 'scorer', 'workdir'} <= set(g)


def test_core_never_imports_the_shell():
  g = import_graph()
  bad = {m: sorted(g[m] - CORE) for m in CORE if g.get(m, set()) - CORE}
  assert not bad, f'core modules import shell modules: {bad}'


def test_no_import_cycles():
  g = import_graph()
  state: dict[str, int] = {}
  cycles = []

  def visit(node, stack):
    state[node] = 1
    for dep in sorted(g.get(node, ())):
      if state.get(dep) == 1:
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = 2

  for node in sorted(g):
    if node not in state:
      visit(node, [node])
  assert not cycles, f'import cycles: {cycles}'
