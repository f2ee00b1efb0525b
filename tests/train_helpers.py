"""Helpers shared by the tests (no tests here): configs, training subprocesses, random UNet
parameters and the training hooks that used to be config knobs of ddm_ood."""

import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

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


NO_TENSORFLOW = os.path.join(ROOT, 'tests', 'no_tensorflow')


def subprocess_env(extra_xla='', cache_dir=None, no_tf_marker=None):
  """Environment for a CPU subprocess; ``cache_dir``: JAX's persistent compilation cache, so
  reruns of the same program (resume tests) skip compilation; ``no_tf_marker``: a file path:
  ``import tensorflow`` fails in the subprocess (tests/no_tensorflow/sitecustomize.py), which
  appends its pid to that file."""
  env = dict(os.environ)
  if no_tf_marker:
    env.update(DDM_OOD_TEST_NO_TF_MARKER=str(no_tf_marker),
               PYTHONPATH=NO_TENSORFLOW + os.pathsep + env.get('PYTHONPATH', ''))
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', TFDS_DISABLE_GCS='1',
             PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''),
             XLA_FLAGS=f'{FAST_XLA} {extra_xla}'.strip())
  return env


def start_main(workdir, log_path, *overrides, config='configs/tiny.py', cache_dir=None,
               sleep_per_step=0.0, sigkill_in_save_step=-1):
  """Starts `python -m ddm_ood.main --mode=train` on ``config``; output goes to ``log_path``.

  With ``sleep_per_step`` > 0 (seconds after each step, so a run can be interrupted mid-way) or
  ``sigkill_in_save_step`` >= 0 (the process SIGKILLs itself right after starting the
  asynchronous save of that step's checkpoint) it runs tests/train_main.py, which installs these
  hooks and then runs the same main.
  """
  if sleep_per_step or sigkill_in_save_step >= 0:
    entry = [os.path.join(ROOT, 'tests', 'train_main.py'), f'--test_sleep_per_step={sleep_per_step}',
             f'--test_sigkill_in_save_step={sigkill_in_save_step}']
  else:
    entry = ['-m', 'ddm_ood.main']
  cmd = [sys.executable, *entry, f'--config={config}', f'--workdir={workdir}', '--mode=train',
         '--alsologtostderr', *overrides]
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


# ------------------------------------------------------------------ test hooks (not in ddm_ood)
def random_params(model, image_size, seed=0):
  """Random UNet parameters with EVERY layer non-zero, drawn in numpy (no compiled init).

  flax's init zeroes conv_out and each residual branch's last conv, so a freshly initialised
  UNet outputs 0; tests and benchmarks need eps_theta to be a non-trivial function of (x_t, t).
  Kernels ~ N(0, 1 / fan_in); GroupNorm scales ~ 1 + 0.1 N(0, 1); biases ~ 0.1 N(0, 1).
  """
  from ddm_ood import unet  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda k: unet.init_params(model, k, image_size), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if name.endswith("['kernel']"):
      return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if name.endswith("['scale']") else 0.0) + 0.1 * z)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def nan_at_step(monkeypatch, nan_step):
  """Makes the loss, gradient norm and new state of training step ``nan_step`` NaN.

  Wraps `ddm_ood.train.step.make_train_step` (as the training loop calls it), so the loop's
  non-finite guard sees what a diverged step produces.
  """
  from ddm_ood.train import step as step_lib  # pylint: disable=g-import-not-at-top
  make = step_lib.make_train_step

  def make_with_nan(*args, **kwargs):
    real = make(*args, **kwargs)

    def train_step(state, batch):
      bad = int(state.step) == nan_step   # read before the state is donated
      state, metrics = real(state, batch)
      if bad:
        poison = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
        state = jax.tree.map(poison, state)
        metrics = jax.tree.map(poison, metrics)
      return state, metrics
    return train_step

  monkeypatch.setattr(step_lib, 'make_train_step', make_with_nan)


def install_process_hooks(sleep_per_step=0.0, sigkill_in_save_step=-1):
  """For a training subprocess (tests/train_main.py): sleep after each step / SIGKILL mid-save.

  ``sleep_per_step`` > 0 sleeps that many seconds after each step (wrapping
  `ddm_ood.train.step.make_train_step`); ``sigkill_in_save_step`` >= 0 SIGKILLs the process
  right after `ddm_ood.checkpoint.save` starts the asynchronous save of that step.
  """
  import signal  # pylint: disable=g-import-not-at-top
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top
  from ddm_ood.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if sleep_per_step > 0:
    make = step_lib.make_train_step

    def make_slow(*args, **kwargs):
      real = make(*args, **kwargs)

      def train_step(state, batch):
        out = real(state, batch)
        time.sleep(sleep_per_step)
        return out
      return train_step
    step_lib.make_train_step = make_slow
  if sigkill_in_save_step >= 0:
    save = checkpoint.save

    def save_then_kill(manager, step, *args, **kwargs):
      out = save(manager, step, *args, **kwargs)
      if int(step) == sigkill_in_save_step:
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    checkpoint.save = save_then_kill
