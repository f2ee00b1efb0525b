"""Hugging Face diffusers' ``UNet2DModel`` in flax.linen (network family 'diffusers_unet2d').

The network of a diffusers snapshot's ``config.json`` (the DDPM family: ``google/ddpm-cifar10-32``,
``google/ddpm-celebahq-256``, ``google/ddpm-{church,bedroom,cat}-256`` and their ``-ema``
variants, and community models built from the same blocks), computed as diffusers 0.42 computes it.
Its fields are ``config.model.diffusers_unet2d``, named as in ``config.json``
(`ddm_ood.default_config`); ``None`` there is 0 / '' here (``attention_head_dim`` 0: one head of
the block's full width; ``mid_block_type`` '': no mid block). `ddm_ood.importers.diffusers_snapshot`
reads snapshots into this config and refuses what this module does not compute.

Module names mirror the PyTorch names with list indices joined by '_' (``down_blocks.1.resnets.0``
-> ``down_blocks_1/resnets_0``), so that the weight map is one rule (`torch_name`).

Supported: block types `DOWN_BLOCK_TYPES` / `UP_BLOCK_TYPES`, ``mid_block_type``
'UNetMidBlock2D' or none, ``time_embedding_type`` 'positional' / 'learned',
``resnet_time_scale_shift`` 'default' / 'scale_shift', ``downsample_type`` / ``upsample_type``
'conv' / 'resnet', any ``downsample_padding``, ``act_fn`` of `layers.ACTIVATIONS`,
``out_channels`` = channels or 2 x channels (learned variance: eps is the first half).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddm_ood import network
from ddm_ood import settings
from ddm_ood.layers import ACTIVATIONS
from ddm_ood.layers import check_image_input
from ddm_ood.layers import GroupNorm
from ddm_ood.layers import NetworkFamily
from ddm_ood.layers import resample
from ddm_ood.layers import timestep_embedding

DOWN_BLOCK_TYPES = ('DownBlock2D', 'AttnDownBlock2D')
UP_BLOCK_TYPES = ('UpBlock2D', 'AttnUpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2D', '')
TIME_EMBEDDING_TYPES = ('positional', 'learned')
TIME_SCALE_SHIFTS = ('default', 'scale_shift')
RESAMPLE_TYPES = ('conv', 'resnet')
# PyTorch module lists, whose indices the flax names join with '_' (see `torch_name`).
_LISTS = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers',
          'to_out')


def torch_name(flax_path: Sequence[str]) -> str:
  """The PyTorch state-dict key of a flax parameter path.

  ``('down_blocks_1', 'attentions_0', 'to_out_0', 'kernel')`` ->
  ``'down_blocks.1.attentions.0.to_out.0.weight'``; kernel / scale / embedding -> weight.
  """
  parts = []
  for p in flax_path[:-1]:
    m = re.fullmatch(r'(%s)_(\d+)' % '|'.join(_LISTS), p)
    parts.append(f'{m.group(1)}.{m.group(2)}' if m else p)
  leaf = flax_path[-1]
  parts.append('bias' if leaf == 'bias' else 'weight')
  return '.'.join(parts)


class Resnet(nn.Module):
  """diffusers' ``ResnetBlock2D`` (pre-norm, conv shortcut when the width changes)."""
  out_ch: int
  groups: int
  eps: float
  time_scale_shift: str
  act_fn: str
  output_scale_factor: float = 1.0
  dropout: float = 0.0
  updown: str = ''   # 'down': average pool, 'up': nearest, after norm1 + act (both paths)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    act = ACTIVATIONS[self.act_fn]
    h = act(GroupNorm(self.groups, self.eps, self.dtype, name='norm1')(x))
    x, h = resample(x, self.updown), resample(h, self.updown)
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name='conv1')(h)
    width = 2 * self.out_ch if self.time_scale_shift == 'scale_shift' else self.out_ch
    temb = nn.Dense(width, dtype=self.dtype, name='time_emb_proj')(act(temb))[:, None, None]
    norm2 = GroupNorm(self.groups, self.eps, self.dtype, name='norm2')
    if self.time_scale_shift == 'scale_shift':
      scale, shift = jnp.split(temb, 2, axis=-1)
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + temb)
    h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    out = x + h
    return out / self.output_scale_factor if self.output_scale_factor != 1 else out


