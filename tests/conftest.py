"""Shared test set-up: CPU only, offline, deterministic."""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TFDS_DISABLE_GCS', '1')  # never reach the network from tests
# Tests compare results, not speed: skip XLA's slow backend optimisations (compiles ~10x faster).
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
