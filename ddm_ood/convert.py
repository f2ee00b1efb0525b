"""Import improved-diffusion (ADM) PyTorch checkpoints into a ddm_ood workdir.

DiffPath's CelebA-32 model and improved-diffusion's ImageNet-64 model are PyTorch state dicts of
improved-diffusion's ``UNetModel``. With a config whose ``config.model`` describes the same network
(``configs/diffpath_celeba.py``, ``configs/diffpath_imagenet64.py``)::

  python -m ddm_ood.convert --checkpoint=celeba_ema_0.9999_499999.pt \
      --config=configs/diffpath_celeba.py --workdir=runs/diffpath_celeba

writes an Orbax checkpoint (the converted weights as the EMA parameters, step 0) and
``config.json`` into the workdir, so ``python -m ddm_ood.main --mode=evaluate``,
`ddm_ood.api.load_anomaly_scorer`, `ddm_ood.api.load_denoiser` and the report work on it
unchanged. Reading ``.pt`` files needs PyTorch (``pip install -e '.[convert]'``); ``.safetensors``
needs the ``safetensors`` package; ``.npz`` needs nothing.

Tensor layouts: Conv2d ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]``; Linear ``[O, I]`` and the
attention's 1x1 Conv1d ``[O, I, 1]`` -> Dense ``[I, O]``; GroupNorm weight -> scale. The attention's
qkv conv is laid out per head (``[q_h, k_h, v_h]`` blocks for each head h); ddm_ood's qkv Dense is
``[q (all heads), k, v]``, so its columns are permuted with ``model.num_heads``.

What the weights cannot tell, and the config must get right: ``model.num_heads``,
``model.num_groups``, ``model.norm_eps``, ``model.rescale_timesteps``,
``model.downsample_padding`` and the diffusion schedule. Everything else (widths, depths,
attention placement, learn_sigma, channels) is checked against the state dict; any mismatch is one
ValueError that names the keys and the config field that most likely differs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from ddm_ood import unet as unet_lib

SUFFIXES = ('.pt', '.pth', '.ckpt', '.bin', '.safetensors', '.npz')
_SHOW = 5  # keys listed per kind of mismatch in error messages


# ------------------------------------------------------------------------------ reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict of tensors from ``.pt`` (PyTorch), ``.safetensors`` or ``.npz``.

  Args:
    path: the checkpoint file.

  Returns:
    ``{torch parameter name: float32 array}`` in PyTorch's layouts.

  Raises:
    FileNotFoundError: no such file.
    ImportError: PyTorch / safetensors missing for that format (the message names the extra).
    ValueError: unknown suffix, or the file is not a flat dict of floating-point tensors.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Checkpoint {path!r} does not exist.')
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(f'Unknown checkpoint format {suffix!r} of {path!r}; supported: '
                     f'{", ".join(SUFFIXES)}.')
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as f:
      raw = {k: f[k] for k in f.files}
  elif suffix == '.safetensors':
    try:
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path} needs the safetensors package: '
                        "pip install -e '.[convert]' (or pip install safetensors).") from e
    raw = st_numpy.load_file(path)
  else:
    raw = _load_torch(path)
  return _as_float32(raw, path)


def _load_torch(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading the PyTorch checkpoint {path} needs torch: '
                      "pip install -e '.[convert]' (CPU-only is enough), or convert it to "
                      '.safetensors / .npz elsewhere.') from e
  obj = torch.load(path, weights_only=True, map_location='cpu')
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict of tensors.')
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f'{path} is not a flat state dict: entry {k!r} is a {type(v).__name__} '
                       f'(top-level keys: {sorted(obj)[:8]}); save model.state_dict() itself.')
    out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


def _as_float32(raw: dict[str, Any], path: str) -> dict[str, np.ndarray]:
  if raw and all(k.startswith('module.') for k in raw):  # saved from DistributedDataParallel
    raw = {k[len('module.'):]: v for k, v in raw.items()}
  out = {}
  for k, v in raw.items():
    v = np.asarray(v)
    if not np.issubdtype(v.dtype, np.floating):
      raise ValueError(f'{path}: tensor {k!r} has dtype {v.dtype}; a UNet state dict holds only '
                       'floating-point tensors.')
    out[k] = v.astype(np.float32)
  return out


# ------------------------------------------------------------------------------ name mapping


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
      yield f'input_blocks.{k}.0.op', f'down_{level}_downsample', 'conv'
      k += 1
  yield 'middle_block.0', 'mid_res_0', 'res'
  yield 'middle_block.1', 'mid_attn', 'attn'
  yield 'middle_block.2', 'mid_res_1', 'res'
  k = 0
  for level in reversed(range(num_levels)):
    for i in range(num_res_blocks + 1):
      yield f'output_blocks.{k}.0', f'up_{level}_res_{i}', 'res'
      j = 1
      if f'up_{level}_attn_{i}' in flax_params:
        yield f'output_blocks.{k}.1', f'up_{level}_attn_{i}', 'attn'
        j = 2
      if level and i == num_res_blocks:
        yield f'output_blocks.{k}.{j}.conv', f'up_{level}_upsample', 'conv'
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


def _to_flax(kind: str, leaf: str, w: np.ndarray, num_heads: int) -> np.ndarray:
  """One tensor from PyTorch's layout to flax's."""
  if kind == 'qkv':  # per-head [q_h, k_h, v_h] output blocks -> [q, k, v] with heads inside
    c3 = w.shape[0]
    dh = c3 // (3 * num_heads)
    w = w.reshape(num_heads, 3, dh, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
  if leaf != 'kernel':
    return w
  if kind == 'conv':
    return w.transpose(2, 3, 1, 0)
  if kind == 'linear':
    return w.T
  return w[:, :, 0].T  # qkv / proj


# ------------------------------------------------------------------------------ diagnosis


def infer_flags(state_dict: dict[str, np.ndarray], image_size: int) -> dict[str, Any]:
  """Best-effort model flags of an improved-diffusion state dict (for error messages).

  Returns:
    Some of ``{'model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
    'model.learn_sigma', 'data.channels'}`` (a field is left out when it cannot be read).
  """
  sd = state_dict
  out: dict[str, Any] = {}
  w_in = sd.get('input_blocks.0.0.weight')
  if w_in is None or w_in.ndim != 4:
    return out
  ch, in_ch = int(w_in.shape[0]), int(w_in.shape[1])
  out['model.ch'] = ch
  out['data.channels'] = in_ch
  w_out = sd.get('out.2.weight')
  if w_out is not None and w_out.ndim == 4 and w_out.shape[0] in (in_ch, 2 * in_ch):
    out['model.learn_sigma'] = bool(w_out.shape[0] == 2 * in_ch)
  blocks = sorted({int(m.group(1)) for k in sd
                   for m in [re.match(r'input_blocks\.(\d+)\.', k)] if m})
  if not blocks or blocks != list(range(len(blocks))):
    return out
  levels: list[list[int]] = [[]]
  for k in blocks[1:]:
    if f'input_blocks.{k}.0.op.weight' in sd:
      levels.append([])
    else:
      levels[-1].append(k)
  sizes = {len(level) for level in levels}
  if len(sizes) == 1:
    out['model.num_res_blocks'] = sizes.pop()
  mult, attn = [], []
  for ds_log2, level in enumerate(levels):
    w = sd.get(f'input_blocks.{level[0]}.0.in_layers.2.weight') if level else None
    if w is None or w.shape[0] % ch:
      mult = None
      break
    mult.append(int(w.shape[0]) // ch)
    if any(f'input_blocks.{k}.1.qkv.weight' in sd for k in level):
      attn.append(image_size // 2 ** ds_log2)
  if mult is not None:
    out['model.ch_mult'] = tuple(mult)
    out['model.attn_resolutions'] = tuple(attn)
  return out


def _model_flags(model: unet_lib.UNet, image_size: int) -> dict[str, Any]:
  sizes = [image_size // 2 ** level for level in range(len(model.ch_mult))]
  return {'model.ch': model.ch, 'data.channels': model.channels,
          'model.learn_sigma': model.learn_sigma, 'model.num_res_blocks': model.num_res_blocks,
          'model.ch_mult': tuple(model.ch_mult),
          'model.attn_resolutions': tuple(s for s in sizes if s in model.attn_resolutions)}


def _key_hints(missing, unexpected, misshaped) -> list[str]:
  """Config fields suggested by the key names alone (when the flags cannot be inferred)."""
  keys = list(missing) + list(unexpected)
  hints = []
  if any(k.startswith('label_emb') for k in unexpected):
    hints.append('the checkpoint is class-conditional (label_emb.*), which ddm_ood does not '
                 'support')
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
    return '(' + ', '.join(str(int(x)) for x in v) + (',)' if len(v) == 1 else ')')
  return str(v)


# ------------------------------------------------------------------------------ conversion


def convert_state_dict(state_dict: dict[str, np.ndarray], model: unet_lib.UNet,
                       image_size: int) -> dict:
  """Converts an improved-diffusion ``UNetModel`` state dict to flax variables of ``model``.

  Args:
    state_dict: ``{torch name: array}`` (`load_state_dict`).
    model: the `unet.UNet` (`unet.build_model(config)`) the weights are for.
    image_size: ``config.data.image_size`` (decides where attention blocks are).

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
    w = _to_flax(kind, leaf, np.asarray(state_dict[name], np.float32), model.num_heads)
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


