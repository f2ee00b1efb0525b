"""The named-source registry and :func:`load_images`, the one entry point of the data package."""

from __future__ import annotations

import os
from typing import Callable

import ml_collections
import numpy as np

from ddm_ood import settings
from ddm_ood.data import builtin
from ddm_ood.data import folder
from ddm_ood.data import formats
from ddm_ood.data import resize
from ddm_ood.data import splits
from ddm_ood.data import tfds_source
from ddm_ood.data.errors import DataError

SOURCE_PREFIXES = ('tfds:', 'folder:')


def available_sources() -> list[str]:
  """The registered source names, then the prefixes 'tfds:' and 'folder:'.

  Returns:
    e.g. ['constant', 'digits', 'fashion_mnist', ..., 'tfds:', 'folder:']; the sources with
    classes also take class splits, e.g. 'mnist[0-4]' (`parse_class_split`).
  """
  return sorted(builtin.SOURCES) + list(SOURCE_PREFIXES)


def _unknown(name: str) -> DataError:
  return DataError(
      f'Unknown data source {name!r}. Available: {", ".join(sorted(builtin.SOURCES))}; or '
      f'tfds:NAME with NAME in {", ".join(tfds_source.TFDS_NAMES)}; or folder:/path/to/images.')


def parse_class_split(name: str) -> tuple[str, frozenset[str] | None]:
  """'mnist[0-4]' -> ('mnist', {'0', ..., '4'}); a name without brackets -> (name, None).

  A class split ``NAME[SPEC]`` is a *view* of NAME: the images of NAME whose class SPEC names,
  in NAME's fixed order. ``max_examples=n`` takes the view of NAME's first n images (so the
  view holds fewer than n), and each image keeps its index in NAME (`class_split_indices`): it
  is the same image, with the same id and the same features, as in NAME. SPEC is a
  comma-separated list of class names or integer ranges ``a-b`` (inclusive), matched
  case-insensitively, e.g. ``mnist[0-4]``, ``fashion_mnist[5,7,9]``, ``textures[stone,wood]``.
  Sources with classes: those whose `source_info` lists them.

  Raises:
    DataError: brackets on a source without classes, an unknown class or an empty SPEC.
  """
  if not (isinstance(name, str) and name.endswith(']') and '[' in name) or \
      name.startswith(SOURCE_PREFIXES):
    return name, None
  base, spec = name[:-1].split('[', 1)
  source = builtin.SOURCES.get(base)
  if source is None or source.classes is None:
    with_classes = sorted(n for n, s in builtin.SOURCES.items() if s.classes is not None)
    raise DataError(f'Source {name!r}: class splits NAME[CLASSES] exist for '
                    f'{", ".join(with_classes)}, not for {base!r}.')
  names = source.classes.names()
  lower = {n.lower(): n for n in names}
  wanted = set()
  for item in (p.strip().lower() for p in spec.split(',')):
    lo, sep, hi = item.partition('-')
    if sep and lo.isdigit() and hi.isdigit():
      items = [str(i) for i in range(int(lo), int(hi) + 1)]
    else:
      items = [item]
    for it in items:
      if it not in lower:
        raise DataError(f'Source {name!r}: unknown class {it!r} of {base!r}; its classes are '
                        f'{", ".join(names)} (ranges a-b allowed).')
      wanted.add(lower[it])
  if not wanted:
    raise DataError(f'Source {name!r} names no class; e.g. {base}[{names[0]}].')
  return base, frozenset(wanted)


def check_source_name(name: str) -> None:
  """Raises :class:`DataError` if ``name`` is not a valid source name (cheap: loads nothing).

  A 'folder:PATH' must name an existing directory; registered sources are not probed.

  Args:
    name: a registered name, a class split 'NAME[CLASSES]' (`parse_class_split`), 'tfds:NAME'
      or 'folder:PATH'.
  """
  if not isinstance(name, str):
    raise _unknown(repr(name))
  if name in builtin.SOURCES:
    return
  if parse_class_split(name)[1] is not None:
    return
  if name.startswith('tfds:'):
    if name[5:] not in tfds_source.TFDS_NAMES:
      raise DataError(f'Unsupported TFDS dataset {name[5:]!r}; supported: '
                      f'{", ".join("tfds:" + n for n in tfds_source.TFDS_NAMES)}.')
    return
  if name.startswith('folder:'):
    if not name[7:]:
      raise DataError("'folder:' needs a path, e.g. folder:/path/to/images.")
    if not os.path.isdir(os.path.expanduser(name[7:])):
      raise DataError(f'Image folder {name[7:]!r} (source {name!r}) does not exist or is not a '
                      'directory; pass an existing folder, e.g. folder:/path/to/images.')
    return
  raise _unknown(name)


def class_split_indices(name: str, split: str, data_cfg, max_examples: int = 0,
                        seed: int = 0) -> np.ndarray:
  """Indices (int64, ascending) into NAME's split of the images of the class split
  ``NAME[SPEC]`` among NAME's first ``max_examples`` (0 = all); ``arange`` for a plain source
  of ``max_examples`` images. Cheap: reads labels, not pixels."""
  base, wanted = parse_class_split(name)
  if wanted is None:
    return np.arange(max_examples, dtype=np.int64)
  classes = builtin.SOURCES[base].classes
  names = classes.names()
  labels = np.asarray(classes.labels(split, data_cfg, seed))
  labels = labels[:splits.limit(len(labels), max_examples)]
  return np.flatnonzero(np.isin(labels, [names.index(w) for w in wanted]))


