"""ddm_ood.unet.GroupNorm: flax.linen.GroupNorm's parameters and results, in the faster form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood.unet import GroupNorm


@pytest.mark.parametrize('shape,groups', [((3, 7, 5, 16), 4), ((2, 9, 12), 3), ((2, 4, 4, 8), 8)])
def test_matches_flax_groupnorm(shape, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1.5, jnp.float32)
  ref = nn.GroupNorm(groups, epsilon=1e-5)
  ours = GroupNorm(groups, epsilon=1e-5)
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape,
                                                                                  params)
  c = shape[-1]
  params = {'params': {'scale': jnp.asarray(1 + 0.3 * rng.standard_normal(c), jnp.float32),
                       'bias': jnp.asarray(0.2 * rng.standard_normal(c), jnp.float32)}}
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  # Gradients too (training).
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
  g_ours, g_ref = jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_output_float32_statistics():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 8)) * 100 + 1000,
                  jnp.bfloat16)
  m = GroupNorm(4, dtype=jnp.bfloat16)
  y = m.apply(m.init(jax.random.key(0), x), x)
  assert y.dtype == jnp.bfloat16
  y32 = np.asarray(y, np.float32).reshape(2, 16, 4, 2)
  np.testing.assert_allclose(y32.mean((1, 3)), 0, atol=0.05)   # large offset removed exactly
  np.testing.assert_allclose(y32.std((1, 3)), 1, atol=0.05)


def test_indivisible_channels_say_which_config_field():
  with pytest.raises(ValueError, match='num_groups'):
    GroupNorm(3).init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))
