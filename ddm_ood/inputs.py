"""Checks of the array inputs of the pure core, shared so that every entry point says the same.

They run at trace time on shapes and dtypes only (values cannot be checked under jit; see
`scorer.validate_images` for the host-side check of values), and each error says what to do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def image_batch(x: jax.Array, who: str = 'Images') -> jax.Array:
  """``x`` as float32 [B, H, W, C]; ValueError for another rank or a non-float dtype."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f'{who}: images must have shape [B, H, W, C], got shape {x.shape}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{who}: images must be float in [-1, 1], got dtype {x.dtype}; convert '
                     'with x.astype(jnp.float32) / 127.5 - 1.')
  return x.astype(jnp.float32)


def index_batch(v: jax.Array, batch: int, name: str, who: str = 'Images') -> jax.Array:
  """``v`` as int32 [batch] (image ids, timesteps); ValueError for another shape or dtype."""
  v = jnp.asarray(v)
  if v.shape != (batch,) or not jnp.issubdtype(v.dtype, jnp.integer):
    raise ValueError(f'{who}: {name} must be integers of shape [B]=[{batch}], got '
                     f'{v.dtype}{v.shape}.')
  return v.astype(jnp.int32)


__all__ = ['image_batch', 'index_batch']
