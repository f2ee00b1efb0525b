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

The name and layout map (OIHW -> HWIO, Linear transposes, the legacy QKV order) is
`ddm_ood.adm_params`; any mismatch is one ValueError that names the keys and the config field
that most likely differs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from ddm_ood import unet as unet_lib
from ddm_ood.adm_params import convert_state_dict, infer_flags, tensor_map

SUFFIXES = ('.pt', '.pth', '.ckpt', '.bin', '.safetensors', '.npz')


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
  # ('auto' = bfloat16 on accelerators: faster, features differ slightly), and on GPUs / TPUs
  # only with full-precision float32 matmuls and convolutions (their default is TF32 / bf16
  # passes: 4e-3 off DiffPath's statistics on an H200, 1.2e-5 with 'highest').
  m.compute_dtype = 'float32'
  m.precision = 'highest'
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


__all__ = ['SUFFIXES', 'load_state_dict', 'tensor_map', 'infer_flags', 'convert_state_dict',
           'improved_diffusion_config', 'convert_checkpoint']


if __name__ == '__main__':
  _cli()
