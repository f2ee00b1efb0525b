"""DDIM sampling from an eps-prediction network, and image grids for looking at samples."""

from __future__ import annotations

import io
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import schedule as schedule_lib
from ddm_ood import workdir as workdir_lib

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced timesteps from 0 to T - 1 inclusive (int32 [num_steps], ascending)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'DDIM num_steps must be in [1, {num_timesteps}], got {num_steps}.')
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def ddim_sample(apply_fn: ApplyFn, params: Any, schedule: schedule_lib.Schedule, key: jax.Array,
                shape: tuple[int, int, int, int], num_steps: int, eta: float = 0.0) -> jax.Array:
  """Draws images with DDIM (Song et al. 2021) in one `jax.lax.scan`; jittable.

  Starts from x_{T-1} ~ N(0, I) and walks ``num_steps`` evenly spaced timesteps down to t = 0,
  each step predicting x0 (clipped to [-1, 1]) and re-deriving eps from the clipped x0.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C]`` (eval mode).
    params: network parameters (e.g. the EMA parameters).
    schedule: the diffusion schedule the network was trained with.
    key: a `jax.random.key`.
    shape: (B, H, W, C) of the output.
    num_steps: number of network evaluations (<= T).
    eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.

  Returns:
    Images [B, H, W, C] float32 in [-1, 1].
  """
  ts = ddim_timesteps(schedule.num_timesteps, num_steps)[::-1].copy()
  abar = schedule.alphas_cumprod
  abar_t = abar[ts]
  abar_prev = jnp.concatenate([abar[ts[1:]], jnp.ones((1,), abar.dtype)])
  key_init, key_steps = jax.random.split(key)
  x_init = jax.random.normal(key_init, shape, jnp.float32)
  step_keys = jax.random.split(key_steps, len(ts))

  def body(x, inputs):
    t, a_t, a_prev, k = inputs
    eps = apply_fn(params, x, jnp.full((shape[0],), t, jnp.int32))
    x0 = jnp.clip(schedule_lib.eps_to_x0(schedule, x, eps, t), -1.0, 1.0)
    eps = schedule_lib.x0_to_eps(schedule, x, x0, t)
    noise_std = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    dir_std = jnp.sqrt(jnp.maximum(1.0 - a_prev - noise_std ** 2, 0.0))
    x_prev = jnp.sqrt(a_prev) * x0 + dir_std * eps
    x_prev = x_prev + noise_std * jax.random.normal(k, shape, jnp.float32)
    return x_prev, None

  x, _ = jax.lax.scan(body, x_init, (jnp.asarray(ts), abar_t, abar_prev, step_keys))
  return jnp.clip(x, -1.0, 1.0)


def images_to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] (any shape) to uint8 [0, 255]."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles images [N, H, W, C] in [-1, 1] into one uint8 image [rows*(H+pad)+pad, ..., C]."""
  images = images_to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f'Expected images [N, H, W, C], got shape {images.shape}.')
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_image_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
  """Writes images [N, H, W, C] (C = 1 or 3) in [-1, 1] as one PNG grid; returns ``path``."""
  from PIL import Image
  grid = make_grid(np.asarray(images), ncols)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format='PNG')
  workdir_lib.atomic_write(path, buf.getvalue())
  return path


__all__ = ['ddim_timesteps', 'ddim_sample', 'images_to_uint8', 'make_grid', 'save_image_grid']
