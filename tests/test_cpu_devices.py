"""Tests of ddm_ood.cpu_devices: how many host CPU devices to request (pure, no JAX re-init)."""

import pytest

from ddm_ood.cpu_devices import resolve_cpu_device_count as resolve


def test_default_uses_every_core():
  assert resolve('', None, cores=8) == 8
  assert resolve(None, '', cores=2, jax_platforms='cpu') == 2
  assert resolve('--xla_backend_optimization_level=0', None, cores=4) == 4


def test_single_core_or_off_leaves_flags_alone():
  assert resolve('', None, cores=1) is None
  assert resolve('', '1', cores=16) is None


def test_explicit_xla_flag_wins():
  flags = '--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=3'
  assert resolve(flags, '8', cores=16) is None
  assert resolve(flags, None, cores=16) is None


def test_env_var_chooses_exactly():
  assert resolve('', '3', cores=16, divides=(64,)) == 3   # the user's choice is not adjusted
  assert resolve('', ' 12 ', cores=2) == 12
  for bad in ('0', '-2', 'all', '2.5'):
    with pytest.raises(ValueError, match='DDM_OOD_CPU_DEVICES'):
      resolve('', bad, cores=4)


def test_automatic_count_divides_the_batch():
  assert resolve('', None, cores=6, divides=(64,)) == 4
  assert resolve('', None, cores=12, divides=(64, 96)) == 8
  assert resolve('', None, cores=3, divides=(64,)) == 2
  assert resolve('', None, cores=5, divides=(7,)) is None   # only 1 divides: leave it alone
  assert resolve('', None, cores=4, divides=(0,)) == 4       # 0 = no constraint


def test_other_platforms_and_accelerators():
  assert resolve('', None, cores=8, jax_platforms='tpu') is None
  assert resolve('', None, cores=8, jax_platforms='cuda,cpu') == 8
  # An installed GPU/TPU plugin will be the default backend unless JAX_PLATFORMS forces the CPU.
  assert resolve('', None, cores=8, accelerator_installed=True) is None
  assert resolve('', None, cores=8, jax_platforms='cpu', accelerator_installed=True) == 8
  assert resolve('', '4', cores=8, accelerator_installed=True) == 4
