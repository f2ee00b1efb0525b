"""Reading PyTorch state dicts (``.pt`` / ``.bin``, ``.safetensors``, ``.npz``) as float32 numpy."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SUFFIXES = ('.pt', '.pth', '.ckpt', '.bin', '.safetensors', '.npz')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict of tensors from ``.pt`` (PyTorch), ``.safetensors`` or ``.npz``.

  Args:
    path: the checkpoint file.

  Returns:
    ``{torch parameter name: float32 array}`` in PyTorch's layouts; float16 / bfloat16 tensors
    (guided-diffusion's fp16 checkpoints) are widened to float32 exactly.

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
