"""Tests of ddm_ood.scorer on a small real UNet and real images (CPU, offline, deterministic).

The compiled scorer is checked against a plain per-timestep Python loop written here (network
called once per timestep, SSIM from skimage in float64, power sums in numpy float64), and for
invariance to batch size, order, chunking and device count.

Run as a script with ``--child OUT.npz`` it is the 4-simulated-device half of the sharding test.
"""

import functools
import os
import subprocess
import sys

if __name__ == '__main__':  # the sharding child: 4 simulated CPU devices
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from configs.default import get_config
from ddm_ood import pixel_maps
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood.unet import UNet
from tests.train_helpers import random_params

T = 100
K = 4
SIZE = 16
ALL_KINDS = scorer_lib.FEATURE_KINDS
# Compiled scorer vs the float64 reference loop (independent SSIM implementation, float32 network).
REF_RTOL = 1e-4
# Same function, different batch composition / chunking / device count (float32 reassociation).
INV_RTOL = 2e-4


@functools.lru_cache(maxsize=None)
def setup():
  """(apply_fn, params, schedule, images [80, 16, 16, 1] in [-1, 1]); deterministic."""
  model = UNet(channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               num_heads=2, dropout=0.0, num_groups=4)
  # Random init in numpy (jitting flax's init costs more compile time than all the tests).
  params = random_params(model, SIZE)
  apply_fn = lambda p, x, t: model.apply(p, x, t)  # noqa: E731
  cam = skimage.data.camera()[::4, ::4].astype(np.float32) / 127.5 - 1       # 128 x 128
  coins = skimage.data.coins()[:256:4, :320:4].astype(np.float32) / 127.5 - 1  # 64 x 80
  tiles = [cam.reshape(8, SIZE, 8, SIZE).swapaxes(1, 2).reshape(64, SIZE, SIZE),
           coins.reshape(4, SIZE, 5, SIZE).swapaxes(1, 2).reshape(20, SIZE, SIZE)[:16]]
  images = np.concatenate(tiles)[..., None]
  return apply_fn, params, schedule_lib.make_schedule('cosine', T), images


def scorer_cfg(**overrides):
  cfg = get_config().scorer
  cfg.num_steps = K
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@functools.lru_cache(maxsize=None)
def _jit_apply():
  apply_fn, *_ = setup()
  return jax.jit(apply_fn)


# ------------------------------------------------------------------------------ reference loop


def _ref_ssim(a, b, data_range, cfg):
  return structural_similarity(
      a.astype(np.float64), b.astype(np.float64), gaussian_weights=True,
      sigma=cfg.ssim_filter_sigma, use_sample_covariance=False, data_range=data_range,
      K1=cfg.ssim_k1, K2=cfg.ssim_k2, full=True, channel_axis=-1)[1]


def _ref_power_features(maps):
  """maps: list over k of float64 [H, W, C] -> (feat6, per_t [K', 3], per_d [K'-1, 3])."""
  v = np.stack(maps)
  ps = lambda u: np.stack([(u ** p).sum(axis=(-3, -2, -1)) for p in (1, 2, 3)], -1)  # noqa
  per_t = ps(v)
  per_d = ps(K * (v[1:] - v[:-1]))   # the grid's step 1/K, also for a window of the grid
  return np.concatenate([per_t.sum(0), per_d.sum(0)]), per_t, per_d


