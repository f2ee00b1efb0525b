"""Tests of ddm_ood.schedule: schedules, forward process and x_t / eps / x0 conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import schedule as schedule_lib


@pytest.mark.parametrize('kind', ['cosine', 'linear'])
@pytest.mark.parametrize('T', [1000, 4000])
def test_alphas_cumprod_monotone_in_unit_interval(kind, T):
  s = schedule_lib.make_schedule(kind, T)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  assert abar.shape == (T,) and s.num_timesteps == T
  assert np.all(abar > 0) and np.all(abar <= 1)
  assert np.all(np.diff(abar) < 0)
  betas = np.asarray(s.betas)
  assert np.all(betas > 0) and np.all(betas <= 0.999 + 1e-7)
  np.testing.assert_allclose(np.asarray(s.sigmas) ** 2, 1 - abar, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod) ** 2, abar, rtol=1e-5)
  for leaf in s:
    assert leaf.dtype == jnp.float32


def test_cosine_endpoints():
  s = schedule_lib.make_schedule('cosine', 4000)
  assert float(s.alphas_cumprod[0]) > 0.999
  assert float(s.alphas_cumprod[-1]) < 1e-3


def test_q_sample_moments():
  s = schedule_lib.make_schedule('cosine', 1000)
  n = 20000
  x0 = jnp.full((n, 1, 1, 1), 0.7, jnp.float32)
  for t_val in (10, 500, 900):
    t = jnp.full((n,), t_val, jnp.int32)
    eps = jax.random.normal(jax.random.key(t_val), x0.shape)
    xt = np.asarray(schedule_lib.q_sample(s, x0, t, eps)).ravel()
    mean = float(s.sqrt_alphas_cumprod[t_val]) * 0.7
    var = float(s.sigmas[t_val]) ** 2
    se = np.sqrt(var / n)
    assert abs(xt.mean() - mean) < 5 * se + 1e-6, (t_val, xt.mean(), mean)
    assert abs(xt.var() - var) < 5 * var * np.sqrt(2 / n) + 1e-9, (t_val, xt.var(), var)


def test_round_trips():
  s = schedule_lib.make_schedule('linear', 1000)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.randint(k3, (4,), 0, 1000)
  xt = schedule_lib.q_sample(s, x0, t, eps)
  np.testing.assert_allclose(schedule_lib.eps_to_x0(s, xt, eps, t), x0, atol=2e-3)
  np.testing.assert_allclose(schedule_lib.x0_to_eps(s, xt, x0, t), eps, atol=2e-3)


def test_conversions_broadcast_timesteps_like_the_callers():
  """t of shape [1, K] against [R, K, H, W, C] (the scorer's layout) and a scalar t (the sampler)
  give exactly the hand-broadcast formulas with the schedule's gathered coefficients."""
  s = schedule_lib.make_schedule('cosine', 1000)
  ts = schedule_lib.scorer_timesteps(1000, 5)
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (2, 5, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  a, sig = schedule_lib.coefficients(s, ts)
  np.testing.assert_array_equal(a, np.asarray(s.sqrt_alphas_cumprod)[ts])
  a, sig = a[:, None, None, None], sig[:, None, None, None]
  xt = schedule_lib.q_sample(s, x0, ts[None], eps)
  np.testing.assert_array_equal(xt, a * x0 + sig * eps)
  np.testing.assert_array_equal(schedule_lib.eps_to_x0(s, xt, eps, ts[None]), (xt - sig * eps) / a)
  np.testing.assert_array_equal(schedule_lib.x0_to_eps(s, xt, x0, ts[None]), (xt - a * x0) / sig)
  t = jnp.int32(700)
  np.testing.assert_array_equal(schedule_lib.eps_to_x0(s, x0[0], eps[0], t),
                                (x0[0] - s.sigmas[700] * eps[0]) / s.sqrt_alphas_cumprod[700])


def test_bad_schedule_name():
  with pytest.raises(ValueError, match='Unknown schedule'):
    schedule_lib.make_schedule('quadratic', 100)
  with pytest.raises(ValueError):
    schedule_lib.make_schedule('cosine', 1)


def test_scorer_timesteps():
  np.testing.assert_array_equal(schedule_lib.scorer_timesteps(4000, 10),
                                [0, 400, 800, 1200, 1600, 2000, 2400, 2800, 3200, 3600])
  assert schedule_lib.scorer_timesteps(4000, 10).dtype == np.int32
  with pytest.raises(ValueError):
    schedule_lib.scorer_timesteps(100, 0)
