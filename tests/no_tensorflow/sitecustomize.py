"""Makes TensorFlow look not installed in a Python whose PYTHONPATH starts with this folder.

Python imports ``sitecustomize`` at start-up from sys.path, so this is active in the process and
in anything it re-executes or starts with the same environment (``main``'s tcmalloc re-exec,
subprocesses). Every finder on ``sys.meta_path`` is wrapped so that ``tensorflow`` (and
``tensorflow_datasets``) are found nowhere: ``importlib.util.find_spec`` returns None (as
etils / Orbax check) and ``import tensorflow`` raises ModuleNotFoundError, as on a JAX image
without TensorFlow. Each process that loads this appends its pid to the file named by
``DDM_OOD_TEST_NO_TF_MARKER`` (the test's proof that it was in place).
"""

import os
import sys

HIDDEN = ('tensorflow', 'tensorflow_datasets')


class _Hide:
  """A meta path finder that finds nothing under HIDDEN and delegates everything else."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, fullname, path=None, target=None):
    if fullname.split('.')[0] in HIDDEN:
      return None
    find = getattr(self._finder, 'find_spec', None)
    return find(fullname, path, target) if find else None

  def __getattr__(self, name):
    return getattr(self._finder, name)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
if os.environ.get('DDM_OOD_TEST_NO_TF_MARKER'):
  with open(os.environ['DDM_OOD_TEST_NO_TF_MARKER'], 'a') as f:
    f.write(f'{os.getpid()}\n')
