"""Tests of ddm_ood.ssim: same-size SSIM maps through dm-pix, checked against skimage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from ddm_ood import scorer
from ddm_ood.ssim import gaussian_taps, reflect_filter_matrix, ssim_map

# float32 dm-pix (E[a^2] - mu^2 cancels) vs float64 skimage on real images.
GOLDEN_ATOL = 2e-4


def _noisy_pair(image, seed=0, noise=0.2):
  a = image.astype(np.float32) / 127.5 - 1
  rng = np.random.default_rng(seed)
  b = np.clip(a + noise * rng.standard_normal(a.shape).astype(np.float32), -1, 1)
  return a, b


def _skimage(a, b, data_range=2.0):
  return structural_similarity(
      a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, data_range=data_range, full=True, channel_axis=-1)


@pytest.mark.parametrize('name', ['astronaut', 'camera'])
def test_matches_skimage_full_map_on_real_images(name):
  image = getattr(skimage.data, name)()
  image = image[100:196, 150:262] if image.ndim == 3 else image[200:264, 180:260, None]
  a, b = _noisy_pair(image)
  mssim, full = _skimage(a, b)
  got = np.asarray(jax.jit(lambda x, y: ssim_map(x, y, max_val=2.0))(a, b))
  assert got.shape == a.shape == full.shape
  np.testing.assert_allclose(got, full, atol=GOLDEN_ATOL)      # the whole map, borders included
  # skimage's scalar averages the interior (a border of 5 cropped).
  assert abs(got[5:-5, 5:-5].mean() - mssim) < 1e-5
  assert 0.2 < mssim < 0.9   # a genuinely different pair


def test_identical_images_give_one_and_zero_weight():
  a, _ = _noisy_pair(skimage.data.camera()[:32, :48, None])
  m = np.asarray(ssim_map(a, a, max_val=2.0))
  np.testing.assert_allclose(m, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scorer.ssim_weight(m, 'one_minus')), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scorer.ssim_weight(m, 'two_minus')), 1.0, atol=1e-6)


def test_leading_axes_and_vmap():
  a, b = _noisy_pair(skimage.data.astronaut()[:64:2, :96:2])    # 32 x 48 x 3
  batch_a = np.stack([a, b, a]).reshape(3, 1, 32, 48, 3)
  batch_b = np.stack([b, b, a]).reshape(3, 1, 32, 48, 3)
  m = np.asarray(ssim_map(batch_a, batch_b, max_val=2.0))
  assert m.shape == batch_a.shape
  np.testing.assert_allclose(m[0, 0], np.asarray(ssim_map(a, b, max_val=2.0)), atol=1e-6)
  np.testing.assert_allclose(m[1:], 1.0, atol=1e-6)
  v = jax.vmap(lambda x, y: ssim_map(x, y, max_val=2.0))(batch_a[:, 0], batch_b[:, 0])
  np.testing.assert_allclose(np.asarray(v), m[:, 0], atol=1e-6)


def test_filter_matrix_is_symmetric_padding_then_valid_convolution():
  z = np.random.default_rng(0).standard_normal(13)
  taps = gaussian_taps(11, 1.5)
  want = np.convolve(np.pad(z, 5, mode='symmetric'), taps[::-1], mode='valid')
  np.testing.assert_allclose(reflect_filter_matrix(13, 11, 1.5) @ z, want, atol=1e-12)
  np.testing.assert_allclose(reflect_filter_matrix(13, 11, 1.5).sum(1), 1.0, atol=1e-12)


def test_too_small_or_mismatched_images_raise():
  with pytest.raises(ValueError, match='smaller than the SSIM window'):
    ssim_map(jnp.zeros((2, 10, 16, 1)), jnp.zeros((2, 10, 16, 1)), max_val=2.0)
  with pytest.raises(ValueError, match='equal shapes'):
    ssim_map(jnp.zeros((16, 16, 1)), jnp.zeros((16, 16, 3)), max_val=2.0)
  with pytest.raises(ValueError, match='float'):
    ssim_map(jnp.zeros((16, 16, 1), jnp.int32), jnp.zeros((16, 16, 1), jnp.int32), max_val=2.0)
