"""The trajectory scorer: Stein score errors along a diffusion trajectory, amplified by SSIM.

``make_trajectory_scorer(apply_fn, schedule, scorer_cfg, feature_kinds)`` returns a pure, jittable

  ``score(params, images [B, H, W, C] in [-1, 1], image_ids [B] int32, key) -> dict``

that runs each trajectory the kinds need once (`ddm_ood.trajectory`: forward noising with R
draws, or DiffPath's DDIM inversion), computes each kind's per-timestep map ``v_k`` from it
(`per_timestep_maps`; what a kind reads is owned by `ddm_ood.kinds`) and reduces the maps to the
6-D features ``[sum_k <v_k>_p]_{p=1,2,3} + [sum_k <D v_k>_p]_{p=1,2,3}`` (signed power sums over
pixels and channels, ``D v_k = K (v_{k+1} - v_k)`` on the grid ``t_k = k T // K``; windowed kinds
use the grid points ``t_k >= scorer_cfg.t_min``). A row depends only on its image, its id and
the key. The formulas and the open choices: docs/method.md.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import inputs
from ddm_ood import kinds as kinds_lib
from ddm_ood import schedule as schedule_lib
from ddm_ood import settings
from ddm_ood import trajectory as trajectory_lib
from ddm_ood.ssim import IMAGE_MAX_VAL, ssim_map
from ddm_ood.trajectory import ApplyFn, Trajectory, ddim_trajectory, denoised_estimate
from ddm_ood.trajectory import forward_trajectory

FEATURE_KINDS = kinds_lib.NAMES
FEATURE_DIMS = kinds_lib.DIMS
MAP_KINDS = kinds_lib.MAP_KINDS
MODES = settings.MODES
EPS_SSIM_CLIP = 4.0                    # noise maps are clipped to [-4, 4] for SSIM ...
EPS_SSIM_MAX_VAL = 2 * EPS_SSIM_CLIP   # ... whose data range is then 8.
# Tolerance of validate_images for values outside [-1, 1] (resampling filters overshoot a bit).
RANGE_MARGIN = 0.05


def check_scorer_config(scorer_cfg, feature_kinds: Sequence[str] = ('stein_ssim',)
                        ) -> settings.ScorerSettings:
  """Parses ``config.scorer`` and the kinds; ValueError naming the field for any invalid value."""
  kinds_lib.check(feature_kinds)
  return settings.scorer(scorer_cfg)


def validate_images(images, image_size: int, channels: int) -> np.ndarray:
  """Checks a batch of images on the host before it goes to the (jitted) scorer.

  Args:
    images: array-like [B, H, W, C], float in [-1, 1].
    image_size: expected H = W (config.data.image_size).
    channels: expected C (config.data.channels).

  Returns:
    The images as a float32 numpy array [B, H, W, C].

  Raises:
    ValueError: wrong rank, size or channels; integer/bool dtype; NaN or inf; values outside
      [-1, 1] by more than `RANGE_MARGIN`. The message says how to fix the input.
  """
  x = np.asarray(images)
  if x.ndim != 4:
    hint = (' (a single image? add a batch axis with x[None])' if x.ndim == 3 else
            ' (gray images without a channel axis? use x[..., None])' if x.ndim == 2 else '')
    raise ValueError(f'Images must have shape [B, H, W, C], got shape {x.shape}{hint}.')
  if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'Images must be float in [-1, 1], got dtype {x.dtype}; convert uint8 '
                     'images with x.astype(np.float32) / 127.5 - 1.')
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'Images must be float in [-1, 1], got dtype {x.dtype}.')
  if x.shape[-1] != channels:
    raise ValueError(f'Images have {x.shape[-1]} channel(s) (shape {x.shape}) but the model '
                     f'expects {channels} (config.data.channels); convert gray <-> RGB first '
                     '(gray -> RGB: np.repeat(x, 3, axis=-1)).')
  if x.shape[1:3] != (image_size, image_size):
    raise ValueError(f'Images are {x.shape[1]}x{x.shape[2]} but the model expects '
                     f'{image_size}x{image_size} (config.data.image_size); resize them first.')
  x = x.astype(np.float32, copy=False)
  finite = np.isfinite(x)
  if not finite.all():
    bad = np.unique(np.nonzero(~finite.reshape(x.shape[0], -1))[0])
    what = 'NaN' if np.isnan(x).any() else 'inf'
    raise ValueError(f'found {what} in images at batch positions {bad[:10].tolist()}'
                     f'{" ..." if bad.size > 10 else ""}; clean the input first.')
  lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
  if lo < -1 - RANGE_MARGIN or hi > 1 + RANGE_MARGIN:
    raise ValueError(f'Images must be scaled to [-1, 1], found values in [{lo:.4g}, {hi:.4g}]; '
                     'for [0, 255] data use x / 127.5 - 1, for [0, 1] data use 2 * x - 1.')
  return x


# ------------------------------------------------------------------------------ timesteps


def window_start(ts: np.ndarray, t_min: int) -> int:
  """Index of the first grid timestep >= t_min; ValueError if there is none."""
  k0 = int(np.searchsorted(ts, t_min))
  if k0 >= len(ts):
    raise ValueError(f'config.scorer.t_min={t_min} leaves no timestep of the scorer grid '
                     f'{ts.tolist()}; choose t_min <= {int(ts[-1])}.')
  return k0


def kind_timesteps(num_timesteps: int, scorer_cfg, kind: str) -> np.ndarray:
  """The timesteps whose per-timestep values make up ``kind``'s features (int32 [K_kind]).

  The whole grid ``t_k = k T // K`` for the kinds that are not windowed (the DiffPath baselines);
  the grid points ``>= t_min`` for the others (`kinds.Kind.windowed`).
  """
  spec = kinds_lib.get(kind)
  s = settings.scorer(scorer_cfg)
  ts = schedule_lib.scorer_timesteps(num_timesteps, s.num_steps)
  return ts[window_start(ts, s.t_min):] if spec.windowed else ts


# ------------------------------------------------------------------------------ maps & features


def trajectory_ssim(traj: Trajectory, x0: jax.Array, scorer_cfg) -> jax.Array:
  """Per-timestep SSIM map [R, K, H, W, C] of the pair chosen by ``scorer_cfg.ssim_pair``."""
  s = settings.scorer(scorer_cfg)
  kw = s.ssim_kwargs()
  if s.ssim_pair == 'x0':
    x0hat = denoised_estimate(traj)
    return ssim_map(jnp.broadcast_to(x0, x0hat.shape), x0hat, max_val=IMAGE_MAX_VAL, **kw)
  c = EPS_SSIM_CLIP
  return ssim_map(jnp.clip(traj.eps_theta, -c, c), jnp.clip(traj.eps_target, -c, c),
                  max_val=EPS_SSIM_MAX_VAL, **kw)


def ssim_weight(ssim: jax.Array, weight: str) -> jax.Array:
  """w(SSIM): 1 - SSIM ('one_minus') or 2 - SSIM ('two_minus'); same shape as ``ssim``."""
  return (1.0 if weight == 'one_minus' else 2.0) - ssim


def stein_error(traj: Trajectory, scale_by_sigma: bool) -> jax.Array:
  """e_k = eps_theta_k - eps_target_k, divided by sigma_k if ``scale_by_sigma``; [R, K, H, W, C]."""
  e = traj.eps_theta - traj.eps_target
  return e / trajectory_lib.timestep_axis(traj.sigma) if scale_by_sigma else e


def per_timestep_maps(map_names: Sequence[str], traj: Trajectory, x0: jax.Array,
                      scorer_cfg) -> dict:
  """Per-timestep maps v_k [R, K, H, W, C] of one trajectory, by map name (`kinds.MAPS`).

  'stein_ssim': w(SSIM_k) * e_k; 'stein': e_k; 'eps_ssim': w(SSIM_k) * eps_theta_k;
  'eps': eps_theta_k. The SSIM weight and the Stein error are computed once for all maps.
  """
  s = settings.scorer(scorer_cfg)
  w = e = None
  if any(m in ('stein_ssim', 'eps_ssim') for m in map_names):
    w = ssim_weight(trajectory_ssim(traj, x0, s), s.ssim_weight)
  if any(m in ('stein_ssim', 'stein') for m in map_names):
    e = stein_error(traj, s.scale_by_sigma)
  maps = {}
  for m in map_names:
    if m == 'stein_ssim':
      maps[m] = w * e
    elif m == 'stein':
      maps[m] = e
    elif m == 'eps_ssim':
      maps[m] = w * traj.eps_theta
    elif m == 'eps':
      maps[m] = traj.eps_theta
    else:
      raise ValueError(f'Unknown map {m!r}; choose from {kinds_lib.MAPS}.')
  return maps


def power_sums(v: jax.Array) -> jax.Array:
  """Signed power sums <v>_p = sum_i v_i^p over the last three axes, p = 1, 2, 3: [..., 3]."""
  axes = (-3, -2, -1)
  return jnp.stack([v.sum(axes), (v * v).sum(axes), (v * v * v).sum(axes)], axis=-1)


def six_d_features(v: jax.Array, grid_steps: int | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Power-sum features of per-timestep maps v [R, K, H, W, C], averaged over the R draws.

  Args:
    v: maps [R, K, H, W, C] at consecutive points of the scorer grid.
    grid_steps: K of the grid ``t_k = k T // K`` the maps lie on (default: ``v.shape[1]``; larger
      when ``v`` is a window of the grid), the factor of the finite difference.

  Returns:
    (features [6], per_timestep [R, K, 3], per_timestep_deriv [R, K-1, 3]) float32: the features
    are averaged over the draws, the per-timestep power sums are per draw; the derivative is
    D v_k = grid_steps (v_{k+1} - v_k).
  """
  k_steps = v.shape[1] if grid_steps is None else grid_steps
  per_t = power_sums(v)                                    # [R, K, 3]
  per_d = power_sums(k_steps * (v[:, 1:] - v[:, :-1]))     # [R, K-1, 3]
  feats = jnp.concatenate([per_t.sum(1), per_d.sum(1)], axis=-1)   # [R, 6]
  return feats.mean(0), per_t, per_d


