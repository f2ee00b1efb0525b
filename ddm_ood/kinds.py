"""The feature kinds: one record per kind, the only place that knows what a kind is.

A *base* kind says which trajectory it reads, which per-timestep map ``v_k`` it computes from that
trajectory, whether ``config.scorer.t_min`` cuts its timestep grid, how its power sums are
reduced to features, whether the zero-shot protocol chooses its settings, and its role in the
results. The scorer loops "trajectories the base kinds need -> their maps -> reduce"; evaluation,
the protocol, the report, the memory plan and the API ask this registry.

A *fused* kind ``'a+b'`` is any '+'-joined list of selected base kinds: its statistics are the
parts' statistics side by side (each aggregated on its own, then one detector on all of them),
so e.g. ``'stein+stein_ddim'`` is one detector on both paths' standardised features. The scorer
computes the parts; nothing else is needed to add one (`get` builds it from the name).

=================  ==========  ============  ======  ====  ========  ==================================
kind               trajectory  map v_k       window  dim   selected  role
=================  ==========  ============  ======  ====  ========  ==================================
'stein_ssim'       scorer mode stein_ssim    t_min   6     yes       method: the seed method
                                                                     (SSIM-weighted Stein error)
'stein'            scorer mode stein         t_min   6     yes       ablation: no SSIM weight
'eps_ssim'         scorer mode eps_ssim      t_min   6     yes       ablation: SSIM-weighted eps_theta
'stein_ssim_ddim'  ddim        stein_ssim    t_min   6     yes       ablation: the seed map on
                                                                     DiffPath's path
'stein_ddim'       ddim        stein         t_min   6     yes       ablation: 'stein' on DiffPath's
                                                                     path
'diffpath_6d'      ddim        eps           whole   6     no        baseline: DiffPath 6-D
'diffpath_1d'      ddim        eps           whole   1     no        baseline: DiffPath 1-D (sqrt of
                                                                     the summed squared derivative)
'a+b' (fused)      the parts'  the parts'    t_min   sum   yes       ablation: one detector on the
                                                                     parts' statistics
=================  ==========  ============  ======  ====  ========  ==================================

"scorer mode" is ``config.scorer.mode``: forward noising ('forward', R draws) or the DDIM path.
"selected": the zero-shot protocol chooses the kind's window and aggregation from ID data, and
the kind is a candidate of the protocol's default (`ddm_ood.protocol`); the baselines run as
their authors compute them.
"""

from __future__ import annotations

import dataclasses

MAPS = ('stein_ssim', 'stein', 'eps_ssim', 'eps')
ROLES = ('method', 'ablation', 'baseline')
FUSE = '+'


@dataclasses.dataclass(frozen=True)
class Kind:
  """One feature kind.

  Attributes:
    name: the kind's name in configs and results.
    trajectory: 'mode' (follows ``config.scorer.mode``) or 'ddim' (always DiffPath's DDIM path);
      None for a fused kind.
    map: the per-timestep map v_k, one of `MAPS`; None for a fused kind.
    windowed: whether ``config.scorer.t_min`` (and the selected window) cuts the grid (else the
      whole grid is used).
    reduce: '6d' (the six power-sum features) or '1d' (DiffPath-1D: the square root of the
      summed p = 2 power sums of the derivative, feature 5 of the six).
    role: 'method', 'ablation' or 'baseline'.
    selected: whether the zero-shot protocol chooses its settings (and may pick it as the default).
    parts: the base kinds a fused kind puts side by side; () for a base kind.
  """
  name: str
  trajectory: str | None
  map: str | None
  windowed: bool
  reduce: str
  role: str
  selected: bool
  parts: tuple[str, ...] = ()

  def __post_init__(self):
    base_ok = self.trajectory in ('mode', 'ddim') and self.map in MAPS
    if (not self.parts and not base_ok) or self.role not in ROLES \
        or self.reduce not in ('6d', '1d'):
      raise ValueError(f'Invalid kind {self}.')

  @property
  def fused(self) -> bool:
    return bool(self.parts)

  @property
  def base_kinds(self) -> tuple[str, ...]:
    """The base kinds the scorer computes for this kind: its parts, or itself."""
    return self.parts or (self.name,)

  @property
  def dim(self) -> int:
    """Feature dimension D (before any selected aggregation)."""
    if self.parts:
      return sum(get(p).dim for p in self.parts)
    return 6 if self.reduce == '6d' else 1

  def trajectory_for(self, mode: str) -> str:
    """'forward' or 'ddim': the trajectory a base kind reads under ``config.scorer.mode``."""
    if self.parts:
      raise ValueError(f'Fused kind {self.name!r} reads several trajectories: '
                       f'{self.trajectories_for(mode)}.')
    return mode if self.trajectory == 'mode' else 'ddim'

  def trajectories_for(self, mode: str) -> tuple[str, ...]:
    """Every trajectory this kind reads under ``config.scorer.mode``, in order."""
    return tuple(dict.fromkeys(get(k).trajectory_for(mode) for k in self.base_kinds))

  @property
  def has_pixel_map(self) -> bool:
    """Whether the kind has a per-pixel anomaly map (the seed family's base kinds)."""
    return not self.parts and self.map != 'eps'


