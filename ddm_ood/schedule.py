"""VP / DDPM noise schedules and the conversions between x_t, eps and x0.

Timesteps are integer indices ``t`` in ``[0, T)``; ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``,
``sigma_t = sqrt(1 - alphas_cumprod[t])``. Everything here is pure ``jnp`` and jit-safe.

The conversions take timesteps ``t`` of any shape that is a prefix of the data's shape: a scalar,
``[B]`` against ``[B, H, W, C]``, or ``[1, K]`` against ``[R, K, H, W, C]``. The Stein score is
``-eps / sigma_t`` (docs/method.md); the scorer works in eps space.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('cosine', 'linear')


class Schedule(NamedTuple):
  """Per-timestep diffusion coefficients, each a float32 array of shape [T]."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sigmas: jax.Array  # sqrt(1 - alphas_cumprod)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule, betas clipped at ``max_beta``. Returns float64 [T]."""
  def abar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  a1 = np.array([abar(u / num_timesteps) for u in t])
  a2 = np.array([abar((u + 1) / num_timesteps) for u in t])
  return np.minimum(1 - a2 / a1, max_beta)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Ho et al. linear schedule, rescaled so that T = 1000 gives 1e-4 .. 0.02. Float64 [T]."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def make_schedule(kind: str = 'cosine', num_timesteps: int = 1000) -> Schedule:
  """Builds a schedule.

  Args:
    kind: 'cosine' or 'linear'.
    num_timesteps: T, the number of discrete timesteps (>= 2).

  Returns:
    A `Schedule` of float32 arrays of shape [T].
  """
  if num_timesteps < 2:
    raise ValueError(f'num_timesteps must be >= 2, got {num_timesteps}.')
  if kind == 'cosine':
    betas = cosine_betas(num_timesteps)
  elif kind == 'linear':
    betas = linear_betas(num_timesteps)
  else:
    raise ValueError(f'Unknown schedule {kind!r}; choose one of {SCHEDULES} '
                     '(config.diffusion.schedule).')
  abar = np.cumprod(1.0 - betas)
  return Schedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas_cumprod=jnp.asarray(abar, jnp.float32),
      sqrt_alphas_cumprod=jnp.asarray(np.sqrt(abar), jnp.float32),
      sigmas=jnp.asarray(np.sqrt(1.0 - abar), jnp.float32))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-example coefficients [B] (or a scalar) to broadcast against x [B, ...]."""
  v = jnp.asarray(v, x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def coefficients(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (sqrt(abar_t), sigma_t) gathered at integer timesteps ``t`` (any shape)."""
  return schedule.sqrt_alphas_cumprod[t], schedule.sigmas[t]


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, sigma_t^2 I).

  Args:
    schedule: the diffusion schedule.
    x0: clean images [B, H, W, C].
    t: integer timesteps [B] (or a scalar).
    eps: standard normal noise [B, H, W, C].

  Returns:
    x_t [B, H, W, C].
  """
  a, s = coefficients(schedule, t)
  return _bcast(a, x0) * x0 + _bcast(s, x0) * eps


def eps_to_x0(schedule: Schedule, x_t: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """Denoised estimate x0hat = (x_t - sigma_t eps) / sqrt(abar_t); shapes [B, ...]."""
  a, s = coefficients(schedule, t)
  return (x_t - _bcast(s, x_t) * eps) / _bcast(a, x_t)


def x0_to_eps(schedule: Schedule, x_t: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
  """Noise consistent with (x_t, x0): eps = (x_t - sqrt(abar_t) x0) / sigma_t; shapes [B, ...]."""
  a, s = coefficients(schedule, t)
  return (x_t - _bcast(a, x_t) * x0) / _bcast(s, x_t)


def scorer_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """DiffPath's evenly spaced trajectory timesteps t_k = k * T // K, k = 0..K-1 (int32 [K])."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'scorer.num_steps must be in [1, {num_timesteps}], got {num_steps}.')
  return (np.arange(num_steps) * num_timesteps // num_steps).astype(np.int32)