class Attention(nn.Module):
  """diffusers' ``Attention`` as the UNet2D blocks use it: GroupNorm (optional), multi-head
  self-attention over the positions, residual, divided by ``rescale``."""
  heads: int
  groups: int   # 0: no GroupNorm
  eps: float
  rescale: float = 1.0
  dtype: Any = jnp.float32
  attention: str = 'xla'   # `network.dot_product_attention`'s implementation

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    if c % self.heads:
      raise ValueError(f'Attention width {c} is not divisible by its {self.heads} heads '
                       '(config.model.diffusers_unet2d.attention_head_dim).')
    y = x.reshape(b, hh * ww, c)
    if self.groups:
      y = GroupNorm(self.groups, self.eps, self.dtype, name='group_norm')(y)
    split = lambda z: z.reshape(b, hh * ww, self.heads, c // self.heads)  # noqa: E731
    q = split(nn.Dense(c, dtype=self.dtype, name='to_q')(y))
    k = split(nn.Dense(c, dtype=self.dtype, name='to_k')(y))
    v = split(nn.Dense(c, dtype=self.dtype, name='to_v')(y))
    y = network.dot_product_attention(q, k, v, self.attention).reshape(b, hh * ww, c)
    y = nn.Dense(c, dtype=self.dtype, name='to_out_0')(y).reshape(b, hh, ww, c)
    out = y + x
    return out / self.rescale if self.rescale != 1 else out


class _Sampler(nn.Module):
  """diffusers' ``Downsample2D`` / ``Upsample2D`` with a conv (its weights under ``conv``)."""
  kind: str          # 'down' or 'up'
  padding: int = 1   # down: the stride-2 conv's padding; 0 = pad right / bottom by 1 first
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if self.kind == 'up':
      return nn.Conv(c, (3, 3), padding=1, dtype=self.dtype, name='conv')(resample(x, 'up'))
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return nn.Conv(c, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name='conv')(x)


class _Block(nn.Module):
  """One down / up block (resnets, optional attentions, optional resampler) or the mid block."""
  block_type: str
  out_ch: int
  num_layers: int
  sampler: str       # '' (none), 'conv' or 'resnet'
  heads: int         # 0: no attention (mid block)
  attn_groups: int
  groups: int
  eps: float
  time_scale_shift: str
  act_fn: str
  dropout: float
  downsample_padding: int
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32
  attention: str = 'xla'

  def _resnet(self, name: str, updown: str = '') -> Resnet:
    return Resnet(self.out_ch, self.groups, self.eps, self.time_scale_shift, self.act_fn,
                  self.output_scale_factor, self.dropout, updown, self.dtype, name=name)

  def _attention(self, name: str) -> Attention:
    return Attention(self.heads, self.attn_groups, self.eps, self.output_scale_factor,
                     self.dtype, self.attention, name=name)

  @nn.compact
  def __call__(self, h, temb, skips: list, train: bool):
    attn = self.block_type.startswith('Attn')
    if self.block_type == 'UNetMidBlock2D':
      h = self._resnet('resnets_0')(h, temb, train)
      if self.heads:
        h = self._attention('attentions_0')(h)
      return self._resnet('resnets_1')(h, temb, train)
    down = 'Down' in self.block_type
    for j in range(self.num_layers):
      if not down:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self._resnet(f'resnets_{j}')(h, temb, train)
      if attn:
        h = self._attention(f'attentions_{j}')(h)
      if down:
        skips.append(h)
    kind = 'down' if down else 'up'
    name = 'downsamplers_0' if down else 'upsamplers_0'
    if self.sampler == 'conv':
      h = _Sampler(kind, self.downsample_padding, self.dtype, name=name)(h)
    elif self.sampler == 'resnet':
      h = self._resnet(name, updown=kind)(h, temb, train)
    if down and self.sampler:
      skips.append(h)
    return h


class DiffusersUNet2D(nn.Module):
  """eps_theta(x_t, t): diffusers' ``UNet2DModel``; fields as in its ``config.json``.

  ``channels`` is ``config.data.channels`` (= ``in_channels``); ``dtype`` the compute dtype
  (parameters float32, GroupNorm statistics float32, output float32).
  """
  channels: int = 3
  out_channels: int = 3
  center_input_sample: bool = False
  time_embedding_type: str = 'positional'
  time_embedding_dim: int = 0
  freq_shift: float = 0
  flip_sin_to_cos: bool = True
  down_block_types: Sequence[str] = ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D',
                                     'AttnDownBlock2D')
  mid_block_type: str = 'UNetMidBlock2D'
  up_block_types: Sequence[str] = ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D',
                                   'UpBlock2D')
  block_out_channels: Sequence[int] = (224, 448, 672, 896)
  layers_per_block: int = 2
  mid_block_scale_factor: float = 1.0
  downsample_padding: int = 1
  downsample_type: str = 'conv'
  upsample_type: str = 'conv'
  dropout: float = 0.0
  act_fn: str = 'silu'
  attention_head_dim: int = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: int = 0
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = 'default'
  add_attention: bool = True
  num_train_timesteps: int = 0
  dtype: Any = jnp.float32
  attention: str = 'xla'   # 'xla' or 'cudnn' (`network.resolve_attention`); not in config.json

  def check_config(self) -> None:
    """Raises ValueError naming every field this module does not compute as diffusers does."""
    bad = unsupported_options(self)
    if bad:
      raise ValueError('Unsupported config.model.diffusers_unet2d option(s): ' + '; '.join(bad))

  def _heads(self, width: int) -> int:
    return width // self.attention_head_dim if self.attention_head_dim else 1

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    """Predicts [B, H, W, channels] (eps, or v / x0 per ``model.prediction_type``) of x_t."""
    self.check_config()
    check_image_input(x, t, self.channels, 2 ** (len(self.block_out_channels) - 1),
                           f'block_out_channels={tuple(self.block_out_channels)}',
                           'config.model.diffusers_unet2d.block_out_channels')
    if self.center_input_sample:
      x = 2 * x - 1.0
    kw = dict(groups=self.norm_num_groups, eps=self.norm_eps,
              time_scale_shift=self.resnet_time_scale_shift, act_fn=self.act_fn,
              dropout=self.dropout, downsample_padding=self.downsample_padding, dtype=self.dtype,
              attention=self.attention)
    ch0 = self.block_out_channels[0]
    if self.time_embedding_type == 'learned':
      t_emb = nn.Embed(self.num_train_timesteps, ch0, name='time_proj')(jnp.asarray(t, jnp.int32))
    else:
      t_emb = timestep_embedding(t, ch0, self.flip_sin_to_cos, self.freq_shift)
    temb_dim = self.time_embedding_dim or 4 * ch0
    temb = _TimestepEmbedding(temb_dim, self.dtype, name='time_embedding')(t_emb)

    h = nn.Conv(ch0, (3, 3), padding=1, dtype=self.dtype, name='conv_in')(x)
    skips = [h]
    last = len(self.block_out_channels) - 1
    for i, (block_type, width) in enumerate(zip(self.down_block_types, self.block_out_channels)):
      sampler = '' if i == last else (
          self.downsample_type if block_type.startswith('Attn') else 'conv')
      h = _Block(block_type, width, self.layers_per_block, sampler, self._heads(width),
                 self.norm_num_groups, name=f'down_blocks_{i}', **kw)(h, temb, skips, train)
    if self.mid_block_type:
      width = self.block_out_channels[-1]
      groups = self.attn_norm_num_groups or (
          self.norm_num_groups if self.resnet_time_scale_shift == 'default' else 0)
      h = _Block('UNetMidBlock2D', width, 1, '', self._heads(width) if self.add_attention else 0,
                 groups, output_scale_factor=self.mid_block_scale_factor, name='mid_block',
                 **kw)(h, temb, skips, train)
    for i, (block_type, width) in enumerate(zip(self.up_block_types,
                                                reversed(self.block_out_channels))):
      sampler = '' if i == last else (
          self.upsample_type if block_type.startswith('Attn') else 'conv')
      h = _Block(block_type, width, self.layers_per_block + 1, sampler, self._heads(width),
                 self.norm_num_groups, name=f'up_blocks_{i}', **kw)(h, temb, skips, train)
    assert not skips
    h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype,
                          name='conv_norm_out')(h))
    out = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name='conv_out')(h)
    return out[..., :self.channels].astype(jnp.float32)


