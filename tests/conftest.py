"""Shared test set-up: CPU only, offline, deterministic."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TFDS_DISABLE_GCS', '1')  # never reach the network from tests
# Tests compare results, not speed: skip XLA's slow backend optimisations (compiles ~10x faster).
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
# main, the API and the benchmarks use JAX's persistent compilation cache by default
# (ddm_ood/compile_cache.py): tests and their subprocesses use a fresh folder of their own, never
# the user's ~/.cache.
if 'DDM_OOD_COMPILATION_CACHE' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='ddm_ood_test_jax_cache_')
  os.environ['DDM_OOD_COMPILATION_CACHE'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