def reference_scores(cfg, images, image_ids, key, kinds):
  """Plain Python loop: one network call per (image, draw, timestep); numpy float64 elsewhere."""
  apply_fn = _jit_apply()
  _, params, sched, _ = setup()
  ts = np.arange(K) * T // K
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  sa, sg = np.sqrt(abar[ts]), np.sqrt(1 - abar[ts])
  window = [k for k in range(K) if ts[k] >= cfg.t_min]   # the seed kinds' timesteps
  net = lambda x, k: np.asarray(  # noqa: E731
      apply_fn(params, jnp.asarray(x[None], jnp.float32), jnp.asarray([ts[k]], jnp.int32))[0],
      np.float64)

  def kind_maps(x0, xs, eps_th, eps_tg, names=None):
    out = {}
    for kind in names or [k for k in kinds if k in ('stein_ssim', 'stein', 'eps_ssim')]:
      maps = []
      for k in window:
        e = eps_th[k] - eps_tg[k]
        if cfg.scale_by_sigma:
          e = e / sg[k]
        if cfg.ssim_pair == 'x0':
          x0hat = np.clip((xs[k] - sg[k] * eps_th[k]) / sa[k], -1, 1)
          s = _ref_ssim(x0, x0hat, 2.0, cfg)
        else:
          s = _ref_ssim(np.clip(eps_th[k], -4, 4), np.clip(eps_tg[k], -4, 4), 8.0, cfg)
        w = 1 - s if cfg.ssim_weight == 'one_minus' else 2 - s
        maps.append({'stein_ssim': w * e, 'stein': e, 'eps_ssim': w * eps_th[k]}[kind])
      out[kind] = _ref_power_features(maps)
    return out

  def ddim(x0):
    # eps_th holds DiffPath's eps' (re-derived from the clipped x0hat), not the raw network output.
    x, xs, eps_th = x0, [], []
    for k in range(K):
      eps = net(x, k)
      xs.append(x)
      x0hat = np.clip((x - sg[k] * eps) / sa[k], -1, 1)
      eps_c = (x - sa[k] * x0hat) / sg[k]
      eps_th.append(eps_c)
      if k + 1 < K:
        x = sa[k + 1] * x0hat + sg[k + 1] * eps_c
    eps_tg = [(xs[k] - sa[k] * x0) / sg[k] for k in range(K)]
    return xs, eps_th, eps_tg

  results = []
  for x0, image_id in zip(np.asarray(images, np.float64), image_ids):
    res = {}
    mode_kinds = [k for k in kinds if k in ('stein_ssim', 'stein', 'eps_ssim')]
    if mode_kinds and cfg.mode == 'forward':
      key_img = jax.random.fold_in(key, int(image_id))
      draws = []
      for r in range(cfg.num_draws):
        key_r = jax.random.fold_in(key_img, r)
        xs, eps_th, eps_tg = {}, {}, {}
        for k in window:   # independent noise is keyed by the timestep
          kk = key_r if cfg.noise == 'shared' else jax.random.fold_in(key_r, int(ts[k]))
          eps = np.asarray(jax.random.normal(kk, x0.shape, jnp.float32), np.float64)
          xs[k] = sa[k] * x0 + sg[k] * eps
          eps_th[k] = net(xs[k], k)
          eps_tg[k] = eps
        draws.append(kind_maps(x0, xs, eps_th, eps_tg))
      for kind in mode_kinds:
        res[kind] = [np.mean([d[kind][j] for d in draws], axis=0) for j in range(3)]
    if [k for k in kinds if k.startswith('diffpath') or k.endswith('_ddim')] or (
        mode_kinds and cfg.mode == 'ddim'):
      xs, eps_th, eps_tg = ddim(x0)
      if cfg.mode == 'ddim':
        res.update({k: list(v) for k, v in kind_maps(x0, xs, eps_th, eps_tg).items()
                    if k in mode_kinds})
      for variant, base in (('stein_ssim_ddim', 'stein_ssim'), ('stein_ddim', 'stein')):
        if variant in kinds:  # the ablation kinds: their base kind on the DDIM path
          res[variant] = list(kind_maps(x0, xs, eps_th, eps_tg, names=[base])[base])
      f6, per_t, per_d = _ref_power_features(eps_th)
      if 'diffpath_6d' in kinds:
        res['diffpath_6d'] = [f6, per_t, per_d]
      if 'diffpath_1d' in kinds:
        res['diffpath_1d'] = [np.sqrt(f6[4:5]), per_t, per_d]
    results.append(res)
  return {name: {kind: np.stack([r[kind][j] for r in results]) for kind in kinds}
          for j, name in enumerate(('features', 'per_timestep', 'per_timestep_deriv'))}


