"""The embeddable API: a trained workdir as one pure JAX function ``images -> anomaly scores``.

Example::

  from ddm_ood import api
  ood = api.load_anomaly_scorer('runs/fashion_mnist', id_dataset='fashion_mnist')
  scores = ood(images)                       # [B] float32, higher = more out-of-distribution
  # or, inside your own jitted pipeline:
  f = api.make_anomaly_fn(ood.apply_fn, ood.schedule, ood.config.scorer, ood.scorer_kind,
                          ood.draws, ood.complexity)
  scores = jax.jit(f)(ood.unet_params, ood.detector_params, images, image_ids, ood.key)

Scoring needs neither TensorFlow nor scikit-learn: the detector is plain arrays. The loaders
turn on JAX's persistent compilation cache (`compile_cache`; ``DDM_OOD_COMPILATION_CACHE=off``
keeps it off), so a restarted notebook does not compile the scorer again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddm_ood import checkpoint
from ddm_ood import compile_cache
from ddm_ood import complexity as complexity_lib
from ddm_ood import detector
from ddm_ood import features as features_lib
from ddm_ood import kinds as kinds_lib
from ddm_ood import pixel_maps
from ddm_ood import provenance
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer
from ddm_ood import settings
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib


def make_anomaly_fn(apply_fn: Callable, schedule: schedule_lib.Schedule,
                    scorer_cfg: ml_collections.ConfigDict, kind: str = 'stein_ssim',
                    draws: str | None = None, complexity: bool = False) -> Callable:
  """Builds the pure function ``(unet_params, detector_params, images, image_ids, key) -> scores``.

  Args:
    apply_fn: ``apply_fn(params, x_t [N,H,W,C], t [N]) -> eps_theta`` (eval mode).
    schedule: the diffusion schedule the network was trained with.
    scorer_cfg: ``config.scorer``.
    kind: feature kind the detector was fitted on (`ddm_ood.kinds`; a fused 'a+b' too).
    draws: None when the detector was fitted on the kind's features (the DiffPath baselines);
      'all' or 'first' when it was fitted on aggregated per-timestep statistics (the selected
      kinds: ``detector_params`` is then ``(reducer, detector params)``, see
      `ddm_ood.features` and `ddm_ood.selection.Setting`).
    complexity: whether the image's complexity statistics (`ddm_ood.complexity`) are part of
      the statistics (``Setting.complexity``; only with ``draws``).

  Returns:
    A jittable function; ``images`` [B, H, W, C] float in [-1, 1], ``image_ids`` [B] int32 or
    None (the trajectory noise of an image is derived from its id, never from its batch position;
    None = `scorer.content_ids`, a hash of the pixels) and
    ``key`` a `jax.random.key`; returns anomaly scores [B] (higher = more out-of-distribution).
  """
  score_fn = scorer.make_trajectory_scorer(apply_fn, schedule, scorer_cfg, (kind,))
  base = kinds_lib.get(kind).base_kinds
  if draws is None and (len(base) > 1 or complexity):
    raise ValueError(f'kind {kind!r} with complexity={complexity} needs draws (its detector is '
                     'fitted on per-timestep statistics).')

  def anomaly_fn(unet_params, detector_params, images, image_ids, key):
    if image_ids is None:
      image_ids = scorer.content_ids(images)
    out = score_fn(unet_params, images, image_ids, key)
    if draws is None:
      return detector.anomaly_score(detector_params, out['features'][kind])
    reducer, det_params = detector_params
    stats = features_lib.kind_stats(
        out['per_draw'], out['per_draw_deriv'], base, draws,
        complexity_lib.image_complexity(images) if complexity else None)
    return detector.anomaly_score(det_params, features_lib.reduce(reducer, stats))

  return anomaly_fn


@dataclasses.dataclass
class AnomalyScorer:
  """A trained DDM plus a fitted detector; call it on images to get anomaly scores.

  ``__call__`` validates its input and runs a jitted pure function; the pieces are exposed for
  users who embed `make_anomaly_fn` in their own jitted code.
  """
  config: ml_collections.ConfigDict
  kind: str
  id_dataset: str
  step: int
  unet_params: Any
  detector_params: Any          # DetectorParams, or (Reducer, DetectorParams) when draws is set
  apply_fn: Callable
  schedule: schedule_lib.Schedule
  key: jax.Array
  draws: str | None = None      # see make_anomaly_fn
  scorer_kind: str | None = None  # the kind the detector reads ('stein_ssim@oracle' ->
                                  # 'stein_ssim'; 'zero_shot' -> the kind the protocol picked)
  complexity: bool = False      # see make_anomaly_fn
  provenance: dict | None = None  # `provenance.record` of unet_params and config (checked)

  def __post_init__(self):
    self._fn = jax.jit(make_anomaly_fn(self.apply_fn, self.schedule, self.config.scorer,
                                       self.scorer_kind or self.kind, self.draws,
                                       self.complexity))

  def __call__(self, images, image_ids=None) -> np.ndarray:
    """Anomaly scores [B] of images [B, H, W, C] in [-1, 1].

    ``image_ids`` [B] int32 are optional: by default each image's id is a hash of its pixels
    (`scorer.content_ids`), so an image's score never depends on its batch or position.
    """
    images = np.asarray(images)
    scorer.validate_images(images, self.config.data.image_size, self.config.data.channels)
    if image_ids is not None:
      image_ids = np.asarray(image_ids, np.int32)
      if image_ids.shape != (images.shape[0],):
        raise ValueError(f'image_ids must have shape [{images.shape[0]}], got {image_ids.shape}.')
    if images.shape[0] == 0:
      return np.zeros((0,), np.float32)
    return np.asarray(self._fn(self.unet_params, self.detector_params,
                               jnp.asarray(images, jnp.float32), image_ids, self.key))


def _open(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(absolute workdir, its config); compiles from here on use the persistent compilation cache
  (`compile_cache.ensure`: the default folder unless this process chose otherwise)."""
  compile_cache.ensure()
  workdir = os.path.abspath(workdir)
  return workdir, workdir_lib.load_config(workdir)


