"""ddm_ood.compile_cache: where the persistent compilation cache lives and how it is turned off
(the cache at work across processes, bit-identical: tests/test_score_files.py)."""

import os

import jax
import pytest

from ddm_ood import compile_cache


@pytest.fixture
def clean_env(monkeypatch):
  """No DDM_OOD_COMPILATION_CACHE and no JAX cache folder (both restored after the test)."""
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  old = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  yield monkeypatch
  jax.config.update('jax_compilation_cache_dir', old)


def test_order_flag_then_env_then_jax_then_default(clean_env, tmp_path):
  clean_env.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  default = compile_cache.resolve()
  assert default == os.path.join(str(tmp_path / 'xdg'), 'ddm_ood', 'jax', compile_cache.host_tag())
  assert compile_cache.host_tag().startswith(os.uname().machine + '-')
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax'))
  assert compile_cache.resolve() == str(tmp_path / 'jax')        # JAX's own setting is kept
  clean_env.setenv(compile_cache.ENV_VAR, str(tmp_path / 'env'))
  assert compile_cache.resolve() == str(tmp_path / 'env')
  assert compile_cache.resolve(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  assert compile_cache.resolve('off') is None
  clean_env.setenv(compile_cache.ENV_VAR, 'OFF')
  assert compile_cache.resolve() is None
  assert compile_cache.resolve(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