def assert_close(got, want, rtol, what=''):
  """|got - want| <= rtol * max(|want|, largest |want| of its column).

  Columns are the last axis (feature component, or power p); the floor is taken over the batch
  and the timesteps. Signed power sums can cancel (e.g. <w e>_3 at t = 0, where w = 1 - SSIM is
  itself a float32 cancellation), so a pure elementwise rtol would test rounding, not the method.
  """
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = np.abs(want).reshape(-1, want.shape[-1]).max(axis=0) if want.size else 1.0
  bad = np.abs(got - want) > rtol * np.maximum(np.abs(want), scale)
  if want.size:
    print(f'{what}: max rel err {np.max(np.abs(got - want) / np.maximum(np.abs(want), scale)):.3g}')
  assert not bad.any(), (f'{what}: max rel err '
                         f'{np.max(np.abs(got - want) / np.maximum(np.abs(want), scale)):.3g}')


@functools.lru_cache(maxsize=None)
def _jitted_scorer(cfg_items, kinds):
  apply_fn, _, sched, _ = setup()
  return jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg(**dict(cfg_items)),
                                                   kinds))


def run_scorer(cfg, images, image_ids, kinds=ALL_KINDS, key=None):
  """Runs the jitted scorer (one compilation per config, kinds and batch shape)."""
  params = setup()[1]
  fn = _jitted_scorer(tuple(sorted(cfg.to_dict().items())), tuple(kinds))
  key = jax.random.key(42) if key is None else key
  out = fn(params, jnp.asarray(images), jnp.asarray(image_ids, jnp.int32), key)
  return jax.tree.map(np.asarray, out)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize('overrides', [
    dict(mode='forward'),
    dict(mode='ddim'),
    dict(mode='forward', ssim_pair='eps', ssim_weight='two_minus', scale_by_sigma=True,
         num_draws=2, noise='independent'),
    dict(mode='ddim', ssim_pair='eps', scale_by_sigma=True),
    dict(mode='forward', t_min=30, num_draws=2, noise='independent'),
    dict(mode='ddim', t_min=25),
], ids=['forward', 'ddim', 'forward-eps-two_minus-sigma-R2-indep', 'ddim-eps-sigma',
        'forward-tmin30-R2-indep', 'ddim-tmin25'])
