"""The network families and `build_model`; the ADM (improved/guided-diffusion) UNet in flax.linen.

Every network is built by `build_model(config)`, which picks the family of ``config.model.family``
from `FAMILIES` (the one place to add a family; `config_checks` derives the allowed values from
it): 'adm' is `UNet` below (ddm_ood's own, trainable; exactly improved-diffusion's and
guided-diffusion's ``UNetModel`` with the ADM-compatibility fields), 'diffusers_unet2d' is
`ddm_ood.diffusers_unet2d.DiffusersUNet2D` (Hugging Face diffusers' ``UNet2DModel``). A network
that predicts v or x0 (``config.model.prediction_type``) is wrapped so that it returns eps.

Pure-functional use::

  model = build_model(config)             # or UNet(channels=3, ch=128, ch_mult=(1, 2, 2, 2), ...)
  params = model.init(key, x, t)          # x: [B, H, W, C] float, t: [B] integer timesteps
  eps = model.apply(params, x, t)          # eval mode: deterministic
  eps = model.apply(params, x, t, train=True, rngs={'dropout': key})

GroupNorm only (no BatchNorm): a sample's output never depends on the rest of its batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddm_ood import diffusers_unet2d
from ddm_ood import network
from ddm_ood import schedule as schedule_lib
from ddm_ood import settings
from ddm_ood.layers import check_image_input
from ddm_ood.layers import COMPUTE_DTYPES  # noqa: F401  (public here too)
from ddm_ood.layers import GroupNorm
from ddm_ood.layers import NetworkFamily
from ddm_ood.layers import resample
from ddm_ood.layers import resolve_compute_dtype
from ddm_ood.layers import timestep_embedding


_zero_init = nn.initializers.zeros

# Padding of the stride-2 downsampling conv, by config.model.downsample_padding.
DOWNSAMPLE_PADDINGS = {'same': 'SAME', 'symmetric': ((1, 1), (1, 1))}


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv residual block with a scale-shift timestep modulation.

  ``updown`` 'down' / 'up' resamples after the first GroupNorm-SiLU, on both the branch and the
  skip (guided-diffusion's ``resblock_updown``).
  """
  out_ch: int
  dropout: float
  num_groups: int
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  updown: str = ''

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                             name='norm1')(x))
    h, x = resample(h, self.updown), resample(x, self.updown)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv1')(h)
    scale_shift = nn.Dense(2 * self.out_ch, dtype=self.dtype,
                           name='emb')(nn.silu(emb))[:, None, None, :]
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                     name='norm2')(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=_zero_init, dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='skip')(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the spatial positions, residual, zero-initialised output.

  The qkv Dense's columns are [q (all heads), k, v], each head's channels contiguous
  (guided-diffusion's ``use_new_attention_order``); legacy checkpoints are permuted on import.
  """
  num_heads: int
  num_groups: int
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  num_head_channels: int = 0  # > 0: heads = width // num_head_channels (num_heads ignored)
  attention: str = 'xla'

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if self.num_head_channels > 0:
      if c % self.num_head_channels:
        raise ValueError(f'Attention width {c} is not divisible by model.num_head_channels='
                         f'{self.num_head_channels}.')
      heads = c // self.num_head_channels
    else:
      heads = self.num_heads
    if c % heads:
      raise ValueError(f'Attention width {c} is not divisible by num_heads={heads}.')
    y = GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                     name='norm')(x).reshape(b, h * w, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(y).reshape(b, h * w, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = network.dot_product_attention(q, k, v, self.attention).reshape(b, h * w, c)
    y = nn.Dense(c, kernel_init=_zero_init, dtype=self.dtype, name='proj')(y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """eps_theta(x_t, t): the ADM UNet (family 'adm').

  Attributes:
    channels: image channels (1 or 3); the output has the same shape as the input.
    ch: base width (improved/guided-diffusion's ``num_channels``).
    ch_mult: width multiplier per resolution level (widths ``int(ch * mult)``; guided-diffusion's
      512x512 model starts at 0.5); len(ch_mult) - 1 downsamplings. The input conv has width
      ``int(ch * ch_mult[0])``.
    num_res_blocks: residual blocks per level.
    attn_resolutions: spatial sizes (height) at which self-attention is applied.
    num_heads: attention heads.
    dropout: dropout rate inside residual blocks (active only with train=True).
    num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon (flax's 1e-6; PyTorch / improved-diffusion use 1e-5).
    learn_sigma: the last conv has 2 * channels outputs (improved-diffusion's learned variance,
      [eps, v]); only eps, the first ``channels``, is returned.
    downsample_padding: 'same' (flax: a stride-2 3x3 conv pads (0, 1)) or 'symmetric' (pads
      (1, 1), as PyTorch's ``padding=1`` in improved-diffusion).
    timestep_scale: the network embeds t * timestep_scale (improved-diffusion's
      ``rescale_timesteps``: 1000 / T); 1.0 embeds the integer timestep as is.
    resblock_updown: residual blocks with average-pool / nearest resampling replace the
      downsampling conv and the upsampling conv (guided-diffusion).
    num_head_channels: > 0: each attention block has width // num_head_channels heads
      (guided-diffusion); 0: ``num_heads`` heads everywhere.
    dtype: compute dtype of activations (`resolve_compute_dtype`); parameters stay float32,
      GroupNorm statistics are float32 (flax computes them in at least float32) and the output
      is cast to float32.
    attention: 'xla' or 'cudnn' (`network.resolve_attention`); the parameters do not depend on it.
  """
  channels: int = 3
  ch: int = 128
  ch_mult: Sequence[float] = (1, 2, 2, 2)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  num_heads: int = 4
  dropout: float = 0.0
  num_groups: int = 32
  norm_eps: float = 1e-6
  learn_sigma: bool = False
  downsample_padding: str = 'same'
  timestep_scale: float = 1.0
  resblock_updown: bool = False
  num_head_channels: int = 0
  dtype: Any = jnp.float32
  attention: str = 'xla'

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def check_input(self, x: jax.Array, t: jax.Array) -> None:
    """Raises ValueError with a remedy when x [B, H, W, C] / t [B] do not fit this network."""
    check_image_input(x, t, self.channels, self.downsample_factor,
                      f'ch_mult={tuple(self.ch_mult)}', 'config.model.ch_mult')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    """Predicts the noise eps [B, H, W, C] of x_t [B, H, W, C] at timesteps t [B]."""
    self.check_input(x, t)
    if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
      raise ValueError(f'downsample_padding must be one of {tuple(DOWNSAMPLE_PADDINGS)}, got '
                       f'{self.downsample_padding!r} (config.model.downsample_padding).')
    emb_dim = 4 * self.ch
    if self.timestep_scale != 1.0:
      t = jnp.asarray(t, jnp.float32) * jnp.float32(self.timestep_scale)
    emb = timestep_embedding(t, self.ch)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='temb_dense0')(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='temb_dense1')(nn.silu(emb))

    res_kw = dict(dropout=self.dropout, num_groups=self.num_groups, norm_eps=self.norm_eps,
                  dtype=self.dtype)
    attn_kw = dict(num_heads=self.num_heads, num_groups=self.num_groups, norm_eps=self.norm_eps,
                   dtype=self.dtype, num_head_channels=self.num_head_channels,
                   attention=self.attention)
    width = lambda mult: int(mult * self.ch)  # noqa: E731  (guided-diffusion's int(mult * ch))
    h = nn.Conv(width(self.ch_mult[0]), (3, 3), dtype=self.dtype, name='conv_in')(x)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(width(mult), name=f'down_{level}_res_{i}', **res_kw)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(name=f'down_{level}_attn_{i}', **attn_kw)(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        if self.resblock_updown:
          h = ResBlock(h.shape[-1], updown='down', name=f'down_{level}_downsample',
                       **res_kw)(h, emb, train)
        else:
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2),
                      padding=DOWNSAMPLE_PADDINGS[self.downsample_padding], dtype=self.dtype,
                      name=f'down_{level}_downsample')(h)
        skips.append(h)

    h = ResBlock(h.shape[-1], name='mid_res_0', **res_kw)(h, emb, train)
    h = AttnBlock(name='mid_attn', **attn_kw)(h)
    h = ResBlock(h.shape[-1], name='mid_res_1', **res_kw)(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(width(mult), name=f'up_{level}_res_{i}', **res_kw)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(name=f'up_{level}_attn_{i}', **attn_kw)(h)
      if level != 0:
        if self.resblock_updown:
          h = ResBlock(h.shape[-1], updown='up', name=f'up_{level}_upsample',
                       **res_kw)(h, emb, train)
        else:
          h = resample(h, 'up')
          h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=f'up_{level}_upsample')(h)
    assert not skips

    h = nn.silu(GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                             name='norm_out')(h))
    out_ch = 2 * self.channels if self.learn_sigma else self.channels
    out = nn.Conv(out_ch, (3, 3), kernel_init=_zero_init, dtype=self.dtype, name='conv_out')(h)
    out = out.astype(jnp.float32)
    return out[..., :self.channels] if self.learn_sigma else out


class EpsFromPrediction(nn.Module):
  """Wraps a network that predicts v or x0 so that it returns eps (``model.prediction_type``).

  The wrapped network keeps its own parameter tree (``nn.share_scope``); the conversion is
  `schedule.prediction_to_eps` with the run's schedule.

  Attributes:
    net: the family's network.
    prediction_type: 'v_prediction' or 'sample'.
    diffusion: ``(schedule, num_timesteps, beta_start, beta_end)`` of ``config.diffusion``.
  """
  net: nn.Module
  prediction_type: str
  diffusion: tuple

  def setup(self):
    nn.share_scope(self, self.net)

  @property
  def channels(self) -> int:
    return self.net.channels

  @property
  def dtype(self) -> Any:
    return self.net.dtype

  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    """eps [B, H, W, C] of x_t [B, H, W, C] at timesteps t [B]."""
    name, num_timesteps, beta_start, beta_end = self.diffusion
    sched = schedule_lib.make_schedule(name, num_timesteps, beta_start=beta_start,
                                       beta_end=beta_end)
    out = self.net(x, t, train)
    return schedule_lib.prediction_to_eps(sched, out, x.astype(jnp.float32), t,
                                          self.prediction_type)


def _build_adm(config: ml_collections.ConfigDict, dtype: Any, attention: str) -> UNet:
  m = settings.section(config.model, 'model')
  scale = 1000.0 / config.diffusion.num_timesteps if m['rescale_timesteps'] else 1.0
  return UNet(channels=config.data.channels, ch=m['ch'], ch_mult=tuple(m['ch_mult']),
              num_res_blocks=m['num_res_blocks'], attn_resolutions=tuple(m['attn_resolutions']),
              num_heads=m['num_heads'], dropout=m['dropout'], num_groups=m['num_groups'],
              norm_eps=m['norm_eps'], learn_sigma=m['learn_sigma'],
              downsample_padding=m['downsample_padding'], timestep_scale=scale,
              resblock_updown=bool(m['resblock_updown']),
              num_head_channels=int(m['num_head_channels']), dtype=dtype,
              attention=attention)


def _adm_memory_shape(config: ml_collections.ConfigDict) -> dict:
  m = settings.section(config.model, 'model')
  return dict(ch=m['ch'], ch_mult=tuple(m['ch_mult']), num_res_blocks=m['num_res_blocks'],
              attn_resolutions=tuple(m['attn_resolutions']), num_heads=m['num_heads'],
              num_head_channels=int(m['num_head_channels']))


# The network families by config.model.family: the one place to add one (a module with a flax
# network and its NetworkFamily record, plus an importer in ddm_ood/importers for its weights).
FAMILIES: dict[str, NetworkFamily] = {
    'adm': NetworkFamily('adm', _build_adm, _adm_memory_shape,
                         "ddm_ood's UNet = improved-diffusion / guided-diffusion UNetModel"),
    diffusers_unet2d.FAMILY.name: diffusers_unet2d.FAMILY,
}
FAMILY_NAMES = tuple(FAMILIES)


def family(config: ml_collections.ConfigDict) -> NetworkFamily:
  """The `NetworkFamily` of ``config.model.family`` (ValueError naming the choices)."""
  name = settings.section(config.model, 'model')['family']
  if name not in FAMILIES:
    raise ValueError(f'Unknown config.model.family {name!r}; choose one of {FAMILY_NAMES}.')
  return FAMILIES[name]


def build_model(config: ml_collections.ConfigDict) -> network.Network:
  """Builds the network of ``config.model`` (its ``family``) for ``config.data.channels`` channels.

  ``config.diffusion.num_timesteps`` sets the ADM timestep scale when ``model.rescale_timesteps``;
  ``model.compute_dtype`` is resolved for the default backend (`resolve_compute_dtype`); a
  ``model.prediction_type`` other than 'epsilon' wraps the network in `EpsFromPrediction`.
  Fields missing from an older workdir's config.json take their defaults.

  Returns:
    The family's flax module in `network.Network`: ``apply(params, x [B, H, W, C], t [B] int,
    train=False) -> eps`` and ``init`` at ``model.precision`` (every matmul and convolution of
    any family); every other attribute (``channels``, ``dtype``, ...) is the module's.
  """
  m = settings.section(config.model, 'model')
  if config.data.channels not in (1, 3):
    raise ValueError(f'config.data.channels must be 1 or 3, got {config.data.channels}.')
  backend = jax.default_backend()
  dtype = resolve_compute_dtype(m['compute_dtype'], backend)
  net = family(config).build(config, dtype,
                             network.resolve_attention(m['attention'], backend, dtype))
  if m['prediction_type'] != 'epsilon':
    schedule_lib.check_prediction_type(m['prediction_type'])
    d = settings.section(config.diffusion, 'diffusion')
    net = EpsFromPrediction(net, m['prediction_type'], (
        d['schedule'], int(d['num_timesteps']), float(d['beta_start']), float(d['beta_end'])))
  return network.Network(net, m['precision'])


def init_params(model: nn.Module, key: jax.Array, image_size: int):
  """Initialises parameters for [1, image_size, image_size, channels] inputs."""
  x = jnp.zeros((1, image_size, image_size, model.channels), jnp.float32)
  return model.init(key, x, jnp.zeros((1,), jnp.int32))


def param_count(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