def source_info(name: str) -> str:
  """One line describing a source: what it is and how to get it.

  Args:
    name: a registered name, 'tfds:' / 'tfds:NAME', or 'folder:' / 'folder:PATH'.
  """
  if name in builtin.SOURCES:
    return builtin.SOURCES[name].info
  base, wanted = parse_class_split(name)
  if wanted is not None:
    return (f'The images of the classes {", ".join(sorted(wanted))} of {base!r} (a view: same '
            f'order, indices and features as there): {builtin.SOURCES[base].info}')
  tfds_names = tfds_source.TFDS_NAMES
  if name == 'tfds:' or (name.startswith('tfds:') and name[5:] in tfds_names):
    which = name[5:] or 'NAME'
    return (f'TensorFlow Datasets {which} (NAME in {", ".join(tfds_names)}); needs tensorflow + '
            'tensorflow-datasets and prepared data (--config.data.data_dir); CelebA is center-'
            'cropped to 140x140, then every image is antialiased-resized to image_size.')
  if name.startswith('folder:'):
    where = name[7:] or 'PATH'
    extensions = "/".join(e[1:] for e in formats.IMAGE_EXTENSIONS)
    return (f'Every {extensions} image under {where} (recursive; '
            'train/ and test/ subfolders select the split), center-cropped to a square and '
            'resized to image_size.')
  check_source_name(name)  # raises the helpful error
  raise _unknown(name)


def native_size(name: str) -> int:
  """The smaller side of the source's own images (0 when it has none: synthetic sources, texture
  crops, TFDS dtd). A folder's is the smallest over its image files (headers only)."""
  check_source_name(name)
  name = parse_class_split(name)[0]   # a class split has its parent's images
  if name in builtin.SOURCES:
    return builtin.SOURCES[name].native_size
  if name.startswith('tfds:'):
    return tfds_source.TFDS_NATIVE_SIZES.get(name[5:], 0)
  return folder.smallest_side(name[7:])


def resolve_resize_via(data_cfg: ml_collections.ConfigDict, names) -> int:
  """``config.data.resize_via`` with -1 ('auto') resolved for the sets ``names``.

  DiffPath's "correct resizing" generalised to any model size: when some set is smaller than the
  model (``image_size``), every set is first resized to the smallest native size among ``names``
  (`native_size`), then to ``image_size``, so that no set keeps more detail than another (for the
  ImageNet-64 model and 32x32 sets this is DiffPath's 32 -> 64). 0 when no set is smaller.

  Returns:
    The size to resize through (0 = none); ``resize_via`` itself when it is not -1.
  """
  via = int(settings.section(data_cfg, 'data')['resize_via'])
  if via != -1:
    return via
  sizes = [s for s in (native_size(n) for n in names) if s]
  smallest = min(sizes, default=0)
  return smallest if 0 < smallest < int(data_cfg.image_size) else 0


def suite_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.data`` with ``resize_via`` -1 ('auto') resolved over every set of the suite
  (``config.eval.id_datasets``, ``ood_datasets`` and the sets of ``near_ood_pairs``): the sets
  the detectors compare, and the files ``--mode=score`` scores, are resized alike."""
  ev = settings.section(config.eval, 'eval')
  names = (tuple(ev['id_datasets']) + tuple(ev['ood_datasets'])
           + tuple(n for pair in ev['near_ood_pairs'] for n in pair))
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.resize_via = resolve_resize_via(config.data, names)
  return data_cfg


def _source(name: str, process_split: bool) -> Callable[..., np.ndarray]:
  check_source_name(name)
  if name in builtin.SOURCES:
    return builtin.SOURCES[name].load
  base, wanted = parse_class_split(name)
  if wanted is not None:
    def load_view(split, cfg, max_examples, seed):
      idx = class_split_indices(name, split, cfg, max_examples, seed)
      if not idx.size:
        return np.zeros((0, 1, 1, 1), np.float32)
      return builtin.SOURCES[base].load(split, cfg, int(idx[-1]) + 1, seed)[idx]
    return load_view
  if name.startswith('tfds:'):
    return tfds_source.tfds_loader(name[5:], process_split)
  return folder.folder_loader(name[7:])


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
      first, then to image_size; -1 ('auto') must be resolved over the compared sets first
      (`resolve_resize_via`), here it is resolved for this set alone).
    max_examples: > 0: only the first ``max_examples`` images of the source's fixed order.
    seed: seeds the random texture crops and synthetic controls (natural sources ignore it).
    process_split: TFDS only: read this JAX process's shard (``tfds.split_for_jax_process``)
      for multi-host input; other sources always return the full split.

  Returns:
    float32 ``[N, image_size, image_size, channels]`` in ``[-1, 1]``.

  Raises:
    DataError: unknown source or split, missing or corrupt data (the message says what to do).
  """
  splits.check_split(split)
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
    x = formats.to_channels(x, channels)  # cheaper before resizing
  via = resolve_resize_via(data_cfg, (name,))
  if via:  # DiffPath's "correct resizing": no set keeps more detail than a via x via image
    x = resize.resize_images(x, via)
  x = resize.resize_images(x, size)
  x = formats.to_channels(x, channels)
  x = np.clip(x, -1.0, 1.0, out=x)
  return np.ascontiguousarray(x, dtype=np.float32)