def _batch_shards(x: jax.Array) -> int:
  """Number of shards of x's leading axis under an explicit-sharding mesh (1 otherwise)."""
  try:
    sharding = jax.typeof(x).sharding
    spec = sharding.spec
  except (AttributeError, TypeError):
    return 1
  if not spec or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def map_images(fn: Callable, images: jax.Array, image_ids: jax.Array, chunk: int):
  """Applies the per-image ``fn(x0, id)`` to a batch, vmapped or in chunks of ``chunk`` images.

  Chunks are strided (step s scores images s, s + B/chunk, ...) when ``chunk`` divides B: with the
  batch split in row blocks over D devices and D dividing ``chunk``, every device then scores
  ``chunk / D`` of its own rows per step and no data moves between devices. Otherwise
  ``lax.map(..., batch_size=chunk)`` handles the remainder (only for unsharded batches; JAX
  rejects it for a batch sharded over an explicit mesh axis).
  """
  b = images.shape[0]
  if chunk <= 0 or chunk >= b:
    return jax.vmap(fn)(images, image_ids)
  shards = _batch_shards(images)
  if b % chunk == 0 and chunk % shards == 0:
    n = b // chunk
    xs = jnp.swapaxes(images.reshape((chunk, n) + images.shape[1:]), 0, 1)
    ids = jnp.swapaxes(image_ids.reshape(chunk, n), 0, 1)
    out = jax.lax.map(lambda xi: jax.vmap(fn)(*xi), (xs, ids))
    return jax.tree.map(lambda o: jnp.swapaxes(o, 0, 1).reshape((b,) + o.shape[2:]), out)
  if shards > 1:
    raise ValueError(f'config.scorer.chunk={chunk} must divide the batch ({b}) and be a multiple '
                     f'of the {shards} devices the batch is sharded over; e.g. chunk='
                     f'{shards * max(1, chunk // shards)} with a batch that is a multiple of it.')
  return jax.lax.map(lambda xi: fn(*xi), (images, image_ids), batch_size=chunk)


