"""VP / DDPM noise schedules and the conversions between x_t, eps and x0.

Timesteps are integer indices ``t`` in ``[0, T)``; ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``,
``sigma_t = sqrt(1 - alphas_cumprod[t])``. Everything here is pure ``jnp`` and jit-safe.

The conversions take timesteps ``t`` of any shape that is a prefix of the data's shape: a scalar,
``[B]`` against ``[B, H, W, C]``, or ``[1, K]`` against ``[R, K, H, W, C]``. The Stein score is
``-eps / sigma_t`` (docs/method.md); the scorer works in eps space.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


def _diffusers_linear(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _diffusers_scaled_linear(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


@dataclasses.dataclass(frozen=True)
class ScheduleDef:
  """One named beta schedule of `SCHEDULE_REGISTRY` (``config.diffusion.schedule``).

  Attributes:
    betas: ``(num_timesteps, beta_start, beta_end) -> float64 [T]``.
    float32_tables: the official code keeps betas and alphas = 1 - betas in float32 (diffusers'
      schedulers); they are rounded the same way here, so that ``alphas_cumprod`` equals theirs
      (to 6e-8 instead of 5e-7).
    uses_beta_range: whether ``config.diffusion.beta_start`` / ``beta_end`` matter.
    doc: one line for error messages and the README.
  """
  betas: Callable[[int, float, float], np.ndarray]
  float32_tables: bool
  uses_beta_range: bool
  doc: str


# The one place to add a schedule; config checks and errors list these names.
SCHEDULE_REGISTRY: dict[str, ScheduleDef] = {
    'cosine': ScheduleDef(lambda t, b0, b1: cosine_betas(t), False, False,
                          'Nichol & Dhariwal cosine (improved/guided-diffusion), float64'),
    'linear': ScheduleDef(linear_betas, False, True,
                          'Ho et al. linear, beta_start..beta_end scaled by 1000 / T '
                          '(improved/guided-diffusion), float64'),
    'diffusers_linear': ScheduleDef(_diffusers_linear, True, True,
                                    "diffusers 'linear': beta_start..beta_end, float32"),
    'diffusers_scaled_linear': ScheduleDef(
        _diffusers_scaled_linear, True, True,
        "diffusers 'scaled_linear': (linspace(sqrt(beta_start), sqrt(beta_end)))^2, float32"),
    'diffusers_squaredcos_cap_v2': ScheduleDef(lambda t, b0, b1: cosine_betas(t), True, False,
                                               "diffusers 'squaredcos_cap_v2' (cosine), float32"),
}
SCHEDULES = tuple(SCHEDULE_REGISTRY)


def make_schedule(kind: str = 'cosine', num_timesteps: int = 1000, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
  """Builds a schedule.

  Args:
    kind: a name of `SCHEDULE_REGISTRY` ('cosine', 'linear', 'diffusers_linear', ...).
    num_timesteps: T, the number of discrete timesteps (>= 2).
    beta_start: first beta of the linear schedules (``config.diffusion.beta_start``).
    beta_end: last beta of the linear schedules (``config.diffusion.beta_end``).

  Returns:
    A `Schedule` of float32 arrays of shape [T].
  """
  if num_timesteps < 2:
    raise ValueError(f'num_timesteps must be >= 2, got {num_timesteps}.')
  if kind not in SCHEDULE_REGISTRY:
    raise ValueError(f'Unknown schedule {kind!r}; choose one of {SCHEDULES} '
                     '(config.diffusion.schedule).')
  definition = SCHEDULE_REGISTRY[kind]
  betas = np.asarray(definition.betas(num_timesteps, float(beta_start), float(beta_end)),
                     np.float64)
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f'Schedule {kind!r} with beta_start={beta_start}, beta_end={beta_end} gives '
                     'betas outside (0, 1); fix config.diffusion.beta_start / beta_end.')
  if definition.float32_tables:
    betas = betas.astype(np.float32).astype(np.float64)
    abar = np.cumprod((np.float32(1) - betas.astype(np.float32)).astype(np.float64))
  else:
    abar = np.cumprod(1.0 - betas)
  return Schedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas_cumprod=jnp.asarray(abar, jnp.float32),
      sqrt_alphas_cumprod=jnp.asarray(np.sqrt(abar), jnp.float32),
      sigmas=jnp.asarray(np.sqrt(1.0 - abar), jnp.float32))


def schedule_for(diffusion_cfg: Any) -> Schedule:
  """The schedule of ``config.diffusion`` (schedule, num_timesteps, beta_start, beta_end)."""
  from ddm_ood import settings  # pylint: disable=g-import-not-at-top
  d = settings.section(diffusion_cfg, 'diffusion')
  return make_schedule(d['schedule'], int(d['num_timesteps']), beta_start=float(d['beta_start']),
                       beta_end=float(d['beta_end']))


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


PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


def check_prediction_type(name: str) -> str:
  """``name`` if it is one of `PREDICTION_TYPES`, else a ValueError naming the field."""
  if name not in PREDICTION_TYPES:
    raise ValueError(f'Unknown config.model.prediction_type {name!r}; choose one of '
                     f'{PREDICTION_TYPES}.')
  return name


def prediction_to_eps(schedule: Schedule, out: jax.Array, x_t: jax.Array, t: jax.Array,
                      prediction_type: str) -> jax.Array:
  """eps from a network that predicts ``prediction_type`` (diffusers' names); shapes [B, ...].

  'epsilon': ``out`` itself; 'v_prediction' (v = sqrt(abar) eps - sigma x0):
  ``eps = sqrt(abar) v + sigma x_t``; 'sample' (x0): `x0_to_eps`, as diffusers' schedulers do.
  """
  if prediction_type == 'epsilon':
    return out
  if prediction_type == 'v_prediction':
    a, s = coefficients(schedule, t)
    return _bcast(a, x_t) * out + _bcast(s, x_t) * x_t
  if prediction_type == 'sample':
    return x0_to_eps(schedule, x_t, out, t)
  raise ValueError(f'Unknown prediction type {prediction_type!r}; choose one of '
                   f'{PREDICTION_TYPES} (config.model.prediction_type).')


def scorer_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """DiffPath's evenly spaced trajectory timesteps t_k = k * T // K, k = 0..K-1 (int32 [K])."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'scorer.num_steps must be in [1, {num_timesteps}], got {num_steps}.')
  return (np.arange(num_steps) * num_timesteps // num_steps).astype(np.int32)
