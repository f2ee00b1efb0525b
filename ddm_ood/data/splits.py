"""Fixed orders, train/test splits and seeded generators shared by the sources."""

from __future__ import annotations

import zlib

import numpy as np

from ddm_ood.data.errors import DataError

SPLITS = ('train', 'test')

_SPLIT_SEED = 1234           # fixed permutations / train-test splits of the natural sources


def fixed_permutation(n: int) -> np.ndarray:
  """The fixed-seed permutation of ``range(n)`` that orders every natural source."""
  return np.random.default_rng(_SPLIT_SEED).permutation(n)


def split_indices(n: int, split: str, train_fraction: float) -> np.ndarray:
  """Deterministic split of ``range(n)``: a fixed permutation, the first fraction is 'train'."""
  perm = fixed_permutation(n)
  n_train = int(round(n * train_fraction))
  return perm[:n_train] if split == 'train' else perm[n_train:]


def split_rng(seed: int, tag: str, split: str) -> np.random.Generator:
  """A generator seeded by (seed, source tag, split): train and test draws differ."""
  return np.random.default_rng([int(seed) % 2**32, zlib.crc32(tag.encode()),
                                SPLITS.index(split)])


def limit(n: int, max_examples: int) -> int:
  """How many of ``n`` images to keep: ``max_examples`` when > 0, else all."""
  return min(n, max_examples) if max_examples and max_examples > 0 else n


def check_split(split: str) -> None:
  """Raises :class:`DataError` unless ``split`` is 'train' or 'test'."""
  if split not in SPLITS:
    raise DataError(f"Unknown split {split!r}; use 'train' or 'test'.")
