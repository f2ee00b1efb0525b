"""Typed, validated settings of the pure core, parsed once from the ml_collections config.

The core (scorer, detector) takes these frozen dataclasses, never ``cfg.get(name, default)``.
Every field's default lives in one place, `ddm_ood.default_config`; a config section that lacks
a field (a partial dict in a test, a workdir written by an older version) gets that default here.
Fields of a section that the core does not use (``scorer.batch_size``, ...) are the shell's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from ddm_ood import default_config

MODES = ('forward', 'ddim')
NOISES = ('shared', 'independent')
SSIM_PAIRS = ('x0', 'eps')
SSIM_WEIGHTS = ('one_minus', 'two_minus')
COVARIANCE_TYPES = ('full', 'tied', 'diag', 'spherical')


def _choice(section: str, name: str, value, options) -> None:
  if value not in options:
    raise ValueError(f'config.{section}.{name}={value!r} is not one of {options}.')


def _at_least(section: str, name: str, value, low: int, hint: str = '') -> None:
  if value < low:
    raise ValueError(f'config.{section}.{name} must be >= {low}{hint}, got {value}.')


@dataclasses.dataclass(frozen=True)
class ScorerSettings:
  """``config.scorer`` as the trajectory scorer uses it (see `ddm_ood.default_config`)."""
  mode: str
  num_steps: int
  t_min: int
  noise: str
  num_draws: int
  ssim_pair: str
  ssim_weight: str
  scale_by_sigma: bool
  ssim_filter_size: int
  ssim_filter_sigma: float
  ssim_k1: float
  ssim_k2: float
  chunk: int

  def __post_init__(self):
    _choice('scorer', 'mode', self.mode, MODES)
    _choice('scorer', 'noise', self.noise, NOISES)
    _choice('scorer', 'ssim_pair', self.ssim_pair, SSIM_PAIRS)
    _choice('scorer', 'ssim_weight', self.ssim_weight, SSIM_WEIGHTS)
    _at_least('scorer', 'num_draws', self.num_draws, 1)
    _at_least('scorer', 'chunk', self.chunk, 0, ' (0 = no chunking)')
    _at_least('scorer', 'num_steps', self.num_steps, 1)
    _at_least('scorer', 't_min', self.t_min, 0, ' (0 = every grid timestep)')

  def ssim_kwargs(self) -> dict:
    """Keyword arguments of `ssim.ssim_map` (filter and stabilising constants)."""
    return dict(filter_size=self.ssim_filter_size, filter_sigma=self.ssim_filter_sigma,
                k1=self.ssim_k1, k2=self.ssim_k2)


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """``config.detector`` as the density models use it (see `ddm_ood.default_config`)."""
  n_components: tuple[int, ...]
  covariance_types: tuple[str, ...]
  cv_folds: int
  kde_bandwidth: float | str
  max_iter: int
  reg_covar: float
  kde_standardize: bool
  sklearn_threads: int

  def __post_init__(self):
    if not self.n_components or not self.covariance_types:
      raise ValueError('config.detector.n_components and config.detector.covariance_types must '
                       'be non-empty.')
    for c in self.covariance_types:
      if c not in COVARIANCE_TYPES:
        raise ValueError(f'Unknown covariance type {c!r} in config.detector.covariance_types; '
                         f'expected one of {COVARIANCE_TYPES}.')
    if min(self.n_components) < 1:
      raise ValueError(f'config.detector.n_components must be >= 1, got {self.n_components}.')
    _at_least('detector', 'cv_folds', self.cv_folds, 2)
    _at_least('detector', 'max_iter', self.max_iter, 1)
    if isinstance(self.kde_bandwidth, str) and self.kde_bandwidth not in ('scott', 'silverman'):
      raise ValueError(f"config.detector.kde_bandwidth must be a float, 'scott' or 'silverman', "
                       f'got {self.kde_bandwidth!r}.')


@functools.cache
def _defaults(section: str) -> Mapping[str, Any]:
  return default_config.get_config()[section].to_dict()


def _as_dict(cfg) -> dict:
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def section(cfg, name: str) -> dict:
  """``config.<name>`` as a plain dict in which every field of `default_config` is present.

  For the boundary functions that read a section field by field (`unet.build_model`, ...): a
  field the given section lacks takes its one default.
  """
  return {**_defaults(name), **_as_dict(cfg)}


def _parse(cls, name: str, cfg):
  if isinstance(cfg, cls):
    return cfg
  given, defaults = section(cfg, name), _defaults(name)
  values = {}
  for field in dataclasses.fields(cls):
    default, value = defaults[field.name], given[field.name]
    if isinstance(default, (tuple, list)):
      value = tuple(value)
    elif isinstance(default, bool):
      value = bool(value)
    elif isinstance(default, int) and not isinstance(value, str):
      value = int(value)
    elif isinstance(default, float) and not isinstance(value, str):
      value = float(value)
    values[field.name] = value
  return cls(**values)


def scorer(cfg) -> ScorerSettings:
  """Parses ``config.scorer`` (a ConfigDict, a dict or already `ScorerSettings`)."""
  return _parse(ScorerSettings, 'scorer', cfg)


def detector(cfg) -> DetectorSettings:
  """Parses ``config.detector`` (a ConfigDict, a dict or already `DetectorSettings`)."""
  return _parse(DetectorSettings, 'detector', cfg)


__all__ = ['ScorerSettings', 'DetectorSettings', 'section', 'scorer', 'detector', 'MODES', 'NOISES',
           'SSIM_PAIRS', 'SSIM_WEIGHTS', 'COVARIANCE_TYPES']
