"""Pieces shared by the network families (`ddm_ood.unet.FAMILIES`): GroupNorm, the family record,
activations and the compute dtype.

A family is one kind of eps network (ddm_ood's ADM `unet.UNet`, diffusers' UNet2DModel, ...): a
flax module with ``apply(params, x [B, H, W, C], t [B] int, train=False) -> [B, H, W, C]`` and the
attributes ``channels`` and ``dtype``, built from ``config.model`` by the family's ``build``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddm_ood import inputs


@dataclasses.dataclass(frozen=True)
class NetworkFamily:
  """One network family of `unet.FAMILIES` (selected by ``config.model.family``).

  Attributes:
    name: the ``config.model.family`` value.
    build: ``(config, compute dtype, attention) -> flax module`` for ``config.model`` /
      ``config.data``; ``attention`` ('xla' or 'cudnn', `network.resolve_attention`) is what
      every attention layer passes to `network.dot_product_attention`.
    memory_shape: ``config -> kwargs of memory.unet_state_bytes`` (ch, ch_mult, num_res_blocks,
      attn_resolutions, num_heads, num_head_channels): the UNet shape the memory plan assumes.
    doc: one line for the README and error messages.
  """
  name: str
  build: Callable[[ml_collections.ConfigDict, Any, str], nn.Module]
  memory_shape: Callable[[ml_collections.ConfigDict], dict]
  doc: str


COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of timesteps t [B] (int or float) -> [B, dim] float32.

  diffusers' ``get_timestep_embedding`` in its operation order; the defaults (cos first, no
  frequency shift) are improved-diffusion's / guided-diffusion's ``timestep_embedding``.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def resolve_compute_dtype(name: str, backend: str) -> Any:
  """config.model.compute_dtype -> a jnp dtype: 'auto' = bfloat16 on TPU/GPU, float32 on CPU."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.model.compute_dtype={name!r} is not one of {COMPUTE_DTYPES}.')
  if name == 'auto':
    name = 'float32' if backend == 'cpu' else 'bfloat16'
  return jnp.dtype(name)


def check_image_input(x: jax.Array, t: jax.Array, channels: int, factor: int, what: str,
                      field: str) -> None:
  """The input check every family shares: x [B, H, W, C] with C = ``channels``, H and W divisible
  by the network's downsampling ``factor`` (``what`` / ``field`` name its cause), t [B]."""
  inputs.image_batch(x, 'UNet')
  if x.shape[-1] != channels:
    raise ValueError(f'UNet was built for {channels} channel(s), got {x.shape[-1]} '
                     f'(image shape {x.shape}); convert gray <-> RGB first.')
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f'Image size {x.shape[1]}x{x.shape[2]} is not divisible by the '
                     f'downsampling factor {factor} of {what}; resize the images or change '
                     f'{field}.')
  if jnp.ndim(t) != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f'Timesteps must have shape [B]=[{x.shape[0]}], got {jnp.shape(t)}.')



def resample(x: jax.Array, how: str) -> jax.Array:
  """x [B, H, W, C] halved by 2x2 average pooling ('down'), doubled by nearest neighbour ('up')."""
  if how == 'down':
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  if how == 'up':
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


# PyTorch's activations by diffusers' names (torch.nn.GELU is the exact, erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': nn.silu, 'swish': nn.silu, 'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
    'gelu': lambda x: nn.gelu(x, approximate=False), 'relu': nn.relu,
}


class GroupNorm(nn.Module):
  """GroupNorm over [B, ..., C] with the parameters of ``flax.linen.GroupNorm`` (scale, bias [C]).

  Same result as flax's (float32 statistics, E[x^2] - E[x]^2), but the statistics are per-channel
  sums over the spatial axes, combined into groups on [B, C], and the normalisation is one
  ``x * a + d`` with per-(image, channel) a, d: flax reduces the 5-D grouped view
  [B, H, W, G, C/G] and broadcasts back through it, which took half the CPU time of the UNet
  forward (issue 12; 35% less CPU time per forward with this form).

  Attributes:
    num_groups: groups; must divide the channels.
    epsilon: added to the variance.
    dtype: output dtype (None: the input's).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g = x.shape[-1], self.num_groups
    if c % g:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by num_groups={g} '
                       '(config.model.num_groups, or diffusers_unet2d.norm_num_groups, must divide '
                       'every width).')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[a] for a in axes) * (c // g)
    group = lambda v: v.reshape(x.shape[0], g, c // g).sum(-1) / n  # noqa: E731  [B, C] -> [B, G]
    mean = group(jnp.sum(xf, axes))
    var = jnp.maximum(group(jnp.sum(xf * xf, axes)) - mean * mean, 0.0)
    a = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), c // g, axis=-1) * scale   # [B, C]
    d = bias - jnp.repeat(mean, c // g, axis=-1) * a
    shape = (x.shape[0],) + (1,) * len(axes) + (c,)
    return (xf * a.reshape(shape) + d.reshape(shape)).astype(self.dtype or x.dtype)