# ------------------------------------------------------------------------------ configs


def improved_diffusion_config(image_size: int, channel_mult: tuple[int, ...],
                              dropout: float) -> ml_collections.ConfigDict:
  """The default config with an improved-diffusion ``UNetModel`` and DiffPath's suite.

  The network of improved-diffusion's ``create_model`` for ``--num_channels 128
  --num_res_blocks 3 --learn_sigma True`` and its defaults (attention at 16 and 8, 4 heads,
  scale-shift norm, 32 GroupNorm groups, rescale_timesteps), cosine schedule with T = 4000; scored
  with ddim10 on ID {CIFAR-10, SVHN, CelebA} x OOD {the others, CIFAR-100, DTD} (TFDS).

  Args:
    image_size: 32 or 64 (RGB).
    channel_mult: improved-diffusion's channel_mult for that size.
    dropout: the training dropout (inactive when scoring; kept for the record).
  """
  from ddm_ood import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.data.image_size = image_size
  config.data.channels = 3
  config.data.max_train_examples = 0
  m = config.model
  m.ch = 128
  m.ch_mult = tuple(channel_mult)
  m.num_res_blocks = 3
  m.attn_resolutions = (16, 8)
  m.num_heads = 4
  m.dropout = dropout
  m.num_groups = 32
  m.norm_eps = 1e-5
  m.learn_sigma = True
  m.downsample_padding = 'symmetric'
  m.rescale_timesteps = True
  # DiffPath computes in float32; the proven equality with its statistics holds in float32
  # ('auto' = bfloat16 on accelerators: faster, features differ slightly).
  m.compute_dtype = 'float32'
  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 4000
  config.scorer.mode = 'ddim'           # DiffPath: ddim10, t = 0, 400, ..., 3600
  config.scorer.num_steps = 10
  ev = config.eval
  ev.id_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a')
  ev.ood_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a', 'tfds:cifar100',
                     'tfds:dtd')
  ev.feature_kinds = ('diffpath_6d', 'diffpath_1d', 'stein_ssim', 'stein')
  ev.num_fit = 50_000
  ev.num_test = 10_000
  return config


