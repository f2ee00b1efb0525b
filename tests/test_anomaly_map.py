"""Per-pixel anomaly maps (pixel_maps.make_anomaly_map_fn, api.build_anomaly_map_fn) and pixel-level
localisation (ddm_ood.localisation) on a small random UNet (CPU, offline, deterministic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from configs.default import get_config
from ddm_ood import api
from ddm_ood import localisation
from ddm_ood import pixel_maps
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood.unet import UNet
from tests.train_helpers import random_params

T = 100
K = 4
SIZE = 16
RTOL = 1e-4   # map pixel sums vs the scorer's power sums (float32 summation order)
# The default of these tests: two independent draws, so the draw averaging is exercised too.
BASE = dict(num_draws=2, noise='independent')


@functools.lru_cache(maxsize=None)
def _setup():
  """(apply_fn, params, schedule, images [24, 16, 16, 1] in [-1, 1]); deterministic."""
  model = UNet(channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               num_heads=2, dropout=0.0, num_groups=4)
  params = random_params(model, SIZE)
  apply_fn = lambda p, x, t: model.apply(p, x, t)  # noqa: E731
  cam = skimage.data.camera()[::4, ::4].astype(np.float32) / 127.5 - 1           # 128 x 128
  coins = skimage.data.coins()[:256:4, :320:4].astype(np.float32) / 127.5 - 1    # 64 x 80
  tiles = [cam.reshape(8, SIZE, 8, SIZE).swapaxes(1, 2).reshape(64, SIZE, SIZE)[20:36],
           coins.reshape(4, SIZE, 5, SIZE).swapaxes(1, 2).reshape(20, SIZE, SIZE)[:8]]
  images = np.concatenate(tiles)[..., None]
  return apply_fn, params, schedule_lib.make_schedule('cosine', T), images


def _cfg(**overrides):
  cfg = get_config().scorer
  cfg.num_steps = K
  for k, v in {**BASE, **overrides}.items():
    setattr(cfg, k, v)
  return cfg


@functools.lru_cache(maxsize=None)
def _jitted(cfg_items, kind, scorer_kinds=None):
  apply_fn, _, sched, _ = _setup()
  cfg = _cfg(**dict(cfg_items))
  if scorer_kinds is None:
    return jax.jit(pixel_maps.make_anomaly_map_fn(apply_fn, sched, cfg, kind))
  return jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, sched, cfg, scorer_kinds))


def run_map(overrides, images, ids, weights=None, kind='stein_ssim'):
  fn = _jitted(tuple(sorted(overrides.items())), kind)
  w = np.ones(K, np.float32) if weights is None else np.asarray(weights, np.float32)
  out = fn(_setup()[1], jnp.asarray(images), jnp.asarray(ids, jnp.int32), jax.random.key(7), w)
  return jax.tree.map(np.asarray, out)


def run_scorer(overrides, images, ids, kinds):
  fn = _jitted(tuple(sorted(overrides.items())), None, tuple(kinds))
  out = fn(_setup()[1], jnp.asarray(images), jnp.asarray(ids, jnp.int32), jax.random.key(7))
  return jax.tree.map(np.asarray, out)


def _close(got, want, rtol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))
  print(f'{what}: max rel err {err:.3g}')
  assert got.shape == want.shape and err <= rtol, (what, err)


IDS3 = np.array([3, 11, 19], np.int32)


# ------------------------------------------------------------------------------ maps vs scorer


@pytest.mark.parametrize('overrides,kind,stein_kind', [
    ({}, 'stein_ssim', 'stein'),
    ({}, 'stein_ssim_ddim', 'stein_ddim'),
    (dict(num_draws=1, noise='shared', ssim_pair='eps', t_min=50), 'stein_ssim', 'stein'),
], ids=['forward-R2-indep', 'ddim-variant', 'forward-eps-tmin50'])
def test_map_pixel_sums_are_the_scorers_power_sums(overrides, kind, stein_kind):
  images = _setup()[3][[3, 11, 19]]
  cfg = _cfg(**overrides)
  weights = pixel_maps.anomaly_map_weights(T, cfg, kind)       # zeros before t_min
  out = run_map(overrides, images, IDS3, weights, kind)
  for name in ('map', 'baseline'):   # (a) shape, finite, non-negative
    assert out[name].shape == (3, SIZE, SIZE) and out[name].dtype == np.float32
    assert np.isfinite(out[name]).all() and (out[name] >= 0).all()
    assert out[name].std() > 0
  per_t = run_scorer(overrides, images, IDS3, (stein_kind, kind))['per_timestep']
  k_kind = len(scorer_lib.kind_timesteps(T, cfg, kind))
  assert per_t[kind].shape == (3, k_kind, 3)
  # (b) the map splits the scorer's p = 2 power sums over pixels.
  _close(out['map'].sum((1, 2)), per_t[kind][..., 1].sum(1), RTOL, f'{kind} map')
  _close(out['baseline'].sum((1, 2)), per_t[stein_kind][..., 1].sum(1), RTOL, 'baseline')
  # The SSIM weight (1 - SSIM <= 2) changes the map: the two are not the same picture.
  assert np.abs(out['map'] - out['baseline']).max() > 1e-3 * out['baseline'].max()


def test_timestep_weights_drop_and_scale_timesteps():
  images = _setup()[3][[3, 11, 19]]
  w = np.array([0.0, 2.0, 0.0, 0.5], np.float32)
  got = run_map({}, images, IDS3, w)
  per_t = run_scorer({}, images, IDS3, ('stein', 'stein_ssim'))['per_timestep']
  # (c) manual weighted sum of the scorer's per-timestep power sums ...
  _close(got['map'].sum((1, 2)), (w * per_t['stein_ssim'][..., 1]).sum(1), RTOL, 'weighted map')
  _close(got['baseline'].sum((1, 2)), (w * per_t['stein'][..., 1]).sum(1), RTOL, 'weighted base')
  # ... and pixel by pixel: the weighted sum of the one-timestep maps.
  single = [run_map({}, images, IDS3, np.eye(K, dtype=np.float32)[k]) for k in range(K)]
  for name in ('map', 'baseline'):
    manual = sum(float(w[k]) * single[k][name] for k in range(K))
    np.testing.assert_allclose(got[name], manual, rtol=1e-5, atol=1e-6 * manual.max())
  # The dropped timesteps carried weight: the test can fail.
  ones = run_map({}, images, IDS3)
  assert np.abs(ones['map'] - got['map']).max() > 0.1 * got['map'].max()
  # The default weights follow the kind's window; wrong lengths are refused.
  np.testing.assert_array_equal(
      pixel_maps.anomaly_map_weights(T, _cfg(t_min=50), 'stein_ssim'), [0, 0, 1, 1])
  np.testing.assert_array_equal(
      pixel_maps.anomaly_map_weights(T, _cfg(t_min=50), 'stein_ssim', [3, 4]), [0, 0, 3, 4])
  with pytest.raises(ValueError, match='timestep weights must have shape'):
    pixel_maps.anomaly_map_weights(T, _cfg(t_min=50), 'stein_ssim', [1, 2, 3])
  with pytest.raises(ValueError, match='timestep_weights must have shape'):
    run_map({}, images, IDS3, np.ones(K + 1))
  with pytest.raises(ValueError, match='No anomaly map for kind'):
    pixel_maps.make_anomaly_map_fn(_setup()[0], _setup()[2], _cfg(), 'diffpath_6d')


def test_map_invariant_to_batch_size_and_chunking():
  images = _setup()[3][:4]
  ids = np.array([100, 101, 102, 103], np.int32)
  full = run_map({}, images, ids)
  # (d) strided chunks (chunk divides B), lax.map remainder chunks, and a batch of one.
  strided = run_map(dict(chunk=2), images, ids)
  remainder = run_map(dict(chunk=2), images[:3], ids[:3])
  one = run_map({}, images[2:3], ids[2:3])
  for name in ('map', 'baseline'):
    np.testing.assert_allclose(strided[name], full[name], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(remainder[name], full[name][:3], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(one[name], full[name][2:3], rtol=2e-4, atol=1e-6)
  # Another id draws other noise: the map is not a function of the pixels alone.
  other = run_map({}, images, ids + 50)
  assert np.abs(other['baseline'] - full['baseline']).max() > 1e-2 * full['baseline'].max()


# ------------------------------------------------------------------------------ localisation


def test_paste_patches_masks_pixels_and_determinism():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (6, 20, 20, 3)).astype(np.float32)
  donors = rng.uniform(-1, 1, (4, 20, 20, 3)).astype(np.float32)
  pasted, masks = localisation.paste_patches(images, donors, seed=3, frac=(0.3, 0.5))
  assert pasted.shape == images.shape and masks.shape == (6, 20, 20) and masks.dtype == bool
  for i in range(6):
    ys, xs = np.nonzero(masks[i])
    side = ys.max() - ys.min() + 1
    assert xs.max() - xs.min() + 1 == side and masks[i].sum() == side * side   # a square
    assert 6 <= side <= 10                                   # round(0.3 * 20) .. round(0.5 * 20)
    np.testing.assert_array_equal(pasted[i][~masks[i]], images[i][~masks[i]])
    # The pasted pixels are a same-size crop of donor i % 4, found at some offset.
    patch = pasted[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    d = donors[i % 4]
    assert any(np.array_equal(patch, d[y:y + side, x:x + side])
               for y in range(21 - side) for x in range(21 - side))
  again, masks2 = localisation.paste_patches(images, donors, seed=3)
  np.testing.assert_array_equal(again, pasted)
  np.testing.assert_array_equal(masks2, masks)
  _, masks3 = localisation.paste_patches(images, donors, seed=4)
  assert not np.array_equal(masks3, masks)
  # Image i's patch depends on (seed, i) only, not on N.
  first, first_mask = localisation.paste_patches(images[:2], donors, seed=3)
  np.testing.assert_array_equal(first, pasted[:2])
  np.testing.assert_array_equal(first_mask, masks[:2])
  with pytest.raises(ValueError, match='frac'):
    localisation.paste_patches(images, donors, seed=0, frac=(0.6, 0.2))
  with pytest.raises(ValueError, match='donors must have'):
    localisation.paste_patches(images, donors[..., :1], seed=0)


def test_pixel_auroc_values():
  masks = np.zeros((3, 8, 8), bool)
  masks[:, 2:5, 3:6] = True
  assert localisation.pixel_auroc(masks.astype(np.float32), masks) == 1.0
  assert localisation.pixel_auroc(-masks.astype(np.float32), masks) == 0.0
  assert localisation.pixel_auroc(np.full(masks.shape, 0.3), masks) == 0.5
  # A noisy map: pooled over images, the same as metrics over the flat pixels.
  rng = np.random.default_rng(1)
  noisy = masks + rng.normal(0, 1.0, masks.shape)
  a = localisation.pixel_auroc(noisy, masks)
  pos, neg = noisy[masks], noisy[~masks]
  want = np.mean(pos[:, None] > neg[None, :])        # no ties among continuous values
  assert abs(a - want) < 1e-12 and 0.6 < a < 0.95
  with pytest.raises(ValueError, match='some but not all'):
    localisation.pixel_auroc(noisy, np.zeros_like(masks))
  with pytest.raises(ValueError, match='shape'):
    localisation.pixel_auroc(noisy[0], masks)


def test_localisation_end_to_end_and_api_fn():
  _, params, sched, images = _setup()
  ids = np.array([100, 101, 102, 103], np.int32)
  # (f) coin crops pasted into camera tiles, localised by the tiny random network's maps.
  pasted, masks = localisation.paste_patches(images[:4], images[16:], seed=0)
  out = run_map({}, pasted, ids)
  res = localisation.localisation_auroc(out, masks)
  assert set(res) == {'map', 'baseline'}
  for name in res:
    assert res[name] == localisation.pixel_auroc(out[name], masks)
    # Mann-Whitney over all (patch pixel, other pixel) pairs of the 4 images, ties 1/2.
    pos, neg = out[name][masks][:, None], out[name][~masks][None, :]
    want = np.mean(pos > neg) + 0.5 * np.mean(pos == neg)
    assert abs(res[name] - want) < 1e-12 and res[name] != 0.5
  with pytest.raises(ValueError, match='lacks'):
    localisation.localisation_auroc({'map': out['map']}, masks)
  # The api wrapper: content ids by default, padded last batch, same numbers as the pure fn.
  config = get_config()
  config.data.image_size, config.data.channels = SIZE, 1
  config.scorer = _cfg(batch_size=3)
  key = jax.random.key(7)
  fn = api.build_anomaly_map_fn(config, _setup()[0], sched, params, key, output='both')
  got = fn(pasted)
  want = run_map({}, pasted, np.asarray(scorer_lib.content_ids(pasted)))
  for name in ('map', 'baseline'):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-6)
  with pytest.raises(ValueError, match='channel'):
    fn(np.repeat(pasted, 3, axis=-1))
  with pytest.raises(ValueError, match='output'):
    api.build_anomaly_map_fn(config, _setup()[0], sched, params, key, output='heat')
