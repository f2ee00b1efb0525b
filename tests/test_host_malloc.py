"""tcmalloc under XLA:CPU (`ddm_ood.host_malloc`): which library is chosen, that the re-executed
process really runs on it, and that trained parameters and scorer features are bitwise the same
on tcmalloc and on glibc malloc."""

import os
import subprocess
import sys

import pytest

from ddm_ood import host_malloc
from tests import train_helpers as h

TCMALLOC = host_malloc.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(
    TCMALLOC is None, reason='tcmalloc is not installed (scripts/setup.sh installs it)')


def _resolve(env_value=None, ld_preload=None, jax_platforms=None, accelerator=False,
             found='/lib/libtcmalloc_minimal.so.4', one_device_spread=False):
  return host_malloc.resolve_preload(env_value, ld_preload, jax_platforms, accelerator, found,
                                     one_device_spread)


def test_resolve_defaults_to_the_tcmalloc_found():
  assert _resolve() == '/lib/libtcmalloc_minimal.so.4'
  assert _resolve(env_value='auto') == '/lib/libtcmalloc_minimal.so.4'
  assert _resolve(jax_platforms='cpu') == '/lib/libtcmalloc_minimal.so.4'
  assert _resolve(found=None) is None


def test_resolve_leaves_the_users_choice_and_accelerators_alone():
  assert _resolve(env_value='system') is None
  assert _resolve(env_value=' SYSTEM ') is None
  assert _resolve(ld_preload='/opt/libjemalloc.so.2') is None
  assert _resolve(ld_preload='/x/libtcmalloc.so.4') is None
  assert _resolve(jax_platforms='tpu') is None
  assert _resolve(jax_platforms='cuda') is None
  assert _resolve(accelerator=True) is None
  assert _resolve(accelerator=True, jax_platforms='cpu') == '/lib/libtcmalloc_minimal.so.4'


def test_one_device_spread_over_cores_stays_on_glibc():
  assert _resolve(one_device_spread=True) is None
  assert _resolve(one_device_spread=True, env_value=__file__) == __file__  # an explicit choice
  spread = host_malloc.one_device_on_many_cores
  assert not spread(None, None, 2, None, False)  # default: one device per core
  assert spread(None, '1', 2, None, False)
  assert not spread(None, '1', 1, None, False)  # a single core is not spread
  assert spread('--xla_force_host_platform_device_count=1', None, 4, None, False)
  assert not spread('--xla_force_host_platform_device_count=2', '1', 4, None, False)
  assert spread(None, None, 8, None, True)  # accelerator installed: cpu_devices leaves 1 device
  assert not spread(None, 'zero', 2, None, False)  # cpu_devices reports the bad value itself


def test_resolve_explicit_path(tmp_path):
  lib = tmp_path / 'libmymalloc.so'
  lib.write_bytes(b'')
  assert _resolve(env_value=str(lib), found=None) == str(lib)
  with pytest.raises(ValueError, match='no such file.*auto.*system'):
    _resolve(env_value=str(tmp_path / 'missing.so'))