_KINDS = (
    Kind('stein_ssim', 'mode', 'stein_ssim', True, '6d', 'method', True),
    Kind('stein', 'mode', 'stein', True, '6d', 'ablation', True),
    Kind('eps_ssim', 'mode', 'eps_ssim', True, '6d', 'ablation', True),
    Kind('diffpath_6d', 'ddim', 'eps', False, '6d', 'baseline', False),
    Kind('diffpath_1d', 'ddim', 'eps', False, '1d', 'baseline', False),
    Kind('stein_ssim_ddim', 'ddim', 'stein_ssim', True, '6d', 'ablation', True),
    Kind('stein_ddim', 'ddim', 'stein', True, '6d', 'ablation', True),
)
REGISTRY = {k.name: k for k in _KINDS}
NAMES = tuple(REGISTRY)
SEED = 'stein_ssim'
BASELINES = tuple(k.name for k in _KINDS if k.role == 'baseline')
MAP_KINDS = tuple(k.name for k in _KINDS if k.has_pixel_map)
DIMS = {k.name: k.dim for k in _KINDS}
FUSABLE = tuple(k.name for k in _KINDS if k.selected and k.windowed and k.reduce == '6d')


def _fused(name: str) -> Kind:
  parts = tuple(name.split(FUSE))
  for p in parts:
    if p not in FUSABLE:
      raise ValueError(f'Fused kind {name!r}: {p!r} cannot be fused; a fused kind joins two or '
                       f'more of {FUSABLE} with {FUSE!r}, e.g. "stein{FUSE}stein_ddim".')
  if len(set(parts)) != len(parts) or len(parts) < 2:
    raise ValueError(f'Fused kind {name!r} must join two or more different kinds.')
  return Kind(name, None, None, True, '6d', 'ablation', True, parts)


def get(name: str) -> Kind:
  """The kind called ``name`` (a registered base kind or a fused 'a+b'); ValueError naming the
  choices for an unknown one."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    pass
  if isinstance(name, str) and FUSE in name:
    return _fused(name)
  raise ValueError(f'Unknown feature kind {name!r}; choose from {NAMES} or fuse several of '
                   f'{FUSABLE} with {FUSE!r} (e.g. "stein{FUSE}stein_ddim").') from None


def check(names) -> tuple[str, ...]:
  """The kinds, in order; ValueError if empty, a bare string, any is unknown or listed twice."""
  if isinstance(names, str):
    raise ValueError(f'feature_kinds must be a sequence of kinds, got the string {names!r}; '
                     f'write ({names!r},).')
  names = tuple(names)
  if not names:
    raise ValueError(f'feature_kinds is empty; choose from {NAMES}.')
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'feature_kinds lists {twice} more than once; list each kind once.')
  for name in names:
    get(name)
  return names


DEFAULT_METHOD = 'zero_shot'   # the results' row of the protocol's pick (`ddm_ood.protocol`)


def default_method(names) -> str:
  """The method to score with when none is named: the zero-shot default where ``names``
  (``config.eval.feature_kinds``) has a selected kind, else the first kind."""
  return DEFAULT_METHOD if any(get(n).selected for n in names) else tuple(names)[0]


def base_kinds(names) -> tuple[str, ...]:
  """The base kinds the scorer must compute for ``names`` (fused kinds' parts), deduplicated in
  order."""
  return tuple(dict.fromkeys(b for n in names for b in get(n).base_kinds))


__all__ = ['Kind', 'MAPS', 'ROLES', 'FUSE', 'REGISTRY', 'NAMES', 'SEED', 'BASELINES', 'MAP_KINDS',
           'DIMS', 'FUSABLE', 'DEFAULT_METHOD', 'get', 'check', 'default_method', 'base_kinds']