def load_anomaly_scorer(workdir: str, id_dataset: str | None = None,
                        kind: str | None = None) -> AnomalyScorer:
  """Loads the EMA parameters and the detector fitted on ``id_dataset`` by the evaluate mode.

  Args:
    workdir: a workdir that `python -m ddm_ood.main` trained and evaluated.
    id_dataset: which in-distribution set's detector to use (default: the first ID set).
    kind: a method of the results (default: the zero-shot default, 'zero_shot', i.e. the kind
      and settings the ID-only protocol picked for ``id_dataset``; also e.g. 'stein_ssim',
      'stein+stein_ddim', 'stein_ssim@published', 'stein_ssim@oracle', 'diffpath_6d').

  Raises:
    provenance.StaleDetectorError: the detector was fitted on another checkpoint or other scorer
      settings than the workdir now holds (e.g. training went on after evaluate); the message
      names the command that refits it.
  """
  workdir, config = _open(workdir)
  id_dataset = id_dataset or config.eval.id_datasets[0]
  kind = kind or kinds_lib.default_method(config.eval.feature_kinds)
  path = workdir_lib.detector_path(workdir, id_dataset, kind)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No fitted detector for ID set {id_dataset!r} and kind {kind!r} at {path}. Run '
        f'`python -m ddm_ood.main --mode=evaluate --workdir={workdir} --config=...` with that ID '
        'set in config.eval.id_datasets and that kind in config.eval.feature_kinds.')
  fitted = workdir_lib.load_detector(path)
  params, step = checkpoint.restore_ema_params(workdir, config)
  current = provenance.record(step, provenance.params_digest(params), config)
  provenance.check(fitted.info.get('provenance') or provenance.legacy_record(workdir), current,
                   f'The detector of --id_dataset={id_dataset} --kind={kind} ({path})', workdir)
  model = unet.build_model(config)
  sched = schedule_lib.schedule_for(config.diffusion)
  setting = fitted.info.get('setting') if fitted.reducer is not None else None
  det_params = fitted.params if fitted.reducer is None else (fitted.reducer, fitted.params)
  return AnomalyScorer(config=config, kind=kind, id_dataset=id_dataset, step=step,
                       unet_params=params, detector_params=det_params,
                       apply_fn=lambda p, x, t: model.apply(p, x, t), schedule=sched,
                       key=workdir_lib.scorer_key(config.seed),
                       draws=setting['draws'] if setting else None,
                       scorer_kind=setting['kind'] if setting else kind.split('@')[0],
                       complexity=bool(setting.get('complexity', False)) if setting else False,
                       provenance=current)