def test_find_tcmalloc_searches_the_given_dirs_in_name_order(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  a.mkdir()
  b.mkdir()
  assert host_malloc.find_tcmalloc([str(a), str(b)]) is None
  (b / 'libtcmalloc.so.4').write_bytes(b'')
  assert host_malloc.find_tcmalloc([str(a), str(b)]) == str(b / 'libtcmalloc.so.4')
  (a / 'libtcmalloc_minimal.so.4').write_bytes(b'')
  assert host_malloc.find_tcmalloc([str(a), str(b)]) == str(a / 'libtcmalloc_minimal.so.4')


_REPORT = """
from ddm_ood import host_malloc
host_malloc.maybe_reexec()
print(host_malloc.active())
print(any('tcmalloc' in line for line in open('/proc/self/maps')))
print(host_malloc.describe())
"""


def _run(code, **env_overrides):
  env = {k: v for k, v in h.subprocess_env().items()
         if k not in ('LD_PRELOAD', host_malloc.ENV_VAR, host_malloc.ACTIVE_ENV_VAR)}
  env.update(env_overrides)
  proc = subprocess.run([sys.executable, '-c', code], cwd=h.ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip().splitlines()


@needs_tcmalloc
def test_reexec_runs_the_same_command_on_tcmalloc():
  active, mapped, described = _run(_REPORT)
  assert active == TCMALLOC
  assert mapped == 'True'
  assert TCMALLOC in described and 'system' in described
  active, mapped, described = _run(_REPORT, DDM_OOD_MALLOC='system')
  assert (active, mapped) == ('None', 'False')
  assert 'system malloc' in described
  if os.cpu_count() > 1 and len(os.sched_getaffinity(0)) > 1:
    active, mapped, _ = _run(_REPORT, DDM_OOD_CPU_DEVICES='1')
    assert (active, mapped) == ('None', 'False')


def test_bad_choice_fails_with_a_clear_message():
  env = dict(h.subprocess_env(), DDM_OOD_MALLOC='/nonexistent/libfoo.so')
  env.pop(host_malloc.ACTIVE_ENV_VAR, None)
  proc = subprocess.run([sys.executable, '-c', _REPORT], cwd=h.ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert "DDM_OOD_MALLOC='/nonexistent/libfoo.so': no such file" in proc.stderr


# The default network (configs/fashion_mnist.py) at full XLA optimisation, two devices: two train
# steps and the stein_ssim scorer; prints a digest of the parameters and the features.
_TRAIN_AND_SCORE = """
import hashlib, os, sys
from ddm_ood import host_malloc
host_malloc.maybe_reexec()
import jax, numpy as np
from ddm_ood import schedule as schedule_lib, scorer as scorer_lib, sharding, train, unet
from tests import train_helpers as h
config = h.load_config('fashion_mnist')
config.train.batch_size = 32
mesh = sharding.data_mesh()
model = unet.build_model(config)
sched = schedule_lib.schedule_for(config.diffusion)
state = jax.jit(lambda: train.create_train_state(model, train.make_optimizer(config.train), 28, 0),
                out_shardings=sharding.replicated_sharding(mesh))()
step = train.make_train_step(model, sched, config.train, mesh)
x = np.random.default_rng(0).uniform(-1, 1, (32, 28, 28, 1)).astype(np.float32)
for _ in range(2):
  state, _ = step(state, sharding.global_batch_from_local(x, mesh))
sc = config.scorer
sc.mode, sc.num_steps, sc.num_draws, sc.t_min = 'forward', 4, 1, 0
fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t), sched,
                                               sc, ('stein_ssim',)))
out = fn(state.ema_params, x[:16], np.arange(16, dtype=np.int32), jax.random.key(0))
digest = hashlib.sha256()
for leaf in jax.tree.leaves((state.params, out['features']['stein_ssim'])):
  digest.update(np.asarray(leaf).tobytes())
print(host_malloc.active())
print(digest.hexdigest())
"""


@needs_tcmalloc
def test_trained_parameters_and_features_do_not_depend_on_the_allocator():
  xla = '--xla_force_host_platform_device_count=2'
  on_tcmalloc = _run(_TRAIN_AND_SCORE, XLA_FLAGS=xla)
  on_glibc = _run(_TRAIN_AND_SCORE, XLA_FLAGS=xla, DDM_OOD_MALLOC='system')
  assert on_tcmalloc[0] == TCMALLOC and on_glibc[0] == 'None'
  assert on_tcmalloc[1] == on_glibc[1]


@needs_tcmalloc
def test_importing_the_library_never_reexecutes():
  code = ('import ddm_ood, os; from ddm_ood import main, host_malloc; '
          'print(os.environ.get("LD_PRELOAD", "")); print(host_malloc.active())')
  env = {k: v for k, v in h.subprocess_env().items() if k != 'LD_PRELOAD'}
  proc = subprocess.run([sys.executable, '-c', code], cwd=h.ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['None']
