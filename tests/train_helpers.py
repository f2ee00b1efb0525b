"""Helpers shared by tests/test_train.py (no tests here)."""

import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small networks: LLVM optimisation dominates CPU compile time and buys nothing in tests.
FAST_XLA = '--xla_backend_optimization_level=0'


def load_config(name):
  """get_config() of configs/{name}.py, loaded by path."""
  spec = importlib.util.spec_from_file_location(f'cfg_{name}',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def subprocess_env(extra_xla='', cache_dir=None):
  """Environment for a CPU subprocess; ``cache_dir``: JAX's persistent compilation cache, so
  reruns of the same program (resume tests) skip compilation."""
  env = dict(os.environ)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', TFDS_DISABLE_GCS='1',
             PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''),
             XLA_FLAGS=f'{FAST_XLA} {extra_xla}'.strip())
  return env


def start_main(workdir, log_path, *overrides, config='configs/tiny.py', cache_dir=None):
  """Starts `python -m ddm_ood.main --mode=train` on ``config``; output goes to ``log_path``."""
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={config}', f'--workdir={workdir}',
         '--mode=train', '--alsologtostderr', *overrides]
  log = open(log_path, 'w')
  return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(cache_dir=cache_dir), stdout=log,
                          stderr=subprocess.STDOUT)


def finished_steps(workdir):
  """Steps of the finished (renamed, not tmp) checkpoints in workdir/checkpoints."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def wait_for(predicate, proc, timeout, what):
  """Polls ``predicate()`` every 0.1 s; fails if ``proc`` exits first or on timeout."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f'process exited (rc={proc.returncode}) before {what}')
    time.sleep(0.1)
  proc.kill()
  raise AssertionError(f'timed out waiting for {what}')


def read(path):
  with open(path) as f:
    return f.read()
