"""The feature kinds: one record per kind, the only place that knows what a kind is.

A kind says which trajectory it reads, which per-timestep map ``v_k`` it computes from that
trajectory, whether ``config.scorer.t_min`` cuts its timestep grid, how its power sums are
reduced to features, and its role in the results. The scorer loops "trajectories the kinds need
-> their maps -> reduce"; evaluation, the report, the API and the tables ask this registry.

=================  ==========  ============  ======  ====  ===========================================
kind               trajectory  map v_k       window  dim   role
=================  ==========  ============  ======  ====  ===========================================
'stein_ssim'       scorer mode stein_ssim    t_min   6     method: the seed method (SSIM-weighted
                                                           Stein error)
'stein'            scorer mode stein         t_min   6     ablation: no SSIM weight
'eps_ssim'         scorer mode eps_ssim      t_min   6     ablation: SSIM-weighted eps_theta
'stein_ssim_ddim'  ddim        stein_ssim    t_min   6     ablation: the seed map on DiffPath's path
'stein_ddim'       ddim        stein         t_min   6     ablation: 'stein' on DiffPath's path
'diffpath_6d'      ddim        eps           whole   6     baseline: DiffPath 6-D
'diffpath_1d'      ddim        eps           whole   1     baseline: DiffPath 1-D (sqrt of the
                                                           summed squared derivative)
=================  ==========  ============  ======  ====  ===========================================

"scorer mode" is ``config.scorer.mode``: forward noising ('forward', R draws) or the DDIM path.
"""

from __future__ import annotations

import dataclasses

MAPS = ('stein_ssim', 'stein', 'eps_ssim', 'eps')
ROLES = ('method', 'ablation', 'baseline')


@dataclasses.dataclass(frozen=True)
class Kind:
  """One feature kind.

  Attributes:
    name: the kind's name in configs and results.
    trajectory: 'mode' (follows ``config.scorer.mode``) or 'ddim' (always DiffPath's DDIM path).
    map: the per-timestep map v_k, one of `MAPS`.
    windowed: whether ``config.scorer.t_min`` cuts the grid (else the whole grid is used).
    reduce: '6d' (the six power-sum features) or '1d' (DiffPath-1D: the square root of the
      summed p = 2 power sums of the derivative, feature 5 of the six).
    role: 'method', 'ablation' or 'baseline'.
  """
  name: str
  trajectory: str
  map: str
  windowed: bool
  reduce: str
  role: str

  def __post_init__(self):
    if self.trajectory not in ('mode', 'ddim') or self.map not in MAPS or self.role not in ROLES \
        or self.reduce not in ('6d', '1d'):
      raise ValueError(f'Invalid kind {self}.')

  @property
  def dim(self) -> int:
    """Feature dimension D."""
    return 6 if self.reduce == '6d' else 1

  def trajectory_for(self, mode: str) -> str:
    """'forward' or 'ddim': the trajectory this kind reads under ``config.scorer.mode``."""
    return mode if self.trajectory == 'mode' else 'ddim'

  @property
  def has_pixel_map(self) -> bool:
    """Whether the kind has a per-pixel anomaly map (the seed family; not the baselines)."""
    return self.map != 'eps'


_KINDS = (
    Kind('stein_ssim', 'mode', 'stein_ssim', True, '6d', 'method'),
    Kind('stein', 'mode', 'stein', True, '6d', 'ablation'),
    Kind('eps_ssim', 'mode', 'eps_ssim', True, '6d', 'ablation'),
    Kind('diffpath_6d', 'ddim', 'eps', False, '6d', 'baseline'),
    Kind('diffpath_1d', 'ddim', 'eps', False, '1d', 'baseline'),
    Kind('stein_ssim_ddim', 'ddim', 'stein_ssim', True, '6d', 'ablation'),
    Kind('stein_ddim', 'ddim', 'stein', True, '6d', 'ablation'),
)
REGISTRY = {k.name: k for k in _KINDS}
NAMES = tuple(REGISTRY)
SEED = 'stein_ssim'
BASELINES = tuple(k.name for k in _KINDS if k.role == 'baseline')
MAP_KINDS = tuple(k.name for k in _KINDS if k.has_pixel_map)
DIMS = {k.name: k.dim for k in _KINDS}


def get(name: str) -> Kind:
  """The kind called ``name``; ValueError naming the choices for an unknown one."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown feature kind {name!r}; choose from {NAMES}.') from None


def check(names) -> tuple[str, ...]:
  """The kinds, deduplicated in order; ValueError if empty, a bare string or any is unknown."""
  if isinstance(names, str):
    raise ValueError(f'feature_kinds must be a sequence of kinds, got the string {names!r}; '
                     f'write ({names!r},).')
  names = tuple(dict.fromkeys(names))
  if not names:
    raise ValueError(f'feature_kinds is empty; choose from {NAMES}.')
  for name in names:
    get(name)
  return names


__all__ = ['Kind', 'MAPS', 'ROLES', 'REGISTRY', 'NAMES', 'SEED', 'BASELINES', 'MAP_KINDS', 'DIMS',
           'get', 'check']
