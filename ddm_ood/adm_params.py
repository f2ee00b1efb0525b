"""improved-diffusion / guided-diffusion (ADM) `UNetModel` state dict -> ddm_ood `UNet` params.

Tensor layouts: Conv2d ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]``; Linear ``[O, I]`` and the
attention's 1x1 Conv1d ``[O, I, 1]`` -> Dense ``[I, O]``; GroupNorm weight -> scale. The legacy
attention's qkv conv is laid out per head (``[q_h, k_h, v_h]`` blocks for each head h); ddm_ood's
qkv Dense is ``[q (all heads), k, v]`` (guided-diffusion's ``use_new_attention_order``), so legacy
columns are permuted with the block's head count (``model.num_heads``, or width //
``model.num_head_channels``). With ``model.resblock_updown`` the down/upsampling layers are
residual blocks (``input_blocks.k.0.in_layers...`` instead of ``.op``).

What the weights cannot tell, and the config must get right: ``model.num_heads`` /
``model.num_head_channels``, ``model.use_new_attention_order``, ``model.num_groups``,
``model.norm_eps``, ``model.rescale_timesteps``, ``model.downsample_padding`` and the diffusion
schedule. Everything else (widths, depths, attention placement, learn_sigma, channels,
resblock_updown) is checked against the state dict; any mismatch is one ValueError that names the
keys and the config field that most likely differs. Class-conditional checkpoints
(``label_emb.weight``) are refused: ddm_ood scores without labels.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import jax
import numpy as np

from ddm_ood import unet as unet_lib

_SHOW = 5  # keys listed per kind of mismatch in error messages


def _module_pairs(flax_params: dict, num_res_blocks: int,
                  num_levels: int) -> Iterator[tuple[str, str, str]]:
  """(torch module prefix, flax module name, kind) in improved-diffusion's module order.

  ``kind`` is 'linear', 'conv', 'norm', 'qkv', 'proj' or a block ('res', 'attn') expanded by the
  caller. Which attention blocks exist is read from the flax parameter tree itself.
  """
  yield 'time_embed.0', 'temb_dense0', 'linear'
  yield 'time_embed.2', 'temb_dense1', 'linear'
  yield 'input_blocks.0.0', 'conv_in', 'conv'
  k = 1
  for level in range(num_levels):
    for i in range(num_res_blocks):
      yield f'input_blocks.{k}.0', f'down_{level}_res_{i}', 'res'
      if f'down_{level}_attn_{i}' in flax_params:
        yield f'input_blocks.{k}.1', f'down_{level}_attn_{i}', 'attn'
      k += 1
    if level != num_levels - 1:
      name = f'down_{level}_downsample'
      if 'conv1' in flax_params[name]:   # resblock_updown
        yield f'input_blocks.{k}.0', name, 'res'
      else:
        yield f'input_blocks.{k}.0.op', name, 'conv'
      k += 1
  for j, (name, kind) in enumerate((('mid_res_0', 'res'), ('mid_attn', 'attn'),
                                    ('mid_res_1', 'res'))):
    yield f'middle_block.{j}', name, kind
  k = 0
  for level in reversed(range(num_levels)):
    for i in range(num_res_blocks + 1):
      yield f'output_blocks.{k}.0', f'up_{level}_res_{i}', 'res'
      j = 1
      if f'up_{level}_attn_{i}' in flax_params:
        yield f'output_blocks.{k}.1', f'up_{level}_attn_{i}', 'attn'
        j = 2
      if level and i == num_res_blocks:
        name = f'up_{level}_upsample'
        if 'conv1' in flax_params[name]:   # resblock_updown
          yield f'output_blocks.{k}.{j}', name, 'res'
        else:
          yield f'output_blocks.{k}.{j}.conv', name, 'conv'
      k += 1
  yield 'out.0', 'norm_out', 'norm'
  yield 'out.2', 'conv_out', 'conv'


_RES_PARTS = (('in_layers.0', 'norm1', 'norm'), ('in_layers.2', 'conv1', 'conv'),
              ('emb_layers.1', 'emb', 'linear'), ('out_layers.0', 'norm2', 'norm'),
              ('out_layers.3', 'conv2', 'conv'), ('skip_connection', 'skip', 'conv'))
_ATTN_PARTS = (('norm', 'norm', 'norm'), ('qkv', 'qkv', 'qkv'), ('proj_out', 'proj', 'proj'))
_LEAF_NAMES = {'linear': (('weight', 'kernel'), ('bias', 'bias')),
               'conv': (('weight', 'kernel'), ('bias', 'bias')),
               'qkv': (('weight', 'kernel'), ('bias', 'bias')),
               'proj': (('weight', 'kernel'), ('bias', 'bias')),
               'norm': (('weight', 'scale'), ('bias', 'bias'))}


def tensor_map(flax_params: dict, num_res_blocks: int,
               num_levels: int) -> dict[str, tuple[tuple[str, ...], str, str]]:
  """``{torch name: (flax path, kind, flax leaf name)}`` for every parameter of the flax tree.

  Args:
    flax_params: the ``'params'`` collection (arrays or ShapeDtypeStructs) of a `unet.UNet`.
    num_res_blocks: ``model.num_res_blocks``.
    num_levels: ``len(model.ch_mult)``.
  """
  out = {}
  for prefix, name, kind in _module_pairs(flax_params, num_res_blocks, num_levels):
    if kind in ('res', 'attn'):
      parts = [(f'{prefix}.{tp}', (name, fp), k)
               for tp, fp, k in (_RES_PARTS if kind == 'res' else _ATTN_PARTS)
               if fp in flax_params.get(name, {})]
    else:
      parts = [(prefix, (name,), kind)]
    for tprefix, fpath, k in parts:
      for tleaf, fleaf in _LEAF_NAMES[k]:
        out[f'{tprefix}.{tleaf}'] = (fpath, k, fleaf)
  return out


def _torch_shape(kind: str, leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a tensor whose flax counterpart has ``flax_shape``."""
  if leaf != 'kernel':
    return tuple(flax_shape)
  if kind == 'conv':
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if kind == 'linear':
    return tuple(flax_shape[::-1])
  return (flax_shape[1], flax_shape[0], 1)  # qkv / proj: Conv1d with kernel size 1