def test_matches_python_reference_loop(overrides):
  cfg = scorer_cfg(**overrides)
  images = setup()[3][[3, 20, 70]]
  ids = np.array([3, 20, 70], np.int32)
  key = jax.random.key(42)
  got = run_scorer(cfg, images, ids, key=key)
  want = reference_scores(cfg, images, ids, key, ALL_KINDS)
  for name in ('features', 'per_timestep', 'per_timestep_deriv'):
    for kind in ALL_KINDS:
      assert got[name][kind].dtype == np.float32
      assert_close(got[name][kind], want[name][kind], REF_RTOL, f'{name}/{kind}')
  for kind in ALL_KINDS:
    k_kind = len(scorer_lib.kind_timesteps(T, cfg, kind))
    in_window = int(np.sum(np.arange(K) * T // K >= cfg.t_min))   # t_min=25: 25, 50, 75
    assert k_kind == (K if kind.startswith('diffpath') else in_window), kind
    assert got['features'][kind].shape == (3, scorer_lib.FEATURE_DIMS[kind])
    assert got['per_timestep'][kind].shape == (3, k_kind, 3)
    assert got['per_timestep_deriv'][kind].shape == (3, k_kind - 1, 3)


INV_KINDS = ('stein_ssim', 'diffpath_6d')   # one forward and one DDIM trajectory


@functools.lru_cache(maxsize=None)
def _batch64():
  """Features of images 0..63 (ids 100..163) scored in one batch of 64 (the invariance anchor)."""
  images = setup()[3][:64]
  return run_scorer(scorer_cfg(), images, np.arange(64) + 100, INV_KINDS)


def _rows(out, rows):
  return jax.tree.map(lambda a: a[rows], out)


def _check_same(got, want, what):
  for name in ('features', 'per_timestep', 'per_timestep_deriv'):
    for kind in INV_KINDS:
      assert_close(got[name][kind], want[name][kind], INV_RTOL, f'{what}: {name}/{kind}')


def test_invariant_to_batch_size_order_and_chunking():
  images = setup()[3]
  anchor = _batch64()
  cfg = scorer_cfg()
  # Alone.
  _check_same(run_scorer(cfg, images[5:6], [105], INV_KINDS), _rows(anchor, [5]), 'alone')
  # In a batch of 7 padded with other images (incl. ones outside the anchor set), and reversed.
  rows = np.array([70, 5, 12, 63, 75, 0, 33])
  batch7 = run_scorer(cfg, images[rows], rows + 100, INV_KINDS)
  in_anchor = rows < 64
  _check_same(_rows(batch7, in_anchor), _rows(anchor, rows[in_anchor]), 'batch of 7')
  rev = run_scorer(cfg, images[rows[::-1]], rows[::-1] + 100, INV_KINDS)
  _check_same(rev, _rows(batch7, slice(None, None, -1)), 'reversed')
  # Chunks of 1 (strided lax.map) and 3 (lax.map batch_size with a remainder).
  for chunk in (1, 3):
    got = run_scorer(scorer_cfg(chunk=chunk), images[rows], rows + 100, INV_KINDS)
    _check_same(got, batch7, f'chunk={chunk}')


def test_invariant_to_device_count(tmp_path):
  out_path = tmp_path / 'sharded.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', str(out_path)],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = np.load(out_path)
  assert int(got['num_devices']) == 4
  anchor = _batch64()
  for chunk in (0, 4):
    for kind in INV_KINDS:
      assert_close(got[f'chunk{chunk}/{kind}'], anchor['features'][kind][:8], INV_RTOL,
                   f'4 devices, chunk={chunk}, {kind}')
  # Strided chunks keep every device on its own rows: no cross-device traffic at all.
  assert int(got['collectives_chunk4']) == 0, 'chunked scoring moved data between devices'
  assert 'multiple of the 4 devices' in str(got['error_chunk2'])


def _sharded_child(out_path):
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4,), ('data',))
  apply_fn, params, sched, images = setup()
  rows = NamedSharding(mesh, P('data'))
  x = jax.device_put(images[:8], rows)
  ids = jax.device_put(np.arange(8, dtype=np.int32) + 100, rows)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  result = {'num_devices': jax.device_count()}
  for chunk in (0, 4):
    fn = jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg(chunk=chunk),
                                                   INV_KINDS))
    compiled = fn.lower(params, x, ids, jax.random.key(42)).compile()
    out = compiled(params, x, ids, jax.random.key(42))
    assert out['features']['stein_ssim'].sharding.spec[0] == 'data'
    for kind in INV_KINDS:
      result[f'chunk{chunk}/{kind}'] = np.asarray(out['features'][kind])
    hlo = compiled.as_text()
    result[f'collectives_chunk{chunk}'] = sum(
        hlo.count(op) for op in ('all-gather', 'all-to-all', 'collective-permute',
                                 'all-reduce', 'reduce-scatter'))
  # A chunk that cannot be split evenly over the devices is refused with a clear message.
  fn = scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg(chunk=2), INV_KINDS)
  try:
    jax.eval_shape(fn, params, x, ids, jax.random.key(42))
    result['error_chunk2'] = ''
  except ValueError as e:
    result['error_chunk2'] = str(e)
  np.savez(out_path, **result)


