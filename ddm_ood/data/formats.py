"""Image file formats: idx and GIMP .pat parsers, PIL decoding, channel and range conversion."""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib

import numpy as np

from ddm_ood.data.errors import DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


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


def uint8_to_unit(x: np.ndarray) -> np.ndarray:
  """uint8 ``[...]`` in 0..255 -> float32 ``[...]`` in [-1, 1]."""
  return np.asarray(x, np.float32) / 127.5 - 1.0


def pil_square_resize(img, size: int):
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


def read_idx_images(path: str) -> np.ndarray:
  """Reads an idx3 image file (optionally gzip-compressed).

  Args:
    path: an ``*-images-idx3-ubyte[.gz]`` file.

  Returns:
    uint8 ``[N, rows, cols]`` (a fresh, writable array).
  """
  return _read_idx(path, 3)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads an idx1 label file (optionally gzip-compressed).

  Args:
    path: an ``*-labels-idx1-ubyte[.gz]`` file.

  Returns:
    uint8 ``[N]`` (a fresh, writable array).
  """
  return _read_idx(path, 1)


def _read_idx(path: str, dims: int) -> np.ndarray:
  st = os.stat(path)
  arr = _read_idx_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)
  if arr.ndim != dims:
    want = '0x00000803 (uint8 images, 3 dims)' if dims == 3 else '0x00000801 (uint8 labels)'
    raise DataError(f'idx file {path} has the magic of a {arr.ndim}-dim idx file, expected '
                    f'{want}; reinstall with `sudo apt-get install --reinstall '
                    'dataset-fashion-mnist`.')
  return arr.copy()


_IDX_MAGIC = {0x00000803: 3, 0x00000801: 1}   # uint8 images [N, rows, cols] / labels [N]


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
  magic = struct.unpack('>I', raw[:4])[0] if len(raw) >= 4 else None
  dims = _IDX_MAGIC.get(magic)
  if magic is not None and dims is None:
    raise DataError(f'idx file {path} has magic 0x{magic:08x}, expected 0x00000803 (uint8 images, '
                    '3 dims) or 0x00000801 (uint8 labels): not an idx file or corrupt; reinstall '
                    'with `sudo apt-get install --reinstall dataset-fashion-mnist`.')
  header = 4 + 4 * (dims or 3)
  if len(raw) < header:
    raise DataError(f'idx file {path} is truncated ({len(raw)} bytes); reinstall it with '
                    '`sudo apt-get install --reinstall dataset-fashion-mnist`.')
  shape = struct.unpack('>' + 'I' * dims, raw[4:header])
  count = int(np.prod(shape))
  if len(raw) - header < count:
    raise DataError(f'idx file {path} is truncated: header says {"x".join(map(str, shape))} but '
                    f'only {len(raw) - header} data bytes follow; reinstall with '
                    '`sudo apt-get install --reinstall dataset-fashion-mnist`.')
  arr = np.frombuffer(raw, np.uint8, count=count, offset=header).reshape(shape)
  arr.flags.writeable = False
  return arr


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


def load_image_file(path: str, channels: int, size: int) -> np.ndarray:
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
      img = pil_square_resize(img, size)
      arr = np.asarray(img, np.uint8)
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
    raise DataError(f'Cannot read image file {path}: {type(e).__name__}: {e}. Remove or replace '
                    'the file (supported: valid ' + ', '.join(IMAGE_EXTENSIONS) + ').') from e
  return arr.reshape(size, size, channels)
