"""DiffPath baselines equal the official code's statistics for the same weights and images.

The fixture (``tests/fixtures/diffpath_celeba_ch32_*.npz``, made by
``scripts/make_reference_fixture.py`` from DiffPath's own code at commit 6f92000) holds the state
dict of an official ``UNetModel`` with DiffPath's CelebA flags at width 32, a batch of real images,
and the 6-D / 1-D statistics that DiffPath's ``save_test_statistics.py`` computed from them. No
torch here: the state dict is converted with `ddm_ood.convert`. (The eps-per-timestep golden test
of the converted network is in tests/test_convert.py.)
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffpath_celeba
from ddm_ood import convert
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood import unet as unet_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
STATE_DICT = os.path.join(FIXTURES, 'diffpath_celeba_ch32_state_dict.npz')
REFERENCE = os.path.join(FIXTURES, 'diffpath_celeba_ch32_reference.npz')
RTOL = 1e-3


@functools.lru_cache(maxsize=None)
def setup():
  """(config, model, variables, schedule, reference dict) of the width-32 fixture network."""
  config = diffpath_celeba.get_config()
  config.model.ch = 32
  model = unet_lib.build_model(config)
  variables = convert.convert_state_dict(convert.load_state_dict(STATE_DICT), model,
                                         int(config.data.image_size))
  sched = schedule_lib.schedule_for(config.diffusion)
  with np.load(REFERENCE) as f:
    ref = {k: f[k] for k in f.files}
  return config, model, jax.tree.map(jnp.asarray, variables), sched, ref


@functools.lru_cache(maxsize=None)
def diffpath_outputs():
  """ddm_ood's 'diffpath_6d' / 'diffpath_1d' features and DDIM eps path on the fixture images."""
  config, model, variables, sched, ref = setup()
  apply_fn = lambda p, x, t: model.apply(p, x, t)  # noqa: E731
  score = jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, sched, config.scorer,
                                                    ('diffpath_6d', 'diffpath_1d')))
  images = jnp.asarray(ref['images'])
  ids = jnp.arange(images.shape[0], dtype=jnp.int32)
  out = score(variables, images, ids, jax.random.key(0))
  ts = scorer_lib.kind_timesteps(sched.num_timesteps, config.scorer, 'diffpath_6d')
  path = jax.jit(jax.vmap(lambda x0: scorer_lib.ddim_trajectory(apply_fn, sched, ts, variables,
                                                                 x0)))(images)
  return jax.tree.map(np.asarray, out['features']), np.asarray(path.eps_theta[:, 0])


def rel_err(got, want):
  """Largest |got - want| / |want|, the denominator floored at 1e-3 of the column's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  floor = 1e-3 * np.abs(want).reshape(want.shape[0], -1).max(axis=0)
  return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), floor)))


def test_fixture_is_what_the_script_documents():
  config, _, _, sched, ref = setup()
  meta = json.loads(str(ref['meta']))
  assert meta['diffpath_commit'].startswith('6f92000')
  assert meta['flags']['num_channels'] == 32 and meta['flags']['timestep_respacing'] == 'ddim10'
  images = ref['images']
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
  # Exact -1 / +1 pixels keep DiffPath's clip of x0hat active.
  assert np.mean(np.abs(images) == 1) > 0.1
  # DiffPath's respaced ddim10 grid on T = 4000 is ddm_ood's scorer grid.
  np.testing.assert_array_equal(
      ref['ddim_timesteps'],
      scorer_lib.kind_timesteps(sched.num_timesteps, config.scorer, 'diffpath_6d'))
  np.testing.assert_array_equal(ref['ddim_timesteps'], np.arange(0, 4000, 400))


def test_ddim_eps_path_matches_official():
  _, _, _, _, ref = setup()
  _, eps_path = diffpath_outputs()
  err = np.abs(eps_path - ref['eps_path'])
  print(f'eps path: max abs err {err.max():.3g}')
  assert err.max() < 1e-3, err.reshape(8, 10, -1).max(-1)


def test_diffpath_features_match_official_statistics():
  _, _, _, _, ref = setup()
  feats, _ = diffpath_outputs()
  err6 = rel_err(feats['diffpath_6d'], ref['stats_6d'])
  err1 = rel_err(feats['diffpath_1d'][:, 0], ref['stats_1d'])
  print(f'diffpath_6d max rel err {err6:.3g}, diffpath_1d max rel err {err1:.3g}')
  assert feats['diffpath_6d'].shape == (8, 6) and feats['diffpath_1d'].shape == (8, 1)
  assert err6 < RTOL, (feats['diffpath_6d'], ref['stats_6d'])
  assert err1 < RTOL, (feats['diffpath_1d'][:, 0], ref['stats_1d'])


def test_raw_network_eps_would_not_match():
  """The raw eps_theta (ddm_ood's old baseline) is measurably off the official statistics."""
  config, model, variables, sched, ref = setup()
  ts = ref['ddim_timesteps'].astype(np.int32)
  a = np.asarray(sched.sqrt_alphas_cumprod)[ts]
  s = np.asarray(sched.sigmas)[ts]
  x = jnp.asarray(ref['images'])
  apply = jax.jit(model.apply)
  raw = []
  for k, t in enumerate(ts):   # the same DDIM states, but keep the network's raw eps
    eps = apply(variables, x, jnp.full((x.shape[0],), t, jnp.int32))
    raw.append(np.asarray(eps))
    x0hat = jnp.clip((x - s[k] * eps) / a[k], -1, 1)
    if k + 1 < len(ts):
      x = a[k + 1] * x0hat + s[k + 1] * (x - a[k] * x0hat) / s[k]
  raw = np.stack(raw, 1).astype(np.float64)
  d = np.diff(raw, axis=1) * len(ts)
  stats_1d_raw = np.sqrt((d ** 2).sum((1, 2, 3, 4)))
  assert rel_err(stats_1d_raw, ref['stats_1d']) > 10 * RTOL


if __name__ == '__main__':
  pytest.main([__file__, '-v', '-s'])
