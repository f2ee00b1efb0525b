"""The training data order: which rows each host reads at each global step.

The batch of step ``s`` is rows ``[i*B, (i+1)*B)`` of the permutation
``default_rng((seed, epoch, 0))`` with ``epoch, i = divmod(s, steps_per_epoch)``; hosts partition
each global batch, so it is the same array for any host count (TFDS shards per host excepted) and
a resumed run continues the exact stream.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from ddm_ood import config_checks
from ddm_ood import data as data_lib
from ddm_ood import sampling


class BatchStream:
  """Deterministic batches: the rows of global step ``s`` are a function of ``s`` alone.

  Two layouts of the training set over ``process_count`` hosts:

  * ``sharded=False`` (in-memory sources; every host holds the full set): one permutation
    ``np.random.default_rng((seed, epoch, 0))`` per epoch, shared by all hosts; the global batch of
    step ``s`` is its rows ``[i G, (i + 1) G)`` (``G = process_count * local_batch_size``) and host
    ``p`` reads the ``p``-th ``local_batch_size`` of its sorted rows. The hosts partition each
    global batch, which is the same array, row for row, for any number of hosts (so training
    is too: each row's noise comes from its global position).
  * ``sharded=True`` (TFDS with ``split_for_jax_process``; each host holds its own shard): each host
    permutes its shard with ``default_rng((seed, epoch, process_index))``.

  The incomplete tail batch of an epoch is skipped. Images are held as uint8.
  """

  def __init__(self, images: np.ndarray, local_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, sharded: bool = False):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
    self.images = images
    self.local_batch_size = int(local_batch_size)
    self.seed, self.process_index = int(seed), int(process_index)
    self.process_count, self.sharded = int(process_count), bool(sharded)
    # Rows one permutation serves per step: this host's only (sharded) or the global batch.
    self._rows_per_step = self.local_batch_size * (1 if sharded else self.process_count)
    if images.shape[0] < self._rows_per_step:
      where = 'on this host' if sharded or process_count == 1 else 'in the training set'
      raise ValueError(f'Only {images.shape[0]} training images {where}, fewer than the batch '
                       f'of {self._rows_per_step} they must fill; lower train.batch_size.')
    self.steps_per_epoch = images.shape[0] // self._rows_per_step
    self._perm_epoch, self._perm = -1, None

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, batch index within the epoch) of global step ``step``."""
    return divmod(int(step), self.steps_per_epoch)

  def batch(self, step: int) -> np.ndarray:
    """This host's rows of the batch of global step ``step``: float32 [B_local, H, W, C]."""
    epoch, index = self.position(step)
    if epoch != self._perm_epoch:
      stream_id = self.process_index if self.sharded else 0
      rng = np.random.default_rng((self.seed, epoch, stream_id))
      self._perm, self._perm_epoch = rng.permutation(self.images.shape[0]), epoch
    start = index * self._rows_per_step
    # Sort the whole global batch, then slice: hosts concatenated in order give the single-host
    # batch row for row (rows pair with per-row noise, so the order matters, not just the set).
    rows = np.sort(self._perm[start:start + self._rows_per_step])
    if not self.sharded:
      rows = rows[self.process_index * self.local_batch_size:
                  (self.process_index + 1) * self.local_batch_size]
    return self.images[rows].astype(np.float32) / 127.5 - 1.0


def check_batch_size(global_batch: int) -> int:
  """Returns the per-host batch size; raises `WorkdirError` (a ValueError) unless it splits over
  devices/hosts."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch % n_dev:
    raise config_checks.WorkdirError(
        f'train.batch_size={global_batch} (global) must be divisible by the number of devices '
        f'({n_dev}); e.g. use {max(n_dev, global_batch // n_dev * n_dev)}.')
  return global_batch // n_proc


def load_training_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """This host's training images of ``config.data.dataset`` as uint8 [N, H, W, C].

  uint8 holds them in 4x less host memory than float32, exactly for 8-bit sources.

  Raises:
    ValueError: the source's images do not have the configured size / channels.
  """
  images = data_lib.load_images(
      config.data.dataset, 'train', config.data, max_examples=config.data.max_train_examples,
      process_split=data_lib.is_process_split(config.data.dataset, jax.process_count()))
  expected = (config.data.image_size, config.data.image_size, config.data.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f'Training images of {config.data.dataset!r} have shape {images.shape}, '
                     f'expected [N, {expected[0]}, {expected[1]}, {expected[2]}].')
  return sampling.images_to_uint8(images)


def make_stream(config: ml_collections.ConfigDict, local_batch: int) -> BatchStream:
  """The `BatchStream` of this host over `load_training_images` (loads the images)."""
  return BatchStream(load_training_images(config), local_batch, config.seed, jax.process_index(),
                     jax.process_count(),
                     sharded=data_lib.is_process_split(config.data.dataset, jax.process_count()))


__all__ = ['BatchStream', 'check_batch_size', 'load_training_images', 'make_stream']
