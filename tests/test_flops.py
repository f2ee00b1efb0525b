"""ddm_ood.flops: the one FLOP count of the benchmarks, against XLA's own count on the CPU."""

import types

import jax
import jax.numpy as jnp
import pytest

from ddm_ood import flops
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood import train
from ddm_ood import unet
from tests import train_helpers as h


def _abstract(config, batch):
  """(network, abstract params, x [B, S, S, C], t [B]) of ``config``; nothing materialised."""
  model = unet.build_model(config)
  size, ch = config.data.image_size, config.data.channels
  params = jax.eval_shape(lambda k: unet.init_params(model, k, size), jax.random.key(0))
  return (model, params, jax.ShapeDtypeStruct((batch, size, size, ch), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))


def _train_step(config, model, batch):
  config.train.batch_size = batch
  optimizer = train.make_optimizer(config.train)
  state = jax.eval_shape(lambda: train.create_train_state(model, optimizer,
                                                          config.data.image_size, config.seed))
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  return train.make_train_step(model, sched, config.train), state


def _xla_flops(fn, *args):
  return float(jax.jit(fn).lower(*args).cost_analysis()['flops'])


def test_each_matmul_and_conv_counts_as_xla_counts_it():
  """Every distinct dot / conv of a train step (forward and backward: strided, padded, the
  transposed and weight-gradient convolutions) is counted exactly as XLA counts it alone."""
  config = h.load_config('tiny')
  model, _, x, _ = _abstract(config, 4)
  step, state = _train_step(config, model, 4)
  checked = {}
  for eqn, _ in flops.matmul_eqns(step, state, x):
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    key = (eqn.primitive.name, str(avals), str(sorted(eqn.params.items())))
    if key not in checked:
      checked[key] = (flops.eqn_flops(eqn),
                      _xla_flops(lambda *a, e=eqn: e.primitive.bind(*a, **e.params), *avals))
  names = {k[0] for k in checked}
  assert names == {'dot_general', 'conv_general_dilated'} and len(checked) > 30
  for key, (ours, xla) in checked.items():
    assert ours == pytest.approx(xla, rel=1e-9), key


def test_celeba_forward_and_train_step_against_xla():
  """The CelebA-size network (XLA's count of one unrolled forward, lowered on the CPU: ours plus
  its elementwise work) and its train step: XLA's count within 5% of 3 x the forward count."""
  config = h.load_config('celeba')
  model, params, x, t = _abstract(config, 2)
  forward = flops.count_flops(lambda p, x, t: model.apply(p, x, t), params, x, t)
  assert forward / 2 == pytest.approx(15.67e9, rel=2e-3)   # per image (issue 23: 15.7 GFLOP)
  xla_forward = _xla_flops(lambda p, x, t: model.apply(p, x, t), params, x, t)
  assert 1.0 <= xla_forward / forward < 1.01
  step, state = _train_step(config, model, 2)
  xla_step = float(step.lower(state, x).cost_analysis()['flops'])
  assert xla_step == pytest.approx(3 * forward, rel=0.05)
  assert flops.count_flops(step, state, x) == pytest.approx(3 * forward, rel=0.01)


@pytest.mark.parametrize('mode,chunk', [('forward', 0), ('forward', 2), ('ddim', 0)])
def test_scan_bodies_count_once_per_iteration(mode, chunk):
  """The scorer's DDIM scan and lax.map chunks run the network K x B times per call (XLA's
  cost analysis counts a loop body once). Not exactly K x B forwards of batch 1: under the
  scorer's vmap over images the timestep embedding is computed once per timestep."""
  config = h.load_config('tiny')
  model, params, x, t = _abstract(config, 4)
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  sc = config.scorer
  sc.mode, sc.chunk, sc.num_draws, sc.t_min = mode, chunk, 1, 0
  kind = 'stein' if mode == 'forward' else 'stein_ddim'
  score = scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t), sched, sc,
                                            (kind,))
  one = flops.count_flops(lambda p, x, t: model.apply(p, x, t), params, x, t) / 4
  got = flops.count_flops(score, params, x, t, jax.random.key(0))
  assert got == pytest.approx(sc.num_steps * 4 * one, rel=2e-3)


def test_while_loop_with_matmuls_is_refused():
  def f(w):
    return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (w, 0))[0]
  with pytest.raises(ValueError, match='static trip count'):
    flops.count_flops(f, jax.ShapeDtypeStruct((4, 4), jnp.float32))


def test_fused_attention_counts_its_products():
  """cuDNN's fused attention (GPU only, so a stand-in equation here): Q K^T and P V forward,
  four products backward; q [B, T, N, H], k [B, S, N, H]."""
  def eqn(name, q, k):
    avals = [types.SimpleNamespace(aval=jax.ShapeDtypeStruct(s, jnp.bfloat16)) for s in (q, k, k)]
    return types.SimpleNamespace(primitive=types.SimpleNamespace(name=name), invars=avals,
                                 params={})
  one = 2.0 * 8 * 256 * 4 * 64 * 64   # one product: 2 B T N S H, S = 64
  assert flops.eqn_flops(eqn('dot_product_attention_fwd_wrapper', (8, 256, 4, 64),
                             (8, 64, 4, 64))) == 2 * one
  assert flops.eqn_flops(eqn('dot_product_attention_bwd_wrapper', (8, 256, 4, 64),
                             (8, 64, 4, 64))) == 4 * one