class _TimestepEmbedding(nn.Module):
  """diffusers' ``TimestepEmbedding``: linear_1, SiLU, linear_2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    h = nn.Dense(self.features, dtype=self.dtype, name='linear_1')(t_emb)
    return nn.Dense(self.features, dtype=self.dtype, name='linear_2')(nn.silu(h))


def unsupported_options(net: DiffusersUNet2D) -> list[str]:
  """Each field value of ``net`` that this module does not compute as diffusers does, named."""
  bad = []

  def choice(field, value, allowed):
    if value not in allowed:
      bad.append(f'{field}={value!r} (supported: {", ".join(map(repr, allowed))})')

  for i, b in enumerate(net.down_block_types):
    choice(f'down_block_types[{i}]', b, DOWN_BLOCK_TYPES)
  for i, b in enumerate(net.up_block_types):
    choice(f'up_block_types[{i}]', b, UP_BLOCK_TYPES)
  choice('mid_block_type', net.mid_block_type, MID_BLOCK_TYPES)
  choice('time_embedding_type', net.time_embedding_type, TIME_EMBEDDING_TYPES)
  choice('resnet_time_scale_shift', net.resnet_time_scale_shift, TIME_SCALE_SHIFTS)
  choice('downsample_type', net.downsample_type, RESAMPLE_TYPES)
  choice('upsample_type', net.upsample_type, RESAMPLE_TYPES)
  choice('act_fn', net.act_fn, tuple(ACTIVATIONS))
  n = len(net.block_out_channels)
  if len(net.down_block_types) != n or len(net.up_block_types) != n:
    bad.append(f'{len(net.down_block_types)} down_block_types, {len(net.up_block_types)} '
               f'up_block_types and {n} block_out_channels (must be equal)')
  if net.out_channels not in (net.channels, 2 * net.channels):
    bad.append(f'out_channels={net.out_channels} with in_channels={net.channels} (supported: '
               'equal, or twice: eps + learned variance)')
  if net.time_embedding_type == 'learned' and net.num_train_timesteps <= 0:
    bad.append("time_embedding_type='learned' needs num_train_timesteps")
  if net.norm_num_groups <= 0:
    bad.append(f'norm_num_groups={net.norm_num_groups} (must be a positive group count)')
  return bad


def _fields(config: ml_collections.ConfigDict) -> dict:
  section = settings.section(config.model, 'model')['diffusers_unet2d']
  defaults = settings.section(None, 'model')['diffusers_unet2d']
  given = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  return {**defaults, **given}


def build(config: ml_collections.ConfigDict, dtype: Any,
          attention: str = 'xla') -> DiffusersUNet2D:
  """`DiffusersUNet2D` of ``config.model.diffusers_unet2d`` for ``config.data.channels``."""
  f = _fields(config)
  if int(f['in_channels']) != int(config.data.channels):
    raise ValueError(f"config.model.diffusers_unet2d.in_channels={f['in_channels']} differs from "
                     f'config.data.channels={config.data.channels}.')
  tuples = ('down_block_types', 'up_block_types', 'block_out_channels')
  kw = {k: (tuple(v) if k in tuples else v) for k, v in f.items()
        if k not in ('sample_size', 'in_channels')}
  net = DiffusersUNet2D(channels=int(config.data.channels), dtype=dtype, attention=attention,
                        **kw)
  net.check_config()
  return net


def _memory_shape(config: ml_collections.ConfigDict) -> dict:
  f = _fields(config)
  widths = tuple(f['block_out_channels'])
  size = int(config.data.image_size)
  attn = tuple(size // 2 ** i for i, b in enumerate(f['down_block_types']) if b.startswith('Attn'))
  return dict(ch=widths[0], ch_mult=tuple(w / widths[0] for w in widths),
              num_res_blocks=int(f['layers_per_block']), attn_resolutions=attn, num_heads=1,
              num_head_channels=int(f['attention_head_dim'] or 0))


FAMILY = NetworkFamily('diffusers_unet2d', build, _memory_shape,
                       "Hugging Face diffusers' UNet2DModel (DDPM family)")


__all__ = ['DiffusersUNet2D', 'FAMILY', 'build', 'torch_name', 'timestep_embedding',
           'unsupported_options', 'DOWN_BLOCK_TYPES', 'UP_BLOCK_TYPES']