def _to_flax(kind: str, leaf: str, w: np.ndarray, heads: int) -> np.ndarray:
  """One tensor from PyTorch's layout to flax's; ``heads`` > 0 permutes a legacy qkv."""
  if kind == 'qkv' and heads:  # per-head [q_h, k_h, v_h] output blocks -> [q, k, v], heads inside
    c3 = w.shape[0]
    dh = c3 // (3 * heads)
    w = w.reshape(heads, 3, dh, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
  if leaf != 'kernel':
    return w
  if kind == 'conv':
    return w.transpose(2, 3, 1, 0)
  if kind == 'linear':
    return w.T
  return w[:, :, 0].T  # qkv / proj


# ------------------------------------------------------------------------------ diagnosis


def infer_flags(state_dict: dict[str, np.ndarray], image_size: int) -> dict[str, Any]:
  """Best-effort model flags of an improved/guided-diffusion state dict (for error messages).

  Returns:
    Some of ``{'model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
    'model.learn_sigma', 'model.resblock_updown', 'data.channels'}`` (a field is left out when it
    cannot be read).
  """
  sd = state_dict
  out: dict[str, Any] = {}
  w_in = sd.get('input_blocks.0.0.weight')
  if w_in is None or w_in.ndim != 4:
    return out
  in_ch = int(w_in.shape[1])
  out['data.channels'] = in_ch
  w_out = sd.get('out.2.weight')
  if w_out is not None and w_out.ndim == 4 and w_out.shape[0] in (in_ch, 2 * in_ch):
    out['model.learn_sigma'] = bool(w_out.shape[0] == 2 * in_ch)
  w_emb = sd.get('time_embed.0.weight')
  if w_emb is None or w_emb.ndim != 2:
    return out
  ch = int(w_emb.shape[1])  # the timestep embedding has model_channels inputs
  out['model.ch'] = ch
  blocks = sorted({int(m.group(1)) for k in sd
                   for m in [re.match(r'input_blocks\.(\d+)\.', k)] if m})
  if not blocks or blocks != list(range(len(blocks))):
    return out
  # resblock_updown: the upsampling layer of an output block is a residual block (index 1 or 2);
  # the first one ends the deepest level, so its index is num_res_blocks.
  ups = sorted(int(m.group(1)) for key in sd
               for m in [re.match(r'output_blocks\.(\d+)\.[12]\.in_layers\.0\.weight', key)] if m)
  out['model.resblock_updown'] = bool(ups)
  levels: list[list[int]] = [[]]
  for k in blocks[1:]:
    if f'input_blocks.{k}.0.op.weight' in sd or (ups and k % (ups[0] + 1) == 0):
      levels.append([])
    else:
      levels[-1].append(k)
  sizes = {len(level) for level in levels}
  if len(sizes) == 1:
    out['model.num_res_blocks'] = sizes.pop()
  mult, attn = [], []
  for ds_log2, level in enumerate(levels):
    w = sd.get(f'input_blocks.{level[0]}.0.in_layers.2.weight') if level else None
    if w is None:
      mult = None
      break
    mult.append(_mult(int(w.shape[0]), ch))
    if any(f'input_blocks.{k}.1.qkv.weight' in sd for k in level):
      attn.append(image_size // 2 ** ds_log2)
  if mult is not None:
    out['model.ch_mult'] = tuple(mult)
    out['model.attn_resolutions'] = tuple(attn)
  return out


def _mult(width: int, ch: int) -> float | int:
  return width // ch if width % ch == 0 else width / ch


def _model_flags(model: unet_lib.UNet, image_size: int) -> dict[str, Any]:
  sizes = [image_size // 2 ** level for level in range(len(model.ch_mult))]
  return {'model.ch': model.ch, 'data.channels': model.channels,
          'model.learn_sigma': model.learn_sigma, 'model.num_res_blocks': model.num_res_blocks,
          'model.ch_mult': tuple(model.ch_mult), 'model.resblock_updown': model.resblock_updown,
          'model.attn_resolutions': tuple(s for s in sizes if s in model.attn_resolutions)}


def _key_hints(missing, unexpected, misshaped) -> list[str]:
  """Config fields suggested by the key names alone (when the flags cannot be inferred)."""
  keys = list(missing) + list(unexpected)
  hints = []
  if any(k.startswith('label_emb') for k in unexpected):
    hints.append('the checkpoint is class-conditional (label_emb.*), which ddm_ood does not '
                 'support: it scores without labels; use the unconditional model of the same '
                 'family (e.g. guided-diffusion 256x256_diffusion_uncond.pt)')
  if any(re.search(r'\.(qkv|proj_out)\.|\.1\.norm\.', k) for k in keys):
    hints.append('model.attn_resolutions (attention blocks differ)')
  if any(re.match(r'(input|output)_blocks\.\d+\.', k) for k in keys):
    hints.append('model.num_res_blocks or model.ch_mult (the number of blocks differs)')
  if any(k.startswith('out.2.') for k in misshaped):
    hints.append('model.learn_sigma (out.2 has 2 x channels outputs when learn_sigma) or '
                 'data.channels')
  if any(not k.startswith('out.2.') for k in misshaped):
    hints.append('model.ch / model.ch_mult (layer widths differ)')
  return hints


def _listing(keys: list[str]) -> str:
  shown = ', '.join(keys[:_SHOW])
  return shown + (f' ... and {len(keys) - _SHOW} more' if len(keys) > _SHOW else '')


def _compact(keys: list[str], others) -> list[str]:
  """Keys of whole blocks absent from ``others`` as 'input_blocks.12.*' (listed first), then the
  remaining keys: the blocks a wrong depth adds or drops are the telling part."""
  def block(k):
    m = re.match(r'((?:input|output)_blocks\.\d+)\.', k)
    return m.group(1) if m else None
  other_blocks = {block(k) for k in others}
  whole, rest = [], []
  for k in keys:
    b = block(k)
    if b is not None and b not in other_blocks:
      if f'{b}.*' not in whole:
        whole.append(f'{b}.*')
    else:
      rest.append(k)
  return whole + rest


def _mismatch_error(state_dict, model, image_size, expected, missing, unexpected,
                    misshaped) -> ValueError:
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing: {_listing(_compact(missing, state_dict))}')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected: {_listing(_compact(unexpected, expected))}')
  if misshaped:
    shapes = [f'{k} {list(got)} vs expected {list(want)}' for k, got, want in misshaped]
    parts.append(f'{len(misshaped)} mis-shaped: {_listing(shapes)}')
  inferred = infer_flags(state_dict, image_size)
  ours = _model_flags(model, image_size)
  differ = [f for f, v in inferred.items() if f in ours and _fmt(v) != _fmt(ours[f])]
  if differ:
    diffs = [f'{f}={_fmt(inferred[f])} (config: {_fmt(ours[f])})' for f in differ]
    hint = ('The checkpoint looks like ' + ', '.join(diffs) + '; set these in the config '
            f"(e.g. --config.{differ[0]}='{_fmt(inferred[differ[0]])}').")
  else:
    hints = _key_hints(missing, unexpected, [k for k, _, _ in misshaped])
    hint = ('Most likely differs: ' + '; '.join(hints) + '.') if hints else (
        'Check config.model against the flags the checkpoint was trained with.')
  return ValueError('The state dict does not match the network of this config '
                    f'({"; ".join(parts)}). {hint}')


def _fmt(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    items = [str(int(x)) if float(x).is_integer() else str(float(x)) for x in v]
    return '(' + ', '.join(items) + (',)' if len(v) == 1 else ')')
  return str(v)


# ------------------------------------------------------------------------------ conversion


def convert_state_dict(state_dict: dict[str, np.ndarray], model: unet_lib.UNet,
                       image_size: int, new_attention_order: bool = False) -> dict:
  """Converts an improved/guided-diffusion ``UNetModel`` state dict to flax variables of ``model``.

  Args:
    state_dict: ``{torch name: array}`` (`load_state_dict`; float16 tensors are read as float32).
    model: the `unet.UNet` (`unet.build_model(config)`) the weights are for.
    image_size: ``config.data.image_size`` (decides where attention blocks are).
    new_attention_order: ``model.use_new_attention_order`` (the qkv layout of the checkpoint).

  Returns:
    ``{'params': ...}`` with float32 numpy leaves, shaped exactly like ``model.init``'s.

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor: one message naming the keys and the
      config field most likely set differently from the checkpoint's training flags.
  """
  shapes = jax.eval_shape(lambda k: unet_lib.init_params(model, k, image_size),
                          jax.random.key(0))['params']
  mapping = tensor_map(shapes, model.num_res_blocks, len(model.ch_mult))
  expected = {name: _torch_shape(kind, leaf, _leaf(shapes, path, leaf).shape)
              for name, (path, kind, leaf) in mapping.items()}
  n_flax = len(jax.tree.leaves(shapes))
  if len(expected) != n_flax:  # a UNet change the mapping does not know about
    raise AssertionError(f'convert.tensor_map covers {len(expected)} of {n_flax} parameters.')
  missing = sorted(set(expected) - set(state_dict), key=_natural)
  unexpected = sorted(set(state_dict) - set(expected), key=_natural)
  misshaped = [(k, tuple(state_dict[k].shape), expected[k])
               for k in sorted(set(expected) & set(state_dict), key=_natural)
               if tuple(state_dict[k].shape) != expected[k]]
  if missing or unexpected or misshaped:
    raise _mismatch_error(state_dict, model, image_size, expected, missing, unexpected,
                          misshaped)
  params: dict = {}
  for name, (path, kind, leaf) in mapping.items():
    w = np.asarray(state_dict[name], np.float32)
    heads = 0
    if kind == 'qkv' and not new_attention_order:
      width = w.shape[0] // 3
      heads = width // model.num_head_channels if model.num_head_channels else model.num_heads
    w = _to_flax(kind, leaf, w, heads)
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(w, dtype=np.float32)
  return {'params': params}


def _leaf(tree: dict, path: tuple[str, ...], leaf: str):
  for p in path:
    tree = tree[p]
  return tree[leaf]


def _natural(key: str) -> list:
  """Sort key: input_blocks.2 before input_blocks.10."""
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', key)]


__all__ = ['tensor_map', 'infer_flags', 'convert_state_dict']
