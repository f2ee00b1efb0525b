"""Per-pixel anomaly maps: where in an image the seed method's evidence lies.

`make_anomaly_map_fn` splits the p = 2 power sums of a kind's per-timestep maps over pixels (the
scorer's trajectory and noise for the same key and ids), weighted per timestep as the zero-shot
detector weighs them (`anomaly_map_weights`); `trajectory_maps` gives the per-timestep maps of
one draw for plots. Pure and jittable like the scorer (docs/method.md, "Anomaly maps").
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import inputs
from ddm_ood import kinds as kinds_lib
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer
from ddm_ood import settings
from ddm_ood import trajectory as trajectory_lib
from ddm_ood.trajectory import ApplyFn

MAP_KINDS = kinds_lib.MAP_KINDS


def trajectory_maps(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, scorer_cfg, params,
                    images, image_ids, key, mode: str = 'forward') -> Mapping[str, np.ndarray]:
  """Per-timestep maps of the first noise draw, for plots (not the hot path).

  Args:
    apply_fn: eval-mode network.
    schedule: diffusion schedule.
    scorer_cfg: ``config.scorer`` (its ``mode`` is ignored; see ``mode``).
    params: network parameters.
    images: [B, H, W, C] float in [-1, 1].
    image_ids: [B] int (seed the noise exactly as the scorer's draw 0 does).
    key: PRNG key.
    mode: 'forward' (default) or 'ddim'.

  Returns:
    numpy float32 arrays [B, K', H, W, C]: 'x_t', 'x0hat' (clipped), 'eps_theta', 'eps_target',
    'error' (e_k, scaled if scale_by_sigma), 'ssim', 'weight' and 'weighted_error' (w * e_k);
    plus 'timesteps' int32 [K'], the seed kinds' timesteps (`kind_timesteps`, ``t_k >= t_min``).
  """
  s = settings.scorer(scorer_cfg)
  if mode not in scorer.MODES:
    raise ValueError(f'mode={mode!r} is not one of {scorer.MODES}.')
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, s.num_steps)
  k0 = scorer.window_start(ts, s.t_min)

  def one(x0, image_id):
    if mode == 'forward':
      traj = trajectory_lib.forward_trajectory(apply_fn, schedule, ts[k0:], s.noise, 1, params, x0, image_id,
                                key)
    else:
      traj = trajectory_lib.window(trajectory_lib.ddim_trajectory(apply_fn, schedule, ts, params, x0), k0)
    ssim = scorer.trajectory_ssim(traj, x0, s)
    w = scorer.ssim_weight(ssim, s.ssim_weight)
    e = scorer.stein_error(traj, s.scale_by_sigma)
    out = dict(x_t=traj.x_t, x0hat=trajectory_lib.denoised_estimate(traj), eps_theta=traj.eps_theta,
               eps_target=traj.eps_target, error=e, ssim=ssim, weight=w, weighted_error=w * e)
    return {k: v[0] for k, v in out.items()}

  out = jax.jit(jax.vmap(one))(jnp.asarray(images, jnp.float32), jnp.asarray(image_ids, jnp.int32))
  out = {k: np.asarray(v) for k, v in out.items()}
  out['timesteps'] = ts[k0:]
  return out


def _map_kind(kind: str) -> kinds_lib.Kind:
  spec = kinds_lib.get(kind)
  if not spec.has_pixel_map:
    raise ValueError(f'No anomaly map for kind {kind!r}; choose from {MAP_KINDS} (the DiffPath '
                     'baselines have no per-pixel map).')
  return spec


def anomaly_map_weights(num_timesteps: int, scorer_cfg, kind: str = 'stein_ssim',
                        scale=None) -> np.ndarray:
  """Timestep weights [K] for `make_anomaly_map_fn` that follow ``kind``'s timestep window.

  Args:
    num_timesteps: T of the diffusion schedule.
    scorer_cfg: ``config.scorer`` (num_steps, t_min).
    kind: a kind of `MAP_KINDS`.
    scale: None (weight 1 on each of ``kind``'s timesteps) or per-timestep weights [K_kind] on
      `kind_timesteps` (the grid points ``t_k >= t_min``), e.g. ``1 / std_k`` of the ID-train
      p = 2 power sums; or already [K] on the whole grid (returned as is, as float32).

  Returns:
    float32 [K] (K = ``scorer_cfg.num_steps``): ``scale`` on the window, 0 before it.
  """
  _map_kind(kind)
  k = settings.scorer(scorer_cfg).num_steps
  k_kind = len(scorer.kind_timesteps(num_timesteps, scorer_cfg, kind))
  w = np.ones(k_kind) if scale is None else np.asarray(scale, np.float64)
  if w.shape == (k,):
    return w.astype(np.float32)
  if w.shape != (k_kind,):
    raise ValueError(f'timestep weights must have shape [{k_kind}] (the timesteps of {kind!r}, '
                     f't >= t_min) or [{k}] (the whole grid of config.scorer.num_steps), got '
                     f'{w.shape}.')
  return np.concatenate([np.zeros(k - k_kind), w]).astype(np.float32)


def make_anomaly_map_fn(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, scorer_cfg,
                        kind: str = 'stein_ssim') -> Callable:
  """Builds the pure per-pixel anomaly map of a seed kind: where an image's evidence lies.

  The trajectory is the scorer's for ``kind`` (the same noise for the same key and ids: forward
  noising with R = ``scorer_cfg.num_draws`` draws, or the DDIM path for the '*_ddim' kinds and
  ``scorer_cfg.mode == 'ddim'``), evaluated on the WHOLE grid ``t_k = k T // K`` (K =
  ``scorer_cfg.num_steps``; ``t_min`` is ignored here, put zero weights before it, as
  `anomaly_map_weights` does). With ``v_k`` the kind's per-timestep map (``w(SSIM_k) * e_k`` for
  'stein_ssim') and ``e_k`` the Stein error::

    map[h, w]      = sum_k weights[k] * mean_r sum_c v_{r,k}[h, w, c]^2
    baseline[h, w] = sum_k weights[k] * mean_r sum_c e_{r,k}[h, w, c]^2     (no SSIM weight)

  so ``map.sum((1, 2)) == sum_k weights[k] * per_timestep[kind][:, k, 1]`` of
  `make_trajectory_scorer`: the map splits the p = 2 power sums over pixels. Why the weights:
  a zero-shot detector that standardises each timestep's power sums by their ID-train std before
  summing is given ``weights[k] = 1 / std_k(<v_k>_2)`` (0 outside its timestep window); the map's
  pixel sum is then that standardised statistic (up to its constant mean shift), so the map shows
  where the detector's evidence comes from. All-ones weights give the paper's plain sum. Zero
  weights still compute their timestep (shapes stay static).

  Args:
    apply_fn: eval-mode network ``(params, x_t [N, H, W, C], t [N] int32) -> eps_theta``.
    schedule: the diffusion schedule the network was trained with.
    scorer_cfg: ``config.scorer`` (as for `make_trajectory_scorer`; ``chunk`` is respected).
    kind: one of `MAP_KINDS`.

  Returns:
    ``map_fn(params, images [B, H, W, C] in [-1, 1], image_ids [B] int32, key,
    timestep_weights [K] float32) -> {'map': [B, H, W], 'baseline': [B, H, W]}`` float32,
    non-negative for non-negative weights. Pure and jittable; a row depends only on its image,
    its id, the key and the weights.

  Raises:
    ValueError: invalid config or kind (here), or badly shaped inputs (at trace time).
  """
  spec = _map_kind(kind)
  s = settings.scorer(scorer_cfg)
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, s.num_steps)
  ddim = spec.trajectory_for(s.mode) == 'ddim'
  base = spec.map

  def map_one(params, x0, image_id, key, weights):
    if ddim:
      traj = trajectory_lib.ddim_trajectory(apply_fn, schedule, ts, params, x0)
    else:
      traj = trajectory_lib.forward_trajectory(apply_fn, schedule, ts, s.noise, s.num_draws, params, x0,
                                image_id, key)
    maps = scorer.per_timestep_maps(tuple(dict.fromkeys((base, 'stein'))), traj, x0, s)
    w = trajectory_lib.timestep_axis(weights)
    reduce = lambda v: jnp.sum(w * jnp.mean(v * v, axis=0), axis=(0, 3))  # noqa: E731
    return {'map': reduce(maps[base]), 'baseline': reduce(maps['stein'])}

  def map_fn(params, images: jax.Array, image_ids: jax.Array, key: jax.Array,
             timestep_weights: jax.Array) -> dict:
    images = inputs.image_batch(images, 'anomaly map')
    image_ids = inputs.index_batch(image_ids, images.shape[0], 'image_ids', 'anomaly map')
    weights = jnp.asarray(timestep_weights)
    if weights.shape != ts.shape:
      raise ValueError(f'timestep_weights must have shape [{len(ts)}] (one per grid timestep '
                       f'{ts.tolist()}), got {weights.shape}; see anomaly_map_weights.')
    weights = weights.astype(jnp.float32)
    return scorer.map_images(lambda x0, i: map_one(params, x0, i, key, weights), images,
                             image_ids, s.chunk)

  return map_fn


__all__ = ['MAP_KINDS', 'trajectory_maps', 'anomaly_map_weights', 'make_anomaly_map_fn']
