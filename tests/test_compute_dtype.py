"""config.model.compute_dtype: bfloat16 activations with float32 parameters, close to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood import train
from ddm_ood.unet import UNet, resolve_compute_dtype
from tests.test_scorer import scorer_cfg, setup
from tests.train_helpers import random_params

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation). On the test
# UNet with random weights (all layers active, so errors are not damped as in a trained network)
# the measured errors are 3.3% of eps (relative RMS) and, per feature column, at most 1.4%
# (stein_ssim) and 2.5% (stein) of the column's largest magnitude: the tolerances leave ~2x.
EPS_RMS_RTOL = 0.06
FEATURE_RTOL = {'stein_ssim': 0.03, 'stein': 0.05}


def test_resolve_compute_dtype():
  assert resolve_compute_dtype('auto', 'cpu') == jnp.float32
  assert resolve_compute_dtype('auto', 'gpu') == jnp.bfloat16
  assert resolve_compute_dtype('auto', 'tpu') == jnp.bfloat16
  assert resolve_compute_dtype('float32', 'tpu') == jnp.float32
  assert resolve_compute_dtype('bfloat16', 'cpu') == jnp.bfloat16
  with pytest.raises(ValueError, match='compute_dtype'):
    resolve_compute_dtype('float16', 'gpu')


def _models():
  kw = dict(channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            num_heads=2, dropout=0.0, num_groups=4)
  return UNet(**kw), UNet(**kw, dtype=jnp.bfloat16)


def test_bf16_network_close_to_float32_with_float32_params_and_output():
  f32, bf16 = _models()
  _, params, _, images = setup()
  shapes = jax.eval_shape(lambda k: bf16.init(k, images[:1], jnp.zeros((1,), jnp.int32)),
                          jax.random.key(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  x, t = images[:16], np.arange(16, dtype=np.int32) * 6
  a = np.asarray(jax.jit(f32.apply)(params, x, t))
  b = jax.jit(bf16.apply)(params, x, t)
  assert b.dtype == jnp.float32
  rel_rms = np.sqrt(np.mean((np.asarray(b) - a) ** 2) / np.mean(a ** 2))
  assert 1e-4 < rel_rms < EPS_RMS_RTOL, rel_rms   # really computed in bfloat16, and close


def test_bf16_features_close_to_float32():
  f32, bf16 = _models()
  _, params, sched, images = setup()
  kinds = ('stein_ssim', 'stein')
  out = {}
  for name, model in (('f32', f32), ('bf16', bf16)):
    fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t, m=model: m.apply(p, x, t),
                                                   sched, scorer_cfg(), kinds))
    out[name] = fn(params, images[:24], np.arange(24, dtype=np.int32), jax.random.key(0))
  for kind in kinds:
    a = np.asarray(out['f32']['features'][kind])
    b = np.asarray(out['bf16']['features'][kind])
    err = np.abs(b - a).max(0) / np.abs(a).max(0)
    assert err.max() < FEATURE_RTOL[kind], (kind, err)


def test_bf16_training_gradients_are_float32():
  _, bf16 = _models()
  params = random_params(bf16, 16)
  sched = schedule_lib.make_schedule('cosine', 100)
  x0 = np.asarray(setup()[3][:4])
  apply = lambda p, x, t, rng: bf16.apply(p, x, t, train=True, rngs={'dropout': rng})  # noqa
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p, x, k: train.loss_fn(p, apply, sched, x, k)))(params, x0, jax.random.key(1))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
