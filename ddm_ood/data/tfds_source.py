"""``tfds:NAME`` sources: TensorFlow Datasets (TensorFlow is imported only when one is loaded)."""

from __future__ import annotations

import os

import numpy as np

from ddm_ood import settings
from ddm_ood.data import formats
from ddm_ood.data import resize
from ddm_ood.data.errors import DataError
from ddm_ood.data.errors import require

TFDS_NAMES = ('celeb_a', 'cifar10', 'cifar100', 'svhn_cropped', 'dtd', 'mnist', 'fashion_mnist')
# Set to '0' to forbid TFDS downloads (only already-prepared data under data_dir is used).
TFDS_DOWNLOAD_ENV = 'DDM_OOD_TFDS_DOWNLOAD'

_CELEBA_CROP = 140
# The sets' own resolution after the loader's crop (dtd's images vary, all > 256: none).
TFDS_NATIVE_SIZES = {'celeb_a': _CELEBA_CROP, 'cifar10': 32, 'cifar100': 32, 'svhn_cropped': 32,
                     'mnist': 28, 'fashion_mnist': 28}
_TFDS_BATCH = 1024


def tfds_loader(name: str, process_split: bool):
  """The loader ``(split, cfg, max_examples, seed) -> [N, S, S, C]`` of ``tfds:name``."""
  def load(split, cfg, max_examples, seed):
    del seed
    return _load_tfds(name, split, cfg, max_examples, process_split)
  return load


def _tfds_fix(name: str) -> str:
  fix = (f"Prepare it with TFDS on a machine with internet (`tfds build {name}` or "
         f"`tfds.load('{name}')`) and pass "
         '--config.data.data_dir=/path/to/prepared/tensorflow_datasets.')
  if name == 'celeb_a':
    fix += (' CelebA needs a manual download (see the TFDS celeb_a catalog page) before '
            '`tfds build celeb_a --manual_dir=...`.')
  return fix


def _load_tfds(name, split, cfg, max_examples, process_split):
  what, package = f"Source 'tfds:{name}'", 'tensorflow-cpu tensorflow-datasets'
  tf = require('tensorflow', what, package)
  tfds = require('tensorflow_datasets', what, package)
  try:
    # Keep TF off the accelerators: JAX owns them.
    tf.config.set_visible_devices([], 'GPU')
  except Exception:  # pylint: disable=broad-except
    pass  # already initialized: nothing to do
  size, channels = int(cfg.image_size), int(cfg.channels)
  data_dir = settings.section(cfg, 'data')['data_dir'] or None
  tfds_split = split
  if process_split:
    tfds_split = tfds.split_for_jax_process(split)
  download = os.environ.get(TFDS_DOWNLOAD_ENV, '1') != '0'
  limit = max_examples if max_examples and max_examples > 0 else None
  chunks = []
  try:
    ds = tfds.load(name, split=tfds_split, data_dir=data_dir, shuffle_files=False,
                   download=download)
    ds = ds.map(lambda ex: ex['image'])
    if limit:
      ds = ds.take(limit)
    if name == 'dtd':  # variable image sizes: one at a time
      for im in tfds.as_numpy(ds):
        chunks.append(_tfds_preprocess(name, im[None], size, channels))
    else:
      for im in tfds.as_numpy(ds.batch(_TFDS_BATCH)):
        chunks.append(_tfds_preprocess(name, im, size, channels))
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"Could not load TFDS dataset '{name}' split {split!r} "
                    f'(data_dir={data_dir or "TFDS default"}): {type(e).__name__}: '
                    f'{str(e)[:500].rstrip(". ")}. {_tfds_fix(name)}') from e
  if not chunks:
    raise DataError(f"TFDS dataset '{name}' split {split!r} is empty. "
                    f'{_tfds_fix(name)}')
  return np.concatenate(chunks, axis=0)


def _tfds_preprocess(name: str, im: np.ndarray, size: int, channels: int) -> np.ndarray:
  """uint8 [B, h, w, c] from TFDS -> float32 [B, size, size, channels] in [-1, 1]."""
  if name == 'celeb_a':
    h, w = im.shape[1:3]
    # Center crop 140x140 of the 218x178 aligned faces (torchvision CenterCrop offsets).
    top, left = int(round((h - _CELEBA_CROP) / 2)), int(round((w - _CELEBA_CROP) / 2))
    im = im[:, top:top + _CELEBA_CROP, left:left + _CELEBA_CROP]
  else:
    h, w = im.shape[1:3]
    s = min(h, w)
    if h != w:
      top, left = (h - s) // 2, (w - s) // 2
      im = im[:, top:top + s, left:left + s]
  x = formats.uint8_to_unit(im)
  if x.shape[-1] > channels:
    x = formats.to_channels(x, channels)
  x = resize.resize_images(x, size)
  return formats.to_channels(x, channels)
