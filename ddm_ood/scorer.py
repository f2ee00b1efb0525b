"""The trajectory scorer: Stein score errors along a diffusion trajectory, amplified by SSIM.

``make_trajectory_scorer(apply_fn, schedule, scorer_cfg, feature_kinds)`` returns a pure, jittable

  ``score(params, images [B, H, W, C] in [-1, 1], image_ids [B] int32, key) -> dict``

that runs each needed trajectory once and derives every requested feature kind from it
(docs/method.md):

==============  ==========  =========================================================  ====
kind            trajectory  per-timestep map v_k                                       D
==============  ==========  =========================================================  ====
'stein_ssim'    cfg.mode    w(SSIM_k) * e_k,  e_k = eps_theta_k - eps_target_k (/sigma)  6
'stein'         cfg.mode    e_k                                                          6
'eps_ssim'      cfg.mode    w(SSIM_k) * eps_theta_k   (never scaled; eps'_k on ddim)      6
'diffpath_6d'   ddim        eps'_k  (DiffPath's eps, re-derived from the clipped x0hat)  6
'diffpath_1d'   ddim        sqrt(sum_k <D eps'_k>_2)                                     1
'stein_ssim_ddim' ddim      as 'stein_ssim' (the forward-vs-ddim ablation in one run)      6
'stein_ddim'    ddim        as 'stein'                                                   6
==============  ==========  =========================================================  ====

6-D features: ``[sum_k <v_k>_p for p = 1, 2, 3] + [sum_k <D v_k>_p for p = 1, 2, 3]`` with the
signed power sums ``<v>_p = sum_i v_i^p`` over pixels and channels and ``D v_k = K (v_{k+1} - v_k)``.

Timesteps: the grid ``t_k = k T // K``, ``k = 0..K-1`` (`schedule.scorer_timesteps`, DiffPath's).
``scorer_cfg.t_min`` (default 0 = the whole grid) restricts the seed kinds ('stein_ssim', 'stein',
'eps_ssim' and the '*_ddim' ablations) to the grid points ``t_k >= t_min`` (`kind_timesteps`): the
forward trajectory is then only evaluated there, and the DDIM path (which must start at the clean
image) is still run over the whole grid, its seed-kind maps cut to the window. The DiffPath
baselines always use the whole grid. Finite differences keep the grid's step: ``D v = K dv``.

Trajectories:

* ``'forward'``: ``x_k = sqrt(abar_k) x0 + sigma_k eps``. The noise comes from the image id, never
  from the batch position: ``key_img = fold_in(key, image_id)``, draw ``r`` uses
  ``normal(fold_in(key_img, r))`` for every k (``noise='shared'``) or
  ``normal(fold_in(fold_in(key_img, r), t_k))`` (``noise='independent'``: keyed by the timestep
  itself, so the noise at t_k does not depend on K or t_min). The target is that eps.
  All R x K noisy states of an image go through the network in one call (vmapped over images, so
  one network call of batch B * R * K). Features and per-timestep values are averaged over the R
  draws (each draw's features are computed first, then averaged).
* ``'ddim'``: DiffPath's deterministic DDIM inversion as a ``lax.scan`` over k, starting from the
  clean image itself, ``x_{t_0} = x0`` (DiffPath does the same; ``abar_0 ~ 1``), then
  ``x0hat_k = clip((x_k - sigma_k eps_theta_k) / sqrt(abar_k), -1, 1)``,
  ``eps'_k = (x_k - sqrt(abar_k) x0hat_k) / sigma_k`` and
  ``x_{k+1} = sqrt(abar_{k+1}) x0hat_k + sigma_{k+1} eps'_k``. The target is
  ``eps*_k = (x_k - sqrt(abar_k) x0) / sigma_k``. No randomness: ``key``, ``noise`` and
  ``num_draws`` are ignored. On this path every kind uses ``eps'_k`` where the table says
  ``eps_theta_k`` (``Trajectory.eps_theta`` holds it): exactly the eps that DiffPath's
  ``ddim_reverse_sample`` returns, so 'diffpath_6d' / 'diffpath_1d' equal the statistics of its
  ``save_*_statistics.py`` for the same weights and images (tests/test_diffpath_reference.py), and
  the seed kinds in ``mode='ddim'`` and the '*_ddim' ablations see the same eps (then
  ``e_k = eps'_k - eps*_k = sqrt(abar_k) (x0 - x0hat_k) / sigma_k``). ``eps'_k`` differs from the
  raw network output wherever the clip is active: at t = 0 and at saturated (-1 / +1) pixels.
  The grid ``k T // K`` is DiffPath's respaced ``ddimK`` grid whenever K divides T (e.g. 0, 400,
  ..., 3600 for ddim10 on T = 4000), and ``D`` uses its ``np.diff(...) * K``.

SSIM map per timestep, same size as the image (`ddm_ood.ssim.ssim_map`, Gaussian 11 / 1.5):

* ``ssim_pair='x0'``: ``SSIM(x0, x0hat_k)`` with ``x0hat_k`` clipped to [-1, 1] (the network's
  denoised estimate can leave the data range at large t; clipping keeps SSIM's data range honest),
  ``max_val = 2``.
* ``ssim_pair='eps'``: ``SSIM(clip(eps_theta_k, -4, 4), clip(eps_target_k, -4, 4))`` with
  ``max_val = 8`` (noise is ~N(0, 1); |eps| > 4 has probability 6e-5, so the clip only guards
  against outliers and the fixed data range makes maps comparable across images and timesteps).
* weight ``'one_minus'``: ``w = 1 - SSIM``; ``'two_minus'``: ``w = 2 - SSIM``.

Chunking (``scorer_cfg.chunk > 0``) evaluates ``chunk`` images per step of a ``lax.map``; results do
not depend on it. When ``chunk`` divides B, step s takes the strided images ``s, s + B/chunk, ...``
so a batch sharded over a ('data',) mesh keeps each device on its own rows (``chunk`` must then be
a multiple of the device count: each device scores ``chunk / D`` images per step); otherwise
``lax.map(..., batch_size=chunk)`` is used (unsharded batches only).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import schedule as schedule_lib
from ddm_ood.ssim import IMAGE_MAX_VAL, ssim_map

FEATURE_KINDS = ('stein_ssim', 'stein', 'eps_ssim', 'diffpath_6d', 'diffpath_1d',
                 'stein_ssim_ddim', 'stein_ddim')
FEATURE_DIMS = {'stein_ssim': 6, 'stein': 6, 'eps_ssim': 6, 'diffpath_6d': 6, 'diffpath_1d': 1,
                'stein_ssim_ddim': 6, 'stein_ddim': 6}
MODES = ('forward', 'ddim')
NOISES = ('shared', 'independent')
SSIM_PAIRS = ('x0', 'eps')
SSIM_WEIGHTS = ('one_minus', 'two_minus')
EPS_SSIM_CLIP = 4.0                    # noise maps are clipped to [-4, 4] for SSIM ...
EPS_SSIM_MAX_VAL = 2 * EPS_SSIM_CLIP   # ... whose data range is then 8.
_MODE_KINDS = ('stein_ssim', 'stein', 'eps_ssim')   # follow scorer_cfg.mode
_DDIM_KINDS = ('diffpath_6d', 'diffpath_1d')        # always on the DDIM path
# The forward-vs-ddim ablation in one run: these are their base kind on the DDIM path, whatever
# scorer_cfg.mode says (the DDIM path is computed anyway for the DiffPath baselines).
_DDIM_VARIANTS = {'stein_ssim_ddim': 'stein_ssim', 'stein_ddim': 'stein'}
# Tolerance of validate_images for values outside [-1, 1] (resampling filters overshoot a bit).
RANGE_MARGIN = 0.05

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
  """States of one image along a trajectory; R draws (1 for ddim) x K timesteps.

  Attributes:
    x_t: noisy states [R, K, H, W, C].
    eps_theta: network outputs eps_theta(x_t, t_k) [R, K, H, W, C].
    eps_target: the true noise of each state [R, K, H, W, C].
    sqrt_abar: sqrt(abar_{t_k}) [K].
    sigma: sigma_{t_k} [K].
  """
  x_t: jax.Array
  eps_theta: jax.Array
  eps_target: jax.Array
  sqrt_abar: jax.Array
  sigma: jax.Array


def check_scorer_config(scorer_cfg, feature_kinds: Sequence[str] = ('stein_ssim',)) -> None:
  """Raises ValueError naming the config field for any invalid ``config.scorer`` value."""
  def choice(name, value, options):
    if value not in options:
      raise ValueError(f'config.scorer.{name}={value!r} is not one of {options}.')
  choice('mode', scorer_cfg.mode, MODES)
  choice('noise', scorer_cfg.noise, NOISES)
  choice('ssim_pair', scorer_cfg.ssim_pair, SSIM_PAIRS)
  choice('ssim_weight', scorer_cfg.ssim_weight, SSIM_WEIGHTS)
  if int(scorer_cfg.num_draws) < 1:
    raise ValueError(f'config.scorer.num_draws must be >= 1, got {scorer_cfg.num_draws}.')
  if int(scorer_cfg.chunk) < 0:
    raise ValueError(f'config.scorer.chunk must be >= 0 (0 = no chunking), got '
                     f'{scorer_cfg.chunk}.')
  if int(scorer_cfg.num_steps) < 1:
    raise ValueError(f'config.scorer.num_steps must be >= 1, got {scorer_cfg.num_steps}.')
  if int(scorer_cfg.get('t_min', 0)) < 0:
    raise ValueError(f'config.scorer.t_min must be >= 0 (0 = every grid timestep), got '
                     f'{scorer_cfg.t_min}.')
  if isinstance(feature_kinds, str):
    raise ValueError(f'feature_kinds must be a sequence of kinds, got the string '
                     f'{feature_kinds!r}; write ({feature_kinds!r},).')
  if not feature_kinds:
    raise ValueError(f'feature_kinds is empty; choose from {FEATURE_KINDS}.')
  for kind in feature_kinds:
    if kind not in FEATURE_KINDS:
      raise ValueError(f'Unknown feature kind {kind!r}; choose from {FEATURE_KINDS}.')


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


def _window_start(ts: np.ndarray, t_min: int) -> int:
  """Index of the first grid timestep >= t_min; ValueError if there is none."""
  k0 = int(np.searchsorted(ts, t_min))
  if k0 >= len(ts):
    raise ValueError(f'config.scorer.t_min={t_min} leaves no timestep of the scorer grid '
                     f'{ts.tolist()}; choose t_min <= {int(ts[-1])}.')
  return k0


def kind_timesteps(num_timesteps: int, scorer_cfg, kind: str) -> np.ndarray:
  """The timesteps whose per-timestep values make up ``kind``'s features (int32 [K_kind]).

  The whole grid ``t_k = k T // K`` for the DiffPath baselines; the grid points ``>= t_min`` for
  the seed kinds.
  """
  if kind not in FEATURE_KINDS:
    raise ValueError(f'Unknown feature kind {kind!r}; choose from {FEATURE_KINDS}.')
  ts = schedule_lib.scorer_timesteps(num_timesteps, int(scorer_cfg.num_steps))
  if kind in _DDIM_KINDS:
    return ts
  return ts[_window_start(ts, int(scorer_cfg.get('t_min', 0))):]


def _cut(traj: 'Trajectory', k0: int) -> 'Trajectory':
  """The trajectory from grid index k0 on."""
  if k0 == 0:
    return traj
  return Trajectory(traj.x_t[:, k0:], traj.eps_theta[:, k0:], traj.eps_target[:, k0:],
                    traj.sqrt_abar[k0:], traj.sigma[k0:])


# ------------------------------------------------------------------------------ trajectories


def _timestep_coefficients(schedule: schedule_lib.Schedule, ts: np.ndarray):
  """sqrt(abar) [K] and sigma [K] (float32) at the trajectory timesteps."""
  return schedule.sqrt_alphas_cumprod[ts], schedule.sigmas[ts]


def _ddim_coefficients(schedule: schedule_lib.Schedule, ts: np.ndarray):
  """DiffPath's float32 DDIM coefficients at the grid ts: r, c, sqrt(abar_next), sigma_next [K].

  ``r = 1 / sqrt(abar)`` and ``c = sqrt(1 / abar - 1)`` are rounded from float64 (abar from the
  cumulative product of the betas in float64), and the next state's ``sqrt(abar_next)``,
  ``sqrt(1 - abar_next)`` are computed from float32 ``abar_next`` in float32, with ``abar_next = 0``
  after the last step, all as improved-diffusion does. At t = 0, ``r - 1 ~ 5e-6`` is a few float32
  ulps, and eps'_0 at a clipped pixel is ``(r - 1) / c``: rounding r any other way moves it by
  ~4e-5. A traced schedule (no concrete betas) falls back to float32 arithmetic.
  """
  try:
    betas = np.asarray(schedule.betas, np.float64)
  except jax.errors.TracerArrayConversionError:
    a, s = _timestep_coefficients(schedule, ts)
    return 1.0 / a, s / a, jnp.append(a[1:], 0.0), jnp.append(s[1:], 1.0)
  abar = np.cumprod(1.0 - betas)[ts]
  abar_next = np.append(abar[1:], 0.0).astype(np.float32)
  return (np.sqrt(1.0 / abar).astype(np.float32), np.sqrt(1.0 / abar - 1).astype(np.float32),
          np.sqrt(abar_next), np.sqrt(np.float32(1) - abar_next))


def _bk(v: jax.Array) -> jax.Array:
  """[K] -> [K, 1, 1, 1] to broadcast against [..., K, H, W, C]."""
  return v[:, None, None, None]


def forward_trajectory(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, ts: np.ndarray,
                       noise: str, num_draws: int, params, x0: jax.Array,
                       image_id: jax.Array, key: jax.Array) -> Trajectory:
  """Forward-noised states of ONE image at all K timesteps and R draws, one network call.

  Args:
    apply_fn: eval-mode network ``(params, x [N, H, W, C], t [N] int32) -> eps [N, H, W, C]``.
    schedule: diffusion schedule.
    ts: timesteps int32 [K] (static).
    noise: 'shared' or 'independent'.
    num_draws: R.
    params: network parameters.
    x0: one image [H, W, C] float32.
    image_id: scalar int32 id that seeds the noise.
    key: PRNG key (typed or raw).

  Returns:
    A `Trajectory` with arrays [R, K, H, W, C].
  """
  k_steps = len(ts)
  key_img = jax.random.fold_in(key, image_id)

  def draw(r):
    key_r = jax.random.fold_in(key_img, r)
    if noise == 'shared':
      eps = jax.random.normal(key_r, x0.shape, jnp.float32)
      return jnp.broadcast_to(eps, (k_steps,) + x0.shape)
    return jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(key_r, t), x0.shape,
                                                jnp.float32))(jnp.asarray(ts, jnp.int32))

  eps = jax.vmap(draw)(jnp.arange(num_draws))                   # [R, K, H, W, C]
  a, s = _timestep_coefficients(schedule, ts)
  x_t = _bk(a) * x0 + _bk(s) * eps
  t_flat = jnp.tile(jnp.asarray(ts, jnp.int32), num_draws)      # [R*K], r-major
  eps_theta = apply_fn(params, x_t.reshape((-1,) + x0.shape), t_flat)
  eps_theta = jnp.asarray(eps_theta, jnp.float32).reshape(x_t.shape)
  return Trajectory(x_t, eps_theta, eps, a, s)


def ddim_trajectory(apply_fn: ApplyFn, schedule: schedule_lib.Schedule, ts: np.ndarray,
                    params, x0: jax.Array) -> Trajectory:
  """DiffPath's deterministic DDIM inversion of ONE image from x_{t_0} = x0, as a lax.scan.

  Step k is DiffPath's ``ddim_reverse_sample`` (``clip_denoised=True``) with its float32
  coefficients (`_ddim_coefficients`) and order of operations, ``r_k = 1 / sqrt(abar_k)``,
  ``c_k = sqrt(1 / abar_k - 1)``:
  ``x0hat_k = clip(r_k x_k - c_k eps_theta(x_k, t_k), -1, 1)``, ``eps'_k = (r_k x_k - x0hat_k) / c_k``
  and ``x_{k+1} = sqrt(abar_{k+1}) x0hat_k + sigma_{k+1} eps'_k``.

  Args:
    apply_fn: eval-mode network.
    schedule: diffusion schedule.
    ts: timesteps int32 [K] (static).
    params: network parameters.
    x0: one image [H, W, C] float32.

  Returns:
    A `Trajectory` with arrays [1, K, H, W, C] whose ``eps_theta`` is DiffPath's eps'_k (re-derived
    from the clipped x0hat; it differs from the raw network output wherever clipping is active:
    t = 0 and saturated pixels); eps_target_k = (x_k - sqrt(abar_k) x0) / sigma_k.
  """
  a, s = _timestep_coefficients(schedule, ts)
  r, c, a_next, s_next = _ddim_coefficients(schedule, ts)

  def step(x, inp):
    t, r_k, c_k, a_n, s_n = inp
    eps = jnp.asarray(apply_fn(params, x[None], t[None]), jnp.float32)[0]
    x0hat = jnp.clip(r_k * x - c_k * eps, -1.0, 1.0)
    eps_clipped = (r_k * x - x0hat) / c_k
    return x0hat * a_n + s_n * eps_clipped, (x, eps_clipped)

  _, (x_t, eps_path) = jax.lax.scan(
      step, x0, (jnp.asarray(ts, jnp.int32), r, c, a_next, s_next))
  eps_target = (x_t - _bk(a) * x0) / _bk(s)
  return Trajectory(x_t[None], eps_path[None], eps_target[None], a, s)


# ------------------------------------------------------------------------------ maps & features


def _ssim_kwargs(scorer_cfg) -> dict:
  return dict(filter_size=int(scorer_cfg.ssim_filter_size),
              filter_sigma=float(scorer_cfg.ssim_filter_sigma),
              k1=float(scorer_cfg.ssim_k1), k2=float(scorer_cfg.ssim_k2))


def denoised_estimate(traj: Trajectory) -> jax.Array:
  """x0hat_k = clip((x_k - sigma_k eps_theta_k) / sqrt(abar_k), -1, 1), [R, K, H, W, C]."""
  return jnp.clip((traj.x_t - _bk(traj.sigma) * traj.eps_theta) / _bk(traj.sqrt_abar), -1, 1)


def trajectory_ssim(traj: Trajectory, x0: jax.Array, scorer_cfg) -> jax.Array:
  """Per-timestep SSIM map [R, K, H, W, C] of the pair chosen by ``scorer_cfg.ssim_pair``."""
  kw = _ssim_kwargs(scorer_cfg)
  if scorer_cfg.ssim_pair == 'x0':
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
  return e / _bk(traj.sigma) if scale_by_sigma else e


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


def _kind_maps(kinds: Sequence[str], traj: Trajectory, x0: jax.Array, scorer_cfg,
               diffpath: bool) -> dict:
  """Per-timestep maps v_k [R, K, H, W, C] of each kind computed from one trajectory."""
  maps = {}
  if diffpath:
    for kind in kinds:
      maps[kind] = traj.eps_theta
    return maps
  w = None
  if any(k in ('stein_ssim', 'eps_ssim') for k in kinds):
    w = ssim_weight(trajectory_ssim(traj, x0, scorer_cfg), scorer_cfg.ssim_weight)
  e = stein_error(traj, bool(scorer_cfg.scale_by_sigma)) if any(
      k in ('stein_ssim', 'stein') for k in kinds) else None
  for kind in kinds:
    if kind == 'stein_ssim':
      maps[kind] = w * e
    elif kind == 'stein':
      maps[kind] = e
    elif kind == 'eps_ssim':
      maps[kind] = w * traj.eps_theta
  return maps


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


def _map_images(fn: Callable, images: jax.Array, image_ids: jax.Array, chunk: int):
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
    scorer_cfg: ``config.scorer`` (mode, num_steps, noise, num_draws, ssim_pair, ssim_weight,
      scale_by_sigma, ssim_filter_size, ssim_filter_sigma, ssim_k1, ssim_k2, chunk).
    feature_kinds: kinds to compute, from `FEATURE_KINDS`.

  Returns:
    ``score(params, images [B, H, W, C] float in [-1, 1], image_ids [B] int32, key) -> dict`` with
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
  check_scorer_config(scorer_cfg, feature_kinds)
  kinds = tuple(dict.fromkeys(feature_kinds))
  grid_steps = int(scorer_cfg.num_steps)
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, grid_steps)
  k0 = _window_start(ts, int(scorer_cfg.get('t_min', 0)))   # seed kinds use ts[k0:]
  mode = scorer_cfg.mode
  noise = scorer_cfg.noise
  num_draws = int(scorer_cfg.num_draws)
  chunk = int(scorer_cfg.chunk)
  mode_kinds = [k for k in kinds if k in _MODE_KINDS]
  ddim_kinds = [k for k in kinds if k in _DDIM_KINDS]
  variant_kinds = [k for k in kinds if k in _DDIM_VARIANTS]
  if mode == 'ddim':   # one DDIM path serves every kind
    ddim_kinds, mode_kinds_ddim, mode_kinds = ddim_kinds, mode_kinds, []
  else:
    mode_kinds_ddim = []

  def score_one(params, x0, image_id, key):
    results = {}
    if mode_kinds:
      traj = forward_trajectory(apply_fn, schedule, ts[k0:], noise, num_draws, params, x0,
                                image_id, key)
      results.update(_kind_maps(mode_kinds, traj, x0, scorer_cfg, diffpath=False))
    if ddim_kinds or mode_kinds_ddim or variant_kinds:
      traj = ddim_trajectory(apply_fn, schedule, ts, params, x0)
      base = list(dict.fromkeys(mode_kinds_ddim + [_DDIM_VARIANTS[k] for k in variant_kinds]))
      maps = _kind_maps(base, _cut(traj, k0), x0, scorer_cfg, diffpath=False)
      results.update({k: maps[k] for k in mode_kinds_ddim})
      results.update({k: maps[_DDIM_VARIANTS[k]] for k in variant_kinds})
      results.update(_kind_maps(ddim_kinds, traj, x0, scorer_cfg, diffpath=True))
    feats, per_t, per_d, per_t_r, per_d_r = {}, {}, {}, {}, {}
    cache = {}
    for kind in kinds:
      v = results[kind]
      if id(v) not in cache:   # diffpath_6d / diffpath_1d share one reduction
        cache[id(v)] = six_d_features(v, grid_steps)
      f6, per_t_r[kind], per_d_r[kind] = cache[id(v)]
      per_t[kind], per_d[kind] = per_t_r[kind].mean(0), per_d_r[kind].mean(0)
      feats[kind] = jnp.sqrt(f6[4:5]) if kind == 'diffpath_1d' else f6
    return {'features': feats, 'per_timestep': per_t, 'per_timestep_deriv': per_d,
            'per_draw': per_t_r, 'per_draw_deriv': per_d_r}

  def score(params, images: jax.Array, image_ids: jax.Array, key: jax.Array) -> dict:
    images = jnp.asarray(images)
    image_ids = jnp.asarray(image_ids)
    if images.ndim != 4:
      raise ValueError(f'Images must have shape [B, H, W, C], got shape {images.shape}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'Images must be float in [-1, 1], got dtype {images.dtype}; convert '
                       'with x.astype(float32) / 127.5 - 1.')
    if image_ids.shape != images.shape[:1] or not jnp.issubdtype(image_ids.dtype, jnp.integer):
      raise ValueError(f'image_ids must be integers of shape [B]={images.shape[:1]}, got '
                       f'{image_ids.dtype}{image_ids.shape}.')
    images = images.astype(jnp.float32)
    image_ids = image_ids.astype(jnp.int32)
    return _map_images(lambda x0, i: score_one(params, x0, i, key), images, image_ids, chunk)

  return score


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
  check_scorer_config(scorer_cfg)
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {MODES}.')
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, int(scorer_cfg.num_steps))
  k0 = _window_start(ts, int(scorer_cfg.get('t_min', 0)))

  def one(x0, image_id):
    if mode == 'forward':
      traj = forward_trajectory(apply_fn, schedule, ts[k0:], scorer_cfg.noise, 1, params, x0,
                                image_id, key)
    else:
      traj = _cut(ddim_trajectory(apply_fn, schedule, ts, params, x0), k0)
    ssim = trajectory_ssim(traj, x0, scorer_cfg)
    w = ssim_weight(ssim, scorer_cfg.ssim_weight)
    e = stein_error(traj, bool(scorer_cfg.scale_by_sigma))
    out = dict(x_t=traj.x_t, x0hat=denoised_estimate(traj), eps_theta=traj.eps_theta,
               eps_target=traj.eps_target, error=e, ssim=ssim, weight=w, weighted_error=w * e)
    return {k: v[0] for k, v in out.items()}

  out = jax.jit(jax.vmap(one))(jnp.asarray(images, jnp.float32), jnp.asarray(image_ids, jnp.int32))
  out = {k: np.asarray(v) for k, v in out.items()}
  out['timesteps'] = ts[k0:]
  return out


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
  x = jnp.where(x == 0, jnp.float32(0), x).reshape(x.shape[0], -1)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  pos = jnp.arange(bits.shape[1], dtype=jnp.uint32)
  mixed = _mix32(bits ^ _mix32(pos * jnp.uint32(0x9E3779B9) + jnp.uint32(1)))
  h = _mix32(jnp.sum(mixed, axis=1, dtype=jnp.uint32) ^ jnp.uint32(bits.shape[1]))
  return jax.lax.bitcast_convert_type(h, jnp.int32)


# ------------------------------------------------------------------------------ anomaly maps

# Kinds with a per-pixel map: the seed kinds (their v_k is a map of the image's pixels).
MAP_KINDS = ('stein_ssim', 'stein', 'eps_ssim', 'stein_ssim_ddim', 'stein_ddim')


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
  if kind not in MAP_KINDS:
    raise ValueError(f'No anomaly map for kind {kind!r}; choose from {MAP_KINDS}.')
  k = int(scorer_cfg.num_steps)
  k_kind = len(kind_timesteps(num_timesteps, scorer_cfg, kind))
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
  if kind not in MAP_KINDS:
    raise ValueError(f'No anomaly map for kind {kind!r}; choose from {MAP_KINDS} (the DiffPath '
                     'baselines have no per-pixel map).')
  check_scorer_config(scorer_cfg, (kind,))
  ts = schedule_lib.scorer_timesteps(schedule.num_timesteps, int(scorer_cfg.num_steps))
  ddim = kind in _DDIM_VARIANTS or scorer_cfg.mode == 'ddim'
  base = _DDIM_VARIANTS.get(kind, kind)
  noise, num_draws, chunk = scorer_cfg.noise, int(scorer_cfg.num_draws), int(scorer_cfg.chunk)

  def map_one(params, x0, image_id, key, weights):
    if ddim:
      traj = ddim_trajectory(apply_fn, schedule, ts, params, x0)
    else:
      traj = forward_trajectory(apply_fn, schedule, ts, noise, num_draws, params, x0, image_id,
                                key)
    maps = _kind_maps(tuple(dict.fromkeys((base, 'stein'))), traj, x0, scorer_cfg,
                      diffpath=False)
    reduce = lambda v: jnp.sum(_bk(weights) * jnp.mean(v * v, axis=0), axis=(0, 3))  # noqa: E731
    return {'map': reduce(maps[base]), 'baseline': reduce(maps['stein'])}

  def map_fn(params, images: jax.Array, image_ids: jax.Array, key: jax.Array,
             timestep_weights: jax.Array) -> dict:
    images = jnp.asarray(images)
    image_ids = jnp.asarray(image_ids)
    weights = jnp.asarray(timestep_weights)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'Images must be float [B, H, W, C] in [-1, 1], got '
                       f'{images.dtype}{images.shape}.')
    if image_ids.shape != images.shape[:1] or not jnp.issubdtype(image_ids.dtype, jnp.integer):
      raise ValueError(f'image_ids must be integers of shape [B]={images.shape[:1]}, got '
                       f'{image_ids.dtype}{image_ids.shape}.')
    if weights.shape != ts.shape:
      raise ValueError(f'timestep_weights must have shape [{len(ts)}] (one per grid timestep '
                       f'{ts.tolist()}), got {weights.shape}; see anomaly_map_weights.')
    weights = weights.astype(jnp.float32)
    return _map_images(lambda x0, i: map_one(params, x0, i, key, weights),
                       images.astype(jnp.float32), image_ids.astype(jnp.int32), chunk)

  return map_fn


__all__ = ['FEATURE_KINDS', 'FEATURE_DIMS', 'MODES', 'EPS_SSIM_CLIP', 'EPS_SSIM_MAX_VAL',
           'content_ids',
           'Trajectory', 'check_scorer_config', 'kind_timesteps', 'validate_images',
           'forward_trajectory', 'ddim_trajectory', 'denoised_estimate', 'trajectory_ssim',
           'ssim_weight', 'stein_error', 'power_sums', 'six_d_features', 'make_trajectory_scorer',
           'trajectory_maps', 'MAP_KINDS', 'anomaly_map_weights', 'make_anomaly_map_fn']
