"""The two trajectories the scorer reads: forward noising and DiffPath's DDIM inversion.

Both return a `Trajectory` of ONE image over the grid timesteps ``ts`` (the scorer vmaps over
images); the diffusion coefficients come from `ddm_ood.schedule` (the one owner of the diffusion
math), except the float64-rounded DDIM coefficients of DiffPath's code (`ddim_coefficients`).
Forward noise is keyed by ``fold_in(fold_in(key, image_id), r)`` (and the timestep for
``noise='independent'``), never by the batch position. On the DDIM path ``eps_theta`` holds
DiffPath's eps re-derived from the clipped x0hat (docs/method.md, "Trajectories").
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import schedule as schedule_lib

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
  """States of one image along a trajectory; R draws (1 for ddim) x K timesteps.

  Attributes:
    x_t: noisy states [R, K, H, W, C].
    eps_theta: network outputs eps_theta(x_t, t_k) [R, K, H, W, C].
    eps_target: the true noise of each state [R, K, H, W, C].
    sqrt_abar: sqrt(abar_{t_k}) [K].
    sigma: sigma_{t_k} [K].
  """
  x_t: jax.Array
  eps_theta: jax.Array
  eps_target: jax.Array
  sqrt_abar: jax.Array
  sigma: jax.Array


def window(traj: Trajectory, k0: int) -> Trajectory:
  """The trajectory from grid index k0 on (the timestep window ``t_k >= t_min``)."""
  if k0 == 0:
    return traj
  return Trajectory(traj.x_t[:, k0:], traj.eps_theta[:, k0:], traj.eps_target[:, k0:],
                    traj.sqrt_abar[k0:], traj.sigma[k0:])


def timestep_axis(v: jax.Array) -> jax.Array:
  """[K] -> [K, 1, 1, 1] to broadcast against [..., K, H, W, C]."""
  return v[:, None, None, None]


def ddim_coefficients(schedule: schedule_lib.Schedule, ts: np.ndarray):
  """DiffPath's float32 DDIM coefficients at the grid ts: r, c, sqrt(abar_next), sigma_next [K].

  ``r = 1 / sqrt(abar)`` and ``c = sqrt(1 / abar - 1)`` are rounded from float64 (abar from the
  cumulative product of the betas in float64), and the next state's ``sqrt(abar_next)``,
  ``sqrt(1 - abar_next)`` are computed from float32 ``abar_next`` in float32, with ``abar_next = 0``
  after the last step, all as improved-diffusion does. At t = 0, ``r - 1 ~ 5e-6`` is a few float32
  ulps, and eps'_0 at a clipped pixel is ``(r - 1) / c``: rounding r any other way moves it by
  ~4e-5. A traced schedule (no concrete betas) falls back to float32 arithmetic.
  """
  try:
    betas = np.asarray(schedule.betas, np.float64)
  except jax.errors.TracerArrayConversionError:
    a, s = schedule_lib.coefficients(schedule, ts)
    return 1.0 / a, s / a, jnp.append(a[1:], 0.0), jnp.append(s[1:], 1.0)
  abar = np.cumprod(1.0 - betas)[ts]
  abar_next = np.append(abar[1:], 0.0).astype(np.float32)
  return (np.sqrt(1.0 / abar).astype(np.float32), np.sqrt(1.0 / abar - 1).astype(np.float32),
          np.sqrt(abar_next), np.sqrt(np.float32(1) - abar_next))


def forward_trajectory(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, ts: np.ndarray,
                       noise: str, num_draws: int, params, x0: jax.Array,
                       image_id: jax.Array, key: jax.Array) -> Trajectory:
  """Forward-noised states of ONE image at all K timesteps and R draws, one network call.

  Args:
    apply_fn: eval-mode network ``(params, x [N, H, W, C], t [N] int32) -> eps [N, H, W, C]``.
    schedule: diffusion schedule.
    ts: timesteps int32 [K] (static).
    noise: 'shared' or 'independent'.
    num_draws: R.
    params: network parameters.
    x0: one image [H, W, C] float32.
    image_id: scalar int32 id that seeds the noise.
    key: PRNG key (typed or raw).

  Returns:
    A `Trajectory` with arrays [R, K, H, W, C].
  """
  k_steps = len(ts)
  key_img = jax.random.fold_in(key, image_id)

  def draw(r):
    key_r = jax.random.fold_in(key_img, r)
    if noise == 'shared':
      eps = jax.random.normal(key_r, x0.shape, jnp.float32)
      return jnp.broadcast_to(eps, (k_steps,) + x0.shape)
    return jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(key_r, t), x0.shape,
                                                jnp.float32))(jnp.asarray(ts, jnp.int32))

  eps = jax.vmap(draw)(jnp.arange(num_draws))                   # [R, K, H, W, C]
  a, s = schedule_lib.coefficients(schedule, ts)
  x_t = schedule_lib.q_sample(schedule, jnp.broadcast_to(x0, eps.shape), ts[None], eps)
  t_flat = jnp.tile(jnp.asarray(ts, jnp.int32), num_draws)      # [R*K], r-major
  eps_theta = apply_fn(params, x_t.reshape((-1,) + x0.shape), t_flat)
  eps_theta = jnp.asarray(eps_theta, jnp.float32).reshape(x_t.shape)
  return Trajectory(x_t, eps_theta, eps, a, s)


def ddim_trajectory(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, ts: np.ndarray,
                    params, x0: jax.Array) -> Trajectory:
  """DiffPath's deterministic DDIM inversion of ONE image from x_{t_0} = x0, as a lax.scan.

  Step k is DiffPath's ``ddim_reverse_sample`` (``clip_denoised=True``) with its float32
  coefficients (`ddim_coefficients`) and order of operations, ``r_k = 1 / sqrt(abar_k)``,
  ``c_k = sqrt(1 / abar_k - 1)``:
  ``x0hat_k = clip(r_k x_k - c_k eps_theta(x_k, t_k), -1, 1)``, ``eps'_k = (r_k x_k - x0hat_k) / c_k``
  and ``x_{k+1} = sqrt(abar_{k+1}) x0hat_k + sigma_{k+1} eps'_k``.

  Args:
    apply_fn: eval-mode network.
    schedule: diffusion schedule.
    ts: timesteps int32 [K] (static).
    params: network parameters.
    x0: one image [H, W, C] float32.

  Returns:
    A `Trajectory` with arrays [1, K, H, W, C] whose ``eps_theta`` is DiffPath's eps'_k (re-derived
    from the clipped x0hat; it differs from the raw network output wherever clipping is active:
    t = 0 and saturated pixels); eps_target_k = (x_k - sqrt(abar_k) x0) / sigma_k.
  """
  a, s = schedule_lib.coefficients(schedule, ts)
  r, c, a_next, s_next = ddim_coefficients(schedule, ts)

  def step(x, inp):
    t, r_k, c_k, a_n, s_n = inp
    eps = jnp.asarray(apply_fn(params, x[None], t[None]), jnp.float32)[0]
    x0hat = jnp.clip(r_k * x - c_k * eps, -1.0, 1.0)
    eps_clipped = (r_k * x - x0hat) / c_k
    return x0hat * a_n + s_n * eps_clipped, (x, eps_clipped)

  _, (x_t, eps_path) = jax.lax.scan(
      step, x0, (jnp.asarray(ts, jnp.int32), r, c, a_next, s_next))
  eps_target = schedule_lib.x0_to_eps(schedule, x_t, x0, ts)
  return Trajectory(x_t[None], eps_path[None], eps_target[None], a, s)


def denoised_estimate(traj: Trajectory) -> jax.Array:
  """x0hat_k = clip((x_k - sigma_k eps_theta_k) / sqrt(abar_k), -1, 1), [R, K, H, W, C]."""
  a, s = timestep_axis(traj.sqrt_abar), timestep_axis(traj.sigma)
  return jnp.clip((traj.x_t - s * traj.eps_theta) / a, -1, 1)


__all__ = ['ApplyFn', 'Trajectory', 'window', 'timestep_axis', 'ddim_coefficients',
           'forward_trajectory', 'ddim_trajectory', 'denoised_estimate']
