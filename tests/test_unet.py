"""Tests of ddm_ood.unet: shapes, parameter count, determinism, batch independence, errors."""

import importlib.util
import os

# Tiny networks: LLVM optimisation dominates compile time on CPU and buys nothing here.

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', os.path.join(ROOT, 'configs',
                                                                            f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _small(channels, dropout=0.0):
  return unet.UNet(channels=channels, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), num_heads=2, dropout=dropout, num_groups=4)


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('size', [16, 32])
def test_output_shape_matches_input(channels, size):
  model = _small(channels)
  params = unet.init_params(model, jax.random.key(0), size)
  x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
  out = jax.jit(model.apply)(params, x, jnp.array([0, 7]))
  assert out.shape == x.shape and out.dtype == jnp.float32


def test_celeba_param_count():
  config = _load_config('celeba')
  model = unet.build_model(config)
  shapes = jax.eval_shape(lambda k: unet.init_params(model, k, 32), jax.random.key(0))
  n = unet.param_count(shapes)
  print(f'CelebA UNet parameters: {n:,}')
  assert n == 52_542_979  # ADM-style 128-channel UNet; DiffPath reports ~52.5M.


def test_tiny_config_builds():
  config = _load_config('tiny')
  model = unet.build_model(config)
  shapes = jax.eval_shape(lambda k: unet.init_params(model, k, config.data.image_size),
                          jax.random.key(0))
  assert 1_000 < unet.param_count(shapes) < 200_000


def test_eval_deterministic_train_dropout_random():
  model = _small(1, dropout=0.5)
  params = unet.init_params(model, jax.random.key(0), 16)
  # conv_out is zero-initialised (output identically 0): perturb it so dropout is visible.
  params = jax.tree.map(lambda p: p + 0.05, params)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  t = jnp.array([3, 50])
  apply = jax.jit(model.apply, static_argnames='train')
  np.testing.assert_array_equal(apply(params, x, t), apply(params, x, t))
  a = apply(params, x, t, train=True, rngs={'dropout': jax.random.key(2)})
  b = apply(params, x, t, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, b)


def test_per_sample_independence():
  model = _small(3)
  params = jax.tree.map(lambda p: p + 0.05, unet.init_params(model, jax.random.key(0), 16))
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  t = jnp.array([5, 20, 80])
  apply = jax.jit(model.apply)
  batched = apply(params, x, t)
  single = apply(params, x[1:2], t[1:2])
  np.testing.assert_allclose(batched[1:2], single, atol=1e-5)


def test_input_errors():
  model = _small(1)
  params = unet.init_params(model, jax.random.key(0), 16)
  t2 = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match='channel'):
    model.apply(params, jnp.zeros((2, 16, 16, 3)), t2)
  with pytest.raises(ValueError, match='divisible'):
    model.apply(params, jnp.zeros((2, 15, 15, 1)), t2)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    model.apply(params, jnp.zeros((16, 16, 1)), t2)
  with pytest.raises(ValueError, match='float'):
    model.apply(params, jnp.zeros((2, 16, 16, 1), jnp.uint8), t2)
