"""config.model.precision reaches every matmul and convolution of the network, and
config.model.attention picks the attention kernel (ddm_ood.network)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import flops
from ddm_ood import network
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib
from tests import test_diffpath_reference as diffpath_ref
from tests import test_flops
from tests import train_helpers as h

EXPECTED = {'default': None, 'high': jax.lax.Precision.HIGH,
            'highest': jax.lax.Precision.HIGHEST}


def _precisions(eqns):
  """The set of precision params (one per operand pair) over dot / conv equations."""
  out = set()
  for eqn, _ in eqns:
    p = eqn.params['precision']
    out.add(p if p is None else tuple(p))
  return out


@pytest.mark.parametrize('name', list(network.PRECISIONS))
def test_setting_reaches_every_matmul_and_conv_forward_and_backward(name):
  config = h.load_config('tiny')
  config.model.precision = name
  model, params, x, t = test_flops._abstract(config, 2)
  assert model.precision == name
  fwd = flops.matmul_eqns(lambda p, x, t: model.apply(p, x, t), params, x, t)
  step, state = test_flops._train_step(config, model, 2)
  both = fwd + flops.matmul_eqns(step, state, x)
  assert {e.primitive.name for e, _ in both} == {'dot_general', 'conv_general_dilated'}
  want = EXPECTED[name]
  assert _precisions(both) == {None if want is None else (want, want)}


def test_highest_in_the_lowered_hlo():
  """Every dot and convolution of the lowered forward carries HIGHEST (what XLA receives)."""
  config = h.load_config('tiny')
  config.model.precision = 'highest'
  model, params, x, t = test_flops._abstract(config, 2)
  text = jax.jit(lambda p, x, t: model.apply(p, x, t)).lower(params, x, t).as_text()
  ops = [l for l in text.splitlines() if re.search(r'stablehlo\.(dot_general|convolution)', l)]
  assert len(ops) > 10
  for line in ops:
    assert re.search(r'precision(_config)? = \[(#stablehlo<precision )?HIGHEST>?, '
                     r'(#stablehlo<precision )?HIGHEST>?\]', line), line


def test_converted_configs_pin_highest_and_cpu_results_do_not_change():
  """The DiffPath fixture (equal to the official code within 1e-3 in test_diffpath_reference,
  whose config pins 'highest') gives bit-identical eps on the CPU at every setting."""
  config, model, variables, _, ref = diffpath_ref.setup()
  assert config.model.precision == 'highest' and model.precision == 'highest'
  x = jnp.asarray(ref['images'][:4])
  t = jnp.asarray([0, 1000, 2000, 3999], jnp.int32)
  outs = {}
  for name in network.PRECISIONS:
    net = network.Network(model.module, name)
    outs[name] = np.asarray(jax.jit(net.apply)(variables, x, t))
  if jax.default_backend() == 'cpu':  # accelerators: see scripts/gpu_check.sh
    for name in outs:
      np.testing.assert_array_equal(outs[name], outs['highest'])


def test_unknown_precision_is_a_config_error():
  config = h.load_config('tiny')
  config.model.precision = 'fp32'
  with pytest.raises(workdir_lib.WorkdirError, match=r"model.precision='fp32'.*'highest'"):
    workdir_lib.validate_config(config, 'all')
  with pytest.raises(ValueError, match='model.precision'):
    unet.build_model(config)


def test_precision_is_not_a_network_field():
  """A workdir trained at one setting evaluates at another (how it is computed, not what)."""
  assert 'model.precision' in workdir_lib.NON_MODEL_FIELDS


def test_attention_setting_on_the_cpu():
  """'auto' is XLA's attention off GPUs and in float32; 'cudnn' there is a clear error."""
  for dtype in (jnp.float32, jnp.bfloat16):
    assert network.resolve_attention('auto', 'cpu', dtype) == 'xla'
    assert network.resolve_attention('xla', 'gpu', dtype) == 'xla'
  assert network.resolve_attention('auto', 'gpu', jnp.float32) == 'xla'
  with pytest.raises(ValueError, match="attention='cudnn'.*needs a GPU"):
    network.resolve_attention('cudnn', 'cpu', jnp.bfloat16)
  with pytest.raises(ValueError, match='not one of'):
    network.resolve_attention('flash', 'cpu', jnp.float32)
  config = h.load_config('tiny')
  assert unet.build_model(config).attention == 'xla'


def test_every_family_gets_the_resolved_attention(monkeypatch):
  """`build_model` resolves config.model.attention once and hands it to the family: the ADM UNet
  and diffusers' UNet2DModel (whose attention layers call `network.dot_product_attention`)."""
  from ddm_ood.importers import diffusers_snapshot  # pylint: disable=g-import-not-at-top
  from tests import test_families  # pylint: disable=g-import-not-at-top
  diffusers_config, _ = diffusers_snapshot.load(test_families.DDPM, None)
  monkeypatch.setattr(network, 'resolve_attention', lambda name, backend, dtype: 'cudnn')
  for config in (h.load_config('tiny'), diffusers_config):  # built, not traced (no GPU here)
    assert unet.build_model(config).attention == 'cudnn', config.model.family
