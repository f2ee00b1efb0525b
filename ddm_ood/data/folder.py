"""``folder:PATH`` sources: every image file under a folder, in a fixed order."""

from __future__ import annotations

import os

import numpy as np

from ddm_ood.data import formats
from ddm_ood.data import splits
from ddm_ood.data.errors import DataError


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
                 if f.lower().endswith(formats.IMAGE_EXTENSIONS))
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
  splits.check_split(split)
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
                    f'{", ".join(formats.IMAGE_EXTENSIONS)}.')
  return [files[i] for i in splits.fixed_permutation(len(files))]


def smallest_side(path: str) -> int:
  """The smallest min(width, height) over the image files under ``path`` (headers only; 0 if
  none can be read)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sides = []
  for f in _image_files(path):
    try:
      with Image.open(f) as img:
        sides.append(min(img.size))
    except Exception:  # pylint: disable=broad-except  # unreadable files fail when loaded
      continue
  return min(sides, default=0)


def folder_loader(path: str):
  """The loader ``(split, cfg, max_examples, seed) -> [N, S, S, C]`` of ``folder:path``."""
  def load(split, cfg, max_examples, seed):
    del seed
    files = folder_files(path, split)
    files = files[:splits.limit(len(files), max_examples)]
    size, c = int(cfg.image_size), int(cfg.channels)
    out = np.empty((len(files), size, size, c), np.float32)
    for i, f in enumerate(files):
      out[i] = formats.uint8_to_unit(formats.load_image_file(f, c, size))
    return out
  return load