def test_noise_options_and_sigma_scaling():
  apply_fn, params, sched, images = setup()
  x, ids, key = images[[1, 40]], np.array([1, 40]), jax.random.key(7)
  maps = {}
  for noise, scale in (('shared', False), ('independent', False), ('shared', True)):
    maps[noise, scale] = pixel_maps.trajectory_maps(
        apply_fn, sched, scorer_cfg(noise=noise, scale_by_sigma=scale), params, x, ids, key)
  shared, indep = maps['shared', False], maps['independent', False]
  assert shared['x_t'].shape == (2, K, SIZE, SIZE, 1)
  # Shared: one eps for every timestep; independent: a fresh one per timestep.
  np.testing.assert_array_equal(shared['eps_target'][:, 1:], shared['eps_target'][:, :1].repeat(
      K - 1, axis=1))
  assert not np.allclose(indep['eps_target'][:, 0], indep['eps_target'][:, 1])
  assert not np.allclose(shared['error'], indep['error'])
  # The error is divided by sigma_t, nothing else changes.
  sigma = np.asarray(sched.sigmas)[schedule_lib.scorer_timesteps(T, K)][None, :, None, None, None]
  np.testing.assert_allclose(maps['shared', True]['error'], shared['error'] / sigma, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(maps['shared', True]['ssim'], shared['ssim'])
  # The maps are the ones the scorer reduces.
  np.testing.assert_allclose(shared['weighted_error'], shared['weight'] * shared['error'],
                             rtol=1e-6)
  np.testing.assert_allclose(shared['weight'], 1 - shared['ssim'], atol=1e-7)
  got = run_scorer(scorer_cfg(), x, ids, ('stein_ssim',), key=key)
  v = shared['weighted_error'].astype(np.float64)
  per_t = np.stack([(v ** p).sum(axis=(2, 3, 4)) for p in (1, 2, 3)], -1)
  assert_close(got['per_timestep']['stein_ssim'], per_t, 1e-4, 'maps vs scorer')
  # num_draws = 2 averages two different draws: differs from draw 0 alone.
  two = run_scorer(scorer_cfg(num_draws=2), x, ids, ('stein_ssim',), key=key)
  assert not np.allclose(two['features']['stein_ssim'], got['features']['stein_ssim'])


def test_validate_images_rejects_bad_input():
  images = setup()[3][:2]
  ok = scorer_lib.validate_images(images, SIZE, 1)
  assert ok.dtype == np.float32 and ok.shape == images.shape
  cases = [
      (images[0], 'shape [B, H, W, C]'),
      (np.repeat(images, 3, axis=-1), 'channel'),
      (images[:, :8, :8], 'resize'),
      (((images + 1) * 127.5).astype(np.uint8), 'astype'),
      (np.where(np.arange(2)[:, None, None, None] == 1, np.nan, images), 'found NaN'),
      (np.full_like(images, np.inf), 'inf'),
      ((images + 1) * 127.5, 'x / 127.5 - 1'),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
      scorer_lib.validate_images(bad, SIZE, 1)


def test_scorer_rejects_bad_shapes_and_config():
  apply_fn, params, sched, images = setup()
  fn = scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg())
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='shape'):
    fn(params, images[0], np.arange(1), key)
  with pytest.raises(ValueError, match='float'):
    fn(params, images[:2].astype(np.int32), np.arange(2), key)
  with pytest.raises(ValueError, match='image_ids'):
    fn(params, images[:2], np.arange(3), key)
  with pytest.raises(ValueError, match='SSIM window'):
    jax.eval_shape(fn, params, jnp.zeros((2, 10, 10, 1)), jnp.arange(2), key)
  for bad in (dict(mode='reverse'), dict(noise='fresh'), dict(ssim_pair='x'),
              dict(ssim_weight='one'), dict(num_draws=0), dict(chunk=-1), dict(t_min=-1),
              dict(t_min=T - T // K + 1)):
    with pytest.raises(ValueError, match='config.scorer'):
      scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg(**bad))
  with pytest.raises(ValueError, match='leaves no timestep'):
    scorer_lib.kind_timesteps(T, scorer_cfg(t_min=T), 'stein_ssim')
  np.testing.assert_array_equal(scorer_lib.kind_timesteps(T, scorer_cfg(t_min=T), 'diffpath_6d'),
                                np.arange(K) * T // K)
  with pytest.raises(ValueError, match='Unknown feature kind'):
    scorer_lib.make_trajectory_scorer(apply_fn, sched, scorer_cfg(), ('stein', 'msma'))


if __name__ == '__main__':
  assert sys.argv[1] == '--child'
  _sharded_child(sys.argv[2])