def make_trajectory_scorer(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, scorer_cfg,
                           feature_kinds: Sequence[str] = ('stein_ssim',)) -> Callable:
  """Builds the pure trajectory scorer.

  Args:
    apply_fn: eval-mode network ``(params, x_t [N, H, W, C], t [N] int32) -> eps_theta``.
    schedule: the diffusion schedule the network was trained with.
    scorer_cfg: ``config.scorer`` or `settings.ScorerSettings` (mode, num_steps, t_min, noise,
      num_draws, ssim_pair, ssim_weight, scale_by_sigma, ssim_filter_*, ssim_k1, ssim_k2, chunk).
    feature_kinds: kinds to compute (`ddm_ood.kinds`); a fused kind adds its parts.

  Returns:
    ``score(params, images [B, H, W, C] float in [-1, 1], image_ids [B] int32, key) -> dict`` with
    one entry per base kind (`kinds.base_kinds`) in each of
    ``'features'``: {kind: [B, D] float32}, ``'per_timestep'``: {kind: [B, K_kind, 3]} and
    ``'per_timestep_deriv'``: {kind: [B, K_kind - 1, 3]} (power sums p = 1, 2, 3 at the
    timesteps `kind_timesteps` gives, averaged over draws), and the same per draw,
    ``'per_draw'``: {kind: [B, R_kind, K_kind, 3]}, ``'per_draw_deriv'``:
    {kind: [B, R_kind, K_kind - 1, 3]} (R_kind = 1 on the DDIM path;
    'diffpath_1d' repeats those of the DDIM eps_theta path). Pure and jittable; a row depends only
    on its image, its id and the key (not on batch size, order, chunking or device count).
    Validate values on the host first with `validate_images` (NaN cannot be checked under jit).

  Raises:
    ValueError: invalid config or kinds (here), or badly shaped inputs (at trace time).
  """
  s = check_scorer_config(scorer_cfg, feature_kinds)
  specs = [kinds_lib.get(k) for k in kinds_lib.base_kinds(feature_kinds)]
  grid_steps = s.num_steps
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, grid_steps)
  k0 = window_start(ts, s.t_min)   # windowed kinds use ts[k0:]
  # The trajectories the kinds need, (path, windowed) -> their maps; one DDIM path serves all.
  source = {spec.name: (spec.trajectory_for(s.mode), spec.windowed, spec.map) for spec in specs}
  groups: dict[tuple[str, bool], list[str]] = {}
  for path, windowed, m in source.values():
    groups.setdefault((path, windowed), [])
    if m not in groups[path, windowed]:
      groups[path, windowed].append(m)

  def score_one(params, x0, image_id, key):
    maps, ddim_path = {}, None
    for (path, windowed), map_names in groups.items():
      if path == 'forward':
        traj = forward_trajectory(apply_fn, schedule, ts[k0:] if windowed else ts, s.noise,
                                  s.num_draws, params, x0, image_id, key)
      else:
        if ddim_path is None:
          ddim_path = ddim_trajectory(apply_fn, schedule, ts, params, x0)
        traj = trajectory_lib.window(ddim_path, k0) if windowed else ddim_path
      for m, v in per_timestep_maps(map_names, traj, x0, s).items():
        maps[path, windowed, m] = v
    feats, per_t, per_d, per_t_r, per_d_r = {}, {}, {}, {}, {}
    reduced = {}   # kinds reading the same map share one reduction (diffpath_6d / _1d)
    for spec in specs:
      src = source[spec.name]
      if src not in reduced:
        reduced[src] = six_d_features(maps[src], grid_steps)
      f6, per_t_r[spec.name], per_d_r[spec.name] = reduced[src]
      per_t[spec.name], per_d[spec.name] = per_t_r[spec.name].mean(0), per_d_r[spec.name].mean(0)
      feats[spec.name] = jnp.sqrt(f6[4:5]) if spec.reduce == '1d' else f6
    return {'features': feats, 'per_timestep': per_t, 'per_timestep_deriv': per_d,
            'per_draw': per_t_r, 'per_draw_deriv': per_d_r}

  def score(params, images: jax.Array, image_ids: jax.Array, key: jax.Array) -> dict:
    images = inputs.image_batch(images, 'scorer')
    image_ids = inputs.index_batch(image_ids, images.shape[0], 'image_ids', 'scorer')
    return map_images(lambda x0, i: score_one(params, x0, i, key), images, image_ids, s.chunk)

  return score


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out; wraps modulo 2^32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def content_ids(images: jax.Array) -> jax.Array:
  """Image ids derived from the pixels alone: a 32-bit hash of each image's float32 bits.

  The default ids when a caller names no ids: the same image then gets the same trajectory noise
  (and score) in any batch, position or batch size. Jittable and exact (integer arithmetic,
  whose wrapping sum does not depend on reduction order); -0.0 hashes as 0.0.

  Args:
    images: [B, H, W, C] float (cast to float32).

  Returns:
    int32 [B].
  """
  x = jnp.asarray(images, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x).reshape(x.shape[0], math.prod(x.shape[1:]))
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  pos = jnp.arange(bits.shape[1], dtype=jnp.uint32)
  mixed = _mix32(bits ^ _mix32(pos * jnp.uint32(0x9E3779B9) + jnp.uint32(1)))
  h = _mix32(jnp.sum(mixed, axis=1, dtype=jnp.uint32) ^ jnp.uint32(bits.shape[1]))
  return jax.lax.bitcast_convert_type(h, jnp.int32)


__all__ = ['FEATURE_KINDS', 'FEATURE_DIMS', 'MODES', 'EPS_SSIM_CLIP', 'EPS_SSIM_MAX_VAL',
           'content_ids', 'ApplyFn',
           'Trajectory', 'check_scorer_config', 'kind_timesteps', 'validate_images',
           'forward_trajectory', 'ddim_trajectory', 'denoised_estimate', 'trajectory_ssim',
           'ssim_weight', 'stein_error', 'per_timestep_maps', 'power_sums', 'six_d_features',
           'make_trajectory_scorer', 'map_images', 'window_start']
