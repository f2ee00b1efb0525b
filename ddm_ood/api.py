"""The embeddable API: a trained workdir as one pure JAX function ``images -> anomaly scores``.

Example::

  from ddm_ood import api
  ood = api.load_anomaly_scorer('runs/fashion_mnist', id_dataset='fashion_mnist')
  scores = ood(images)                       # [B] float32, higher = more out-of-distribution
  # or, inside your own jitted pipeline:
  f = api.make_anomaly_fn(ood.apply_fn, ood.schedule, ood.config.scorer, ood.kind)
  scores = jax.jit(f)(ood.unet_params, ood.detector_params, images, image_ids, ood.key)

Scoring needs neither TensorFlow nor scikit-learn: the detector is plain arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddm_ood import checkpoint
from ddm_ood import detector
from ddm_ood import evaluate
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer
from ddm_ood import unet

CONFIG_FILE = 'config.json'


def make_anomaly_fn(apply_fn: Callable, schedule: schedule_lib.Schedule,
                    scorer_cfg: ml_collections.ConfigDict, kind: str = 'stein_ssim') -> Callable:
  """Builds the pure function ``(unet_params, detector_params, images, image_ids, key) -> scores``.

  Args:
    apply_fn: ``apply_fn(params, x_t [N,H,W,C], t [N]) -> eps_theta`` (eval mode).
    schedule: the diffusion schedule the network was trained with.
    scorer_cfg: ``config.scorer``.
    kind: feature kind the detector was fitted on.

  Returns:
    A jittable function; ``images`` [B, H, W, C] float in [-1, 1], ``image_ids`` [B] int32 or
    None (the trajectory noise of an image is derived from its id, never from its batch position;
    None = `scorer.content_ids`, a hash of the pixels) and
    ``key`` a `jax.random.key`; returns anomaly scores [B] (higher = more out-of-distribution).
  """
  score_fn = scorer.make_trajectory_scorer(apply_fn, schedule, scorer_cfg, (kind,))

  def anomaly_fn(unet_params, detector_params, images, image_ids, key):
    if image_ids is None:
      image_ids = scorer.content_ids(images)
    feats = score_fn(unet_params, images, image_ids, key)['features'][kind]
    return detector.anomaly_score(detector_params, feats)

  return anomaly_fn


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config next to its checkpoints (read back by `load_config`)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=1))
  os.replace(path + '.tmp', path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config a workdir was trained and evaluated with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is this a ddm_ood workdir? Run '
                            '`python -m ddm_ood.main --config=... --workdir=...` first.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


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
  detector_params: detector.DetectorParams
  apply_fn: Callable
  schedule: schedule_lib.Schedule
  key: jax.Array

  def __post_init__(self):
    self._fn = jax.jit(make_anomaly_fn(self.apply_fn, self.schedule, self.config.scorer,
                                       self.kind))

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
    return np.asarray(self._fn(self.unet_params, self.detector_params,
                               jnp.asarray(images, jnp.float32), image_ids, self.key))


def load_anomaly_scorer(workdir: str, id_dataset: str | None = None,
                        kind: str = 'stein_ssim') -> AnomalyScorer:
  """Loads the EMA parameters and the detector fitted on ``id_dataset`` by the evaluate mode.

  Args:
    workdir: a workdir that `python -m ddm_ood.main` trained and evaluated.
    id_dataset: which in-distribution set's detector to use (default: the first ID set).
    kind: feature kind (default: the seed method, 'stein_ssim').
  """
  workdir = os.path.abspath(workdir)
  config = load_config(workdir)
  id_dataset = id_dataset or config.eval.id_datasets[0]
  path = evaluate.detector_path(workdir, id_dataset, kind)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No fitted detector for ID set {id_dataset!r} and kind {kind!r} at {path}. Run '
        f'`python -m ddm_ood.main --mode=evaluate --workdir={workdir} --config=...` with that ID '
        'set in config.eval.id_datasets and that kind in config.eval.feature_kinds.')
  fitted = detector.load_detector(path)
  params, step = checkpoint.restore_ema_params(workdir, config)
  model = unet.build_model(config)
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  return AnomalyScorer(config=config, kind=kind, id_dataset=id_dataset, step=step,
                       unet_params=params, detector_params=fitted.params,
                       apply_fn=lambda p, x, t: model.apply(p, x, t), schedule=sched,
                       key=evaluate.scorer_key(config.seed))


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
  workdir = os.path.abspath(workdir)
  config = load_config(workdir)
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
  workdir = os.path.abspath(workdir)
  config = load_config(workdir)
  scorer.check_scorer_config(config.scorer, tuple(kinds))
  params, _ = checkpoint.restore_ema_params(workdir, config)
  model = unet.build_model(config)
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  score_fn = scorer.make_trajectory_scorer(model.apply, sched, config.scorer, tuple(kinds))
  return jax.tree_util.Partial(functools.partial(_features, score_fn), params,
                               evaluate.scorer_key(config.seed))
