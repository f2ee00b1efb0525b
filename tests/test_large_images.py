"""Scoring at the size of the guided-diffusion / DDPM-256 models, and DiffPath's resizing rule.

The network here is guided-diffusion's 256x256 architecture (six levels, resblock_updown,
attention at 32, 16 and 8 with 32-channel heads) at width 16, so that the scorer, the SSIM maps,
the anomaly maps and the memory plan run on 256 x 256 images in seconds on a CPU.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import data
from ddm_ood import default_config
from ddm_ood import memory
from ddm_ood import pixel_maps
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood import unet
from ddm_ood.importers import adm
import train_helpers

SIZE = 256


@functools.lru_cache(maxsize=None)
def setup():
  config = adm.guided_diffusion_config(SIZE, num_channels=16, num_res_blocks=1,
                                       num_head_channels=32)
  config.model.num_groups = 8
  config.model.compute_dtype = 'float32'
  config.scorer.num_steps = 2
  model = unet.build_model(config)
  params = train_helpers.random_params(model, SIZE)
  x = np.linspace(-1, 1, SIZE, dtype=np.float32)
  images = np.stack([np.broadcast_to(np.stack([np.outer(x, x), x[None] + 0 * x[:, None],
                                                np.sin(6 * x)[:, None] + 0 * x], -1),
                                     (SIZE, SIZE, 3)),
                     np.random.default_rng(0).uniform(-1, 1, (SIZE, SIZE, 3))]).astype(np.float32)
  return config, model, params, schedule_lib.schedule_for(config.diffusion), images


def test_scorer_and_maps_at_256():
  """Features of a seed kind and the DiffPath baseline, and the anomaly maps, at 256 x 256."""
  config, model, params, sched, images = setup()
  kinds = ('stein_ssim', 'diffpath_6d')
  score = jax.jit(scorer_lib.make_trajectory_scorer(model.apply, sched, config.scorer, kinds))
  ids = jnp.arange(2, dtype=jnp.int32)
  out = score(params, jnp.asarray(images), ids, jax.random.key(0))
  for kind in kinds:
    f = np.asarray(out['features'][kind])
    assert f.shape == (2, 6) and np.all(np.isfinite(f)), kind
  # the noise image is further from the smooth image than from itself
  assert not np.allclose(out['features']['stein_ssim'][0], out['features']['stein_ssim'][1])
  scorer_cfg = config.scorer.copy_and_resolve_references()
  scorer_cfg.mode = 'forward'
  map_fn = jax.jit(pixel_maps.make_anomaly_map_fn(model.apply, sched, scorer_cfg, 'stein_ssim'))
  maps = map_fn(params, jnp.asarray(images), ids, jax.random.key(0),
                jnp.ones((config.scorer.num_steps,), jnp.float32))
  assert maps['map'].shape == (2, SIZE, SIZE) and maps['baseline'].shape == (2, SIZE, SIZE)
  assert np.all(np.isfinite(maps['map'])) and float(maps['map'].min()) >= 0


def test_memory_plan_of_the_552m_model():
  """The published 256x256 model on an 80 GB accelerator in bfloat16: DiffPath's ddim10 runs
  whole batches; ten forward states per image are chunked to the budget."""
  from configs import guided_256_uncond  # pylint: disable=g-import-not-at-top

  class FakeGpu:
    platform = 'gpu'

    def memory_stats(self):
      return {'bytes_limit': 80 * 10 ** 9}

  config = guided_256_uncond.get_config()
  shape = unet.family(config).memory_shape(config)
  assert shape['num_head_channels'] == 64
  bf16 = memory.unet_state_bytes(SIZE, 3, dtype_bytes=2, **shape)
  assert 0.5 * 2 ** 30 < bf16 < 2 * 2 ** 30            # ~0.83 GiB per network evaluation
  assert memory.plan_for_config(config, 552_814_086, 1, FakeGpu()) == (16, 0)  # ddim: 1 state
  config.scorer.mode = 'forward'
  config.eval.feature_kinds = ('stein_ssim',)
  batch, chunk = memory.plan_for_config(config, 552_814_086, 1, FakeGpu())
  assert 0 < chunk < batch and batch % chunk == 0
  budget = memory.resolve_budget_bytes(0.0, FakeGpu())
  per_image = 10 * bf16 + memory.scorer_image_bytes(SIZE, 3, 10)
  assert 552_814_086 * 6 + chunk * per_image <= budget < 552_814_086 * 6 + (chunk + 1) * per_image


def test_memory_estimate_bounds_xla_at_256():
  """XLA's buffers for one forward of the width-16 network stay under the estimate."""
  config, model, params, _, images = setup()
  compiled = jax.jit(model.apply).lower(params, jnp.asarray(images[:1]),
                                        jnp.zeros((1,), jnp.int32)).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip('no memory analysis on this backend')
  used = stats.temp_size_in_bytes + stats.output_size_in_bytes
  estimate = memory.unet_state_bytes(SIZE, 3, **unet.family(config).memory_shape(config))
  print(f'XLA {used / 2 ** 20:.1f} MiB, estimate {estimate / 2 ** 20:.1f} MiB')
  assert used < estimate < 6 * used


def test_resize_via_auto_is_diffpaths_rule_for_any_model_size(tmp_path):
  """-1: through the smallest native size among the compared sets, when one is below the model's;
  DiffPath's ImageNet-64 case (32x32 sets -> 32) is one instance."""
  cfg = default_config.get_config().data
  cfg.resize_via = -1
  suite = ('tfds:cifar10', 'tfds:celeb_a', 'tfds:dtd')
  for size, want in ((64, 32), (256, 32), (32, 0), (16, 0)):
    cfg.image_size = size
    assert data.resolve_resize_via(cfg, suite) == want, size
  cfg.image_size = 256
  assert data.resolve_resize_via(cfg, ('tfds:celeb_a', 'tfds:dtd')) == 140
  assert data.resolve_resize_via(cfg, ('mnist', 'digits', 'noise_gaussian')) == 8
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / 'test')
  for i, (w, h) in enumerate(((300, 200), (50, 90))):
    Image.new('RGB', (w, h)).save(tmp_path / 'test' / f'{i}.png')
  assert data.native_size(f'folder:{tmp_path}') == 50
  assert data.resolve_resize_via(cfg, (f'folder:{tmp_path}', 'tfds:celeb_a')) == 50
  cfg.resize_via = 24                                  # a fixed size is kept as it is
  assert data.resolve_resize_via(cfg, suite) == 24


def test_suite_resizes_every_set_alike():
  """load_images through the resolved size equals resizing by hand (down to 8, up to 32)."""
  config = default_config.get_config()
  config.data.image_size, config.data.resize_via = 32, -1
  config.eval.id_datasets, config.eval.ood_datasets = ('fashion_mnist',), ('digits',)
  cfg = data.suite_data_config(config)
  assert cfg.resize_via == 8 and config.data.resize_via == -1
  got = data.load_images('fashion_mnist', 'test', cfg, max_examples=3)
  native = cfg.copy_and_resolve_references()
  native.image_size, native.resize_via = 28, 0
  raw = data.load_images('fashion_mnist', 'test', native, max_examples=3)
  want = data.resize_images(data.resize_images(raw, 8), 32)
  np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=1e-6)
  assert not np.allclose(got, data.resize_images(raw, 32), atol=1e-2)  # detail is gone
  assert math.isfinite(float(got.sum()))