# ------------------------------------------------------------------------------ workdir


def convert_checkpoint(checkpoint_path: str, config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Converts ``checkpoint_path`` for ``config`` and writes a ddm_ood workdir.

  Everything is read and converted before anything is written: on any error the workdir is
  left as it was.

  Args:
    checkpoint_path: ``.pt`` / ``.safetensors`` / ``.npz`` state dict of improved-diffusion's
      ``UNetModel``.
    config: the config the workdir will be evaluated with.
    workdir: output directory; must not hold a checkpoint yet.

  Returns:
    The converted flax variables ``{'params': ...}``.

  Raises:
    FileExistsError: ``workdir`` already holds a checkpoint.
    ValueError: the checkpoint does not fit ``config.model`` (see `convert_state_dict`).
  """
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top
  from ddm_ood import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f'--workdir={workdir} exists and is not a directory.')
  step = checkpoint.latest_step(workdir)
  if step is not None:
    raise FileExistsError(f'{workdir} already holds a checkpoint (step {step}); convert into a '
                          'new or empty workdir.')
  state_dict = load_state_dict(checkpoint_path)
  model = unet_lib.build_model(config)
  variables = convert_state_dict(state_dict, model, int(config.data.image_size))

  meta = {'step': 0, 'epoch': 0, 'index': 0, 'config': json.loads(config.to_json_best_effort()),
          'converted_from': os.path.abspath(checkpoint_path)}
  workdir_lib.save_config(config, workdir)
  manager = checkpoint.make_manager(workdir, keep=1)
  try:
    checkpoint.save(manager, 0, {'ema_params': variables}, meta)
    manager.wait_until_finished()
  finally:
    manager.close()
  return variables


def _cli() -> None:
  """``python -m ddm_ood.convert --checkpoint=... --config=... --workdir=...``.

  The flags are defined here, not at import, so that importing this module next to
  `ddm_ood.main` (which defines --config / --workdir too) never clashes.
  """
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                                lock_config=True)
  checkpoint_flag = flags.DEFINE_string('checkpoint', None,
                                        'PyTorch (.pt), .safetensors or .npz state dict.')
  workdir_flag = flags.DEFINE_string('workdir', None, 'Output workdir (new or empty).')
  flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
      variables = convert_checkpoint(checkpoint_flag.value, config_flag.value,
                                     workdir_flag.value)
    except (OSError, ImportError, ValueError) as e:  # OSError: also a missing --config file
      print(f'ddm_ood.convert: error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
    n = unet_lib.param_count(variables)
    print(f'Converted {checkpoint_flag.value} ({n:,} parameters) into '
          f'{os.path.abspath(workdir_flag.value)}', flush=True)

  app.run(main)


if __name__ == '__main__':
  _cli()