def load_denoiser(workdir: str) -> tuple[Callable, ml_collections.ConfigDict]:
  """The workdir's EMA network as a jittable noise predictor (trained or converted workdirs).

  Example::

    eps_fn, config = api.load_denoiser('runs/diffpath_celeba')
    eps = eps_fn(x_t, t)                                   # eager: runs the compiled network
    eps = jax.jit(lambda f, x, t: f(x, t))(eps_fn, x_t, t)  # inside your own jit

  ``eps_fn`` is a `jax.tree_util.Partial` holding the weights: pass it as an argument of your
  jitted function (as above) so the weights stay device buffers; closing over it in ``jax.jit``
  also works but bakes the weights into the program as constants (slow to compile when large).

  Args:
    workdir: a workdir that `python -m ddm_ood.main` trained or `python -m ddm_ood.convert` wrote.

  Returns:
    ``(eps_fn, config)``: ``eps_fn(x_t [B, H, W, C] float32, t [B] int32) -> eps [B, H, W, C]``
    float32, with ``t`` the original timesteps ``0 .. config.diffusion.num_timesteps - 1`` (a
    converted model's timestep rescaling and learned-variance channels are handled inside), and
    the workdir's config.
  """
  workdir, config = _open(workdir)
  params, _ = checkpoint.restore_ema_params(workdir, config)
  model = unet.build_model(config)
  return jax.tree_util.Partial(model.apply, params), config


def _features(score_fn: Callable, params, key, images, image_ids) -> dict:
  return score_fn(params, images, image_ids, key)['features']


def load_feature_fn(workdir: str, kinds=('stein_ssim',)) -> Callable:
  """The workdir's trajectory features as a jittable function (no detector needed).

  Args:
    workdir: a trained or converted workdir.
    kinds: feature kinds (`scorer.FEATURE_KINDS`), e.g. ``('diffpath_6d', 'diffpath_1d')``.

  Returns:
    ``fn(images [B, H, W, C] float32 in [-1, 1], image_ids [B] int32) -> {kind: [B, D_kind]}``
    float32, computed with the workdir's ``config.scorer`` and the evaluate mode's noise key, so
    an image with the same id gets the features the suite computes. A `jax.tree_util.Partial`
    holding the weights (see `load_denoiser` for use inside ``jax.jit``).
  """
  if isinstance(kinds, str):
    kinds = (kinds,)
  workdir, config = _open(workdir)
  scorer.check_scorer_config(config.scorer, tuple(kinds))
  params, _ = checkpoint.restore_ema_params(workdir, config)
  model = unet.build_model(config)
  sched = schedule_lib.schedule_for(config.diffusion)
  score_fn = scorer.make_trajectory_scorer(model.apply, sched, config.scorer, tuple(kinds))
  return jax.tree_util.Partial(functools.partial(_features, score_fn), params,
                               workdir_lib.scorer_key(config.seed))


# ------------------------------------------------------------------------------ anomaly maps

ANOMALY_MAP_OUTPUTS = ('map', 'baseline', 'both')


