"""Cheap checks of a whole config and every named source, before a run writes anything.

`validate_config` runs before JAX starts (``python -m ddm_ood.main``) and again when a run opens its
workdir (`workdir.opened`): names, folders that exist and hold images (nothing is loaded), every
field's range, so that a typo fails in seconds instead of after training. Errors are
`WorkdirError`, one line each naming the field and what to do.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ddm_ood import data as data_lib
from ddm_ood import settings


class WorkdirError(ValueError):
  """A user-facing problem with the config or the workdir; the message says what to do."""


class SourceError(WorkdirError, data_lib.DataError):
  """A named data source that does not exist (also a `data.DataError`, as the loaders raise)."""


def _check_source(name: Any, splits: tuple[str, ...], what: str) -> None:
  try:
    data_lib.check_source_name(name)
    if isinstance(name, str) and name.startswith('folder:'):
      for split in splits:  # lists files only: cheap, and an empty folder fails here
        data_lib.folder_files(name[len('folder:'):], split)
  except data_lib.DataError as e:
    raise SourceError(f'{what}: {e}') from e


def validate_config(config: ml_collections.ConfigDict, mode: str = 'all') -> None:
  """Cheap checks of the whole config and every named source, before any work starts.

  Args:
    config: the full config.
    mode: 'train', 'evaluate' or 'all' (evaluation settings are checked unless 'train'; training
      settings unless 'evaluate').

  Raises:
    WorkdirError: the first problem found, naming the field and what to do.
  """
  from ddm_ood import kinds  # pylint: disable=g-import-not-at-top
  from ddm_ood import schedule  # pylint: disable=g-import-not-at-top
  from ddm_ood import network  # pylint: disable=g-import-not-at-top
  from ddm_ood import unet  # pylint: disable=g-import-not-at-top
  d = config.data
  if int(d.image_size) <= 0:
    raise WorkdirError(f'config.data.image_size must be positive, got {d.image_size}.')
  if int(d.channels) not in (1, 3):
    raise WorkdirError(f'config.data.channels must be 1 (gray) or 3 (RGB), got {d.channels}.')
  if int(settings.section(d, 'data')['resize_via']) < -1:
    raise WorkdirError(f'config.data.resize_via must be -1 (auto), 0 (off) or a size, got '
                       f'{d.resize_via}.')
  m = settings.section(config.model, 'model')
  try:
    unet.family(config)
    schedule.check_prediction_type(m['prediction_type'])
    network.check_attention(m['attention'])
  except ValueError as e:
    raise WorkdirError(str(e)) from e
  if config.diffusion.schedule not in schedule.SCHEDULES:
    raise WorkdirError(f'Unknown config.diffusion.schedule {config.diffusion.schedule!r}; '
                       f'choose one of {schedule.SCHEDULES}.')
  try:
    network.check_precision(m['precision'])
  except ValueError as e:
    raise WorkdirError(f"{e} 'highest' = full float32 matmuls on GPU / TPU.") from e
  if int(config.diffusion.num_timesteps) <= 0:
    raise WorkdirError('config.diffusion.num_timesteps must be positive, got '
                       f'{config.diffusion.num_timesteps}.')
  if mode in ('train', 'all'):
    tc = config.train
    for field in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
      if int(tc[field]) <= 0:
        raise WorkdirError(f'config.train.{field} must be a positive integer, got {tc[field]}.')
    lr = float(tc.learning_rate)
    if not (math.isfinite(lr) and lr > 0):
      raise WorkdirError(f'config.train.learning_rate must be a positive number, got {lr} '
                         '(e.g. 1e-4 .. 1e-3).')
    for field in ('warmup_steps', 'sample_every', 'num_samples'):
      if int(tc[field]) < 0:
        raise WorkdirError(f'config.train.{field} must be >= 0, got {tc[field]}.')
    if not 0 <= float(tc.ema_decay) < 1:
      raise WorkdirError(f'config.train.ema_decay must be in [0, 1), got {tc.ema_decay}.')
    _check_source(d.dataset, ('train',), 'config.data.dataset')
  if mode in ('evaluate', 'all'):
    ev = config.eval
    for field in ('id_datasets', 'ood_datasets', 'feature_kinds', 'near_ood_pairs'):
      _check_unique(f'eval.{field}', [tuple(v) if isinstance(v, (list, tuple)) else v
                                      for v in settings.section(ev, 'eval')[field]])
    try:
      kinds.check(ev.feature_kinds)
    except ValueError as e:
      raise WorkdirError(f'config.eval.feature_kinds: {e}') from e
    if not ev.id_datasets:
      raise WorkdirError('config.eval.id_datasets is empty; name at least one ID set.')
    for field in ('num_fit', 'num_test'):
      if int(ev[field]) < 0:
        raise WorkdirError(f'config.eval.{field} must be >= 0 (0 = all), got {ev[field]}.')
    if int(config.scorer.batch_size) <= 0:
      raise WorkdirError('config.scorer.batch_size must be a positive integer, got '
                         f'{config.scorer.batch_size}.')
    for name in ev.id_datasets:
      _check_source(name, ('train', 'test'), 'config.eval.id_datasets')
    for name in ev.ood_datasets:
      _check_source(name, ('test',), 'config.eval.ood_datasets')
    for pair in settings.section(ev, 'eval')['near_ood_pairs']:
      if isinstance(pair, str) or len(pair) != 2:
        raise WorkdirError(f'config.eval.near_ood_pairs: {pair!r} is not an (ID, OOD) pair; write '
                           "e.g. (('mnist[0-4]', 'mnist[5-9]'),).")
      _check_source(pair[0], ('train', 'test'), 'config.eval.near_ood_pairs (ID)')
      _check_source(pair[1], ('test',), 'config.eval.near_ood_pairs (OOD)')
    try:
      settings.scorer(config.scorer)
    except ValueError as e:
      raise WorkdirError(str(e)) from e
    _check_select(config.select)


def _check_unique(field: str, values) -> None:
  repeated = sorted({v for v in values if list(values).count(v) > 1})
  if repeated:
    raise WorkdirError(
        f'config.{field} names {repeated} more than once ({tuple(values)}): each would be '
        'evaluated and counted in the averages twice. List each once; note that repeating a '
        f'--config.{field}=... flag appends to the tuple instead of replacing it.')


def _check_subset(field: str, values, allowed) -> None:
  bad = [v for v in values if v not in allowed]
  if bad or not values:
    raise WorkdirError(f'config.{field}={tuple(values)} must be a non-empty subset of {allowed}'
                       + (f'; unknown: {bad}.' if bad else '.'))


def _check_select(sel) -> None:
  """config.select: the zero-shot protocol's candidates."""
  from ddm_ood import features, synthetic  # pylint: disable=g-import-not-at-top
  _check_subset('select.aggregations', sel.aggregations, features.AGGREGATIONS)
  if not sel.t_min_fractions or any(not 0 <= f < 1 for f in sel.t_min_fractions):
    raise WorkdirError(f'config.select.t_min_fractions={tuple(sel.t_min_fractions)} must be '
                       'fractions of T in [0, 1), e.g. (0.0, 0.1, 0.2).')
  _check_subset('select.corruptions', sel.corruptions, synthetic.CORRUPTIONS)
  sel = settings.section(sel, 'select')
  if not sel['complexity'] or any(not isinstance(c, bool) for c in sel['complexity']):
    raise WorkdirError(f"config.select.complexity={tuple(sel['complexity'])} must be a non-empty "
                       'tuple of booleans, e.g. (False, True).')
  if not 0 < float(sel['criterion_quantile']) <= 1:
    raise WorkdirError(f"config.select.criterion_quantile={sel['criterion_quantile']} must be in "
                       '(0, 1] (1 = the mean over corruptions).')
  if int(sel['anomalies_per_image']) < 1:
    raise WorkdirError(f"config.select.anomalies_per_image={sel['anomalies_per_image']} must be "
                       '>= 1.')
  if int(sel['num_val']) < 10:
    raise WorkdirError(f"config.select.num_val={sel['num_val']}: the zero-shot selection needs "
                       'at least 10 held-out ID-train images per ID set.')
  if int(sel['localisation_images']) < 0:
    raise WorkdirError('config.select.localisation_images must be >= 0 (0 = off).')


__all__ = ['WorkdirError', 'SourceError', 'validate_config']