def build_anomaly_map_fn(config: ml_collections.ConfigDict, apply_fn: Callable,
                         schedule: schedule_lib.Schedule, params, key: jax.Array,
                         timestep_weights=None, kind: str = 'stein_ssim',
                         output: str = 'map') -> Callable:
  """Host-friendly per-pixel anomaly maps (`pixel_maps.make_anomaly_map_fn`) for given weights.

  Args:
    config: the workdir's config (data.image_size, data.channels, scorer).
    apply_fn: eval-mode network ``(params, x_t, t) -> eps_theta``.
    schedule: the diffusion schedule the network was trained with.
    params: network parameters.
    key: the scorer's noise key (`workdir_lib.scorer_key(config.seed)` gives the suite's noise).
    timestep_weights: None (1 on each of ``kind``'s timesteps ``t_k >= t_min``: the map splits
      the plain-sum p = 2 statistic over pixels), or per-timestep weights [K_kind] on
      `scorer.kind_timesteps` or [K] on the whole grid: pass a fitted detector's per-timestep
      weights (e.g. ``1 / std_k`` of the ID-train power sums) to map that detector's evidence.
    kind: a kind of `pixel_maps.MAP_KINDS`.
    output: 'map' (the kind's SSIM-weighted map), 'baseline' (squared Stein error, no SSIM) or
      'both'.

  Returns:
    ``fn(images [B, H, W, C] float in [-1, 1], image_ids [B] int or None) -> [B, H, W]`` float32
    numpy (a dict {'map', 'baseline'} for output='both'); higher = more anomalous. ``image_ids``
    default to `scorer.content_ids` (a hash of the pixels), so a map never depends on the batch.
    Images are scored in compiled batches of ``config.scorer.batch_size`` (the last one padded).
  """
  if output not in ANOMALY_MAP_OUTPUTS:
    raise ValueError(f'output={output!r} is not one of {ANOMALY_MAP_OUTPUTS}.')
  weights = jnp.asarray(pixel_maps.anomaly_map_weights(schedule.num_timesteps, config.scorer,
                                                       kind, timestep_weights))
  map_fn = jax.jit(pixel_maps.make_anomaly_map_fn(apply_fn, schedule, config.scorer, kind))
  batch = max(1, int(settings.section(config.scorer, 'scorer')['batch_size']))

  def fn(images, image_ids=None):
    x = scorer.validate_images(images, config.data.image_size, config.data.channels)
    n = x.shape[0]
    if n == 0:
      empty = np.zeros((0,) + x.shape[1:3], np.float32)
      return {'map': empty, 'baseline': empty} if output == 'both' else empty
    if image_ids is None:
      ids = np.asarray(scorer.content_ids(x), np.int32)
    else:
      ids = np.asarray(image_ids, np.int32)
      if ids.shape != (n,):
        raise ValueError(f'image_ids must have shape [{n}], got {ids.shape}.')
    size = min(batch, n)
    parts = []
    for s in range(0, n, size):
      xb, ib = x[s:s + size], ids[s:s + size]
      pad = size - len(xb)
      if pad:   # one compiled shape: pad the last batch, drop the padded rows after
        xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        ib = np.concatenate([ib, np.zeros(pad, np.int32)])
      out = map_fn(params, jnp.asarray(xb), jnp.asarray(ib), key, weights)
      parts.append({k: np.asarray(v)[:size - pad] for k, v in out.items()})
    maps = {k: np.concatenate([p[k] for p in parts]) for k in ('map', 'baseline')}
    return maps if output == 'both' else maps[output]

  return fn


def anomaly_map_fn(workdir: str, timestep_weights=None, kind: str = 'stein_ssim',
                   output: str = 'map', id_dataset: str | None = None) -> Callable:
  """The workdir's per-pixel anomaly map: where in an image the evidence of ``kind`` lies.

  Example::

    amap = api.anomaly_map_fn('runs/fashion_mnist')
    heat = amap(images)                      # [B, H, W] float32, higher = more anomalous

  Args:
    workdir: a trained or converted workdir.
    timestep_weights: per-timestep weights (see `build_anomaly_map_fn`); None = those of the
      zero-shot detector that evaluate mode fitted for ``kind`` on ``id_dataset``
      (`features.timestep_weights`: ``1 / std_k`` on its chosen window, so the map splits exactly
      the statistic it scores), or, without one, a plain sum over ``kind``'s timesteps.
    kind: a kind of `pixel_maps.MAP_KINDS` (default: the seed method, 'stein_ssim').
    output: 'map', 'baseline' (no SSIM weight) or 'both'.

  Returns:
    ``fn(images [B, H, W, C] in [-1, 1], image_ids=None) -> [B, H, W]`` numpy float32 (see
    `build_anomaly_map_fn`), using the evaluate mode's noise key, so an image with the same id
    gets the trajectory noise the suite's features saw.
  """
  workdir, config = _open(workdir)
  if timestep_weights is None:
    path = workdir_lib.detector_path(workdir, id_dataset or config.eval.id_datasets[0], kind)
    if os.path.exists(path):
      fitted = workdir_lib.load_detector(path)
      if fitted.reducer is not None:
        timestep_weights = features_lib.timestep_weights(fitted.reducer,
                                                         int(config.scorer.num_steps))
  params, _ = checkpoint.restore_ema_params(workdir, config)
  model = unet.build_model(config)
  sched = schedule_lib.schedule_for(config.diffusion)
  return build_anomaly_map_fn(config, lambda p, x, t: model.apply(p, x, t), sched, params,
                              workdir_lib.scorer_key(config.seed), timestep_weights, kind, output)
