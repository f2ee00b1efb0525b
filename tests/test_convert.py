"""Tests of ddm_ood.convert: improved-diffusion state dicts -> ddm_ood workdirs (no torch needed).

The golden values come from the official PyTorch code (``tests/fixtures``, written by
``scripts/make_reference_fixture.py``): DiffPath's CelebA ``UNetModel`` at width 32.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import api
from ddm_ood import convert
from ddm_ood import unet
from tests import results_check
from tests import train_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
STATE_DICT = os.path.join(FIXTURES, 'diffpath_celeba_ch32_state_dict.npz')
REFERENCE = os.path.join(FIXTURES, 'diffpath_celeba_ch32_reference.npz')
CONFIG = os.path.join(ROOT, 'configs', 'diffpath_celeba.py')
EPS_ATOL = 1e-4  # max abs, float32 (issue 8)


def _config(**model):
  spec = importlib.util.spec_from_file_location('cfg_diffpath_celeba', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.ch = 32  # the fixture's width
  for k, v in model.items():
    config.model[k] = v
  return config


@pytest.fixture(scope='module')
def state_dict():
  return convert.load_state_dict(STATE_DICT)


@pytest.fixture(scope='module')
def reference():
  with np.load(REFERENCE) as f:
    return {k: f[k] for k in f.files}


def _eps(model, variables, ref, batch=slice(None)):
  """[len(timesteps), B', H, W, C] eps of ``model`` on the fixture's x_t."""
  apply = jax.jit(model.apply)
  return np.stack([np.asarray(apply(variables, jnp.asarray(x[batch]),
                                    jnp.full(x[batch].shape[:1], t, jnp.int32)))
                   for t, x in zip(ref['timesteps'], ref['x_t'])])


def test_golden_eps_equals_official(state_dict, reference):
  """eps of the converted network = the official UNetModel's, at t = 0, 2000, 3999."""
  config = _config()
  model = unet.build_model(config)
  variables = convert.convert_state_dict(state_dict, model, config.data.image_size)
  eps = _eps(model, variables, reference)
  assert list(reference['timesteps']) == [0, 2000, 3999]
  for i, t in enumerate(reference['timesteps']):
    err = float(np.abs(eps[i] - reference['eps'][i]).max())
    print(f't={t}: max |eps - official| = {err:.2e}')
    assert err < EPS_ATOL, (t, err)
  assert float(np.abs(reference['eps']).mean()) > 0.1  # a non-trivial function


@pytest.mark.parametrize('field,value', [('norm_eps', 1e-6), ('downsample_padding', 'same'),
                                         ('rescale_timesteps', False)])
def test_each_adm_option_matters(state_dict, reference, field, value):
  """Each ADM-compatibility field, at ddm_ood's default, moves eps beyond the tolerance (the
  GroupNorm epsilon by ~2e-4, the others by O(1))."""
  config = _config(**{field: value})
  model = unet.build_model(config)
  variables = convert.convert_state_dict(state_dict, model, config.data.image_size)
  eps = _eps(model, variables, reference, batch=slice(0, 2))
  err = float(np.abs(eps - reference['eps'][:, :2]).max())
  assert err > EPS_ATOL, (field, err)


def test_default_networks_unchanged():
  """The new fields at their defaults build today's network: same params, same outputs."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  model = unet.build_model(config)
  assert model.norm_eps == 1e-6 and not model.learn_sigma
  assert model.downsample_padding == 'same' and model.timestep_scale == 1.0
  legacy = unet.UNet(channels=1, ch=config.model.ch, ch_mult=tuple(config.model.ch_mult),
                     num_res_blocks=config.model.num_res_blocks,
                     attn_resolutions=tuple(config.model.attn_resolutions),
                     num_heads=config.model.num_heads, dropout=config.model.dropout,
                     num_groups=config.model.num_groups)
  params = train_helpers.random_params(model, 16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  t = jnp.array([3, 90])
  np.testing.assert_array_equal(jax.jit(model.apply)(params, x, t),
                                jax.jit(legacy.apply)(params, x, t))


@pytest.mark.parametrize('field,value,keys,flag', [
    ('num_res_blocks', 2, 'input_blocks.12.*', 'model.num_res_blocks=3 (config: 2)'),
    ('learn_sigma', False, 'out.2.weight [6, 32, 3, 3] vs expected [3, 32, 3, 3]',
     'model.learn_sigma=True (config: False)'),
    ('ch_mult', (1, 2, 2), 'input_blocks.12.*',
     'model.ch_mult=(1, 2, 2, 2) (config: (1, 2, 2))'),
    ('attn_resolutions', (16,), 'qkv', 'model.attn_resolutions=(16, 8) (config: (16,))'),
])
def test_wrong_flag_names_keys_and_flag_and_writes_nothing(tmp_path, field, value, keys, flag):
  config = _config(**{field: value})
  workdir = tmp_path / 'converted'
  with pytest.raises(ValueError) as e:
    convert.convert_checkpoint(STATE_DICT, config, str(workdir))
  msg = str(e.value)
  print(msg)
  assert keys in msg and flag in msg
  assert 'more' in msg or 'mis-shaped' in msg  # a few keys listed, plus a count
  assert not workdir.exists()


def test_wrong_width_names_model_ch(state_dict):
  config = _config(ch=64)
  with pytest.raises(ValueError, match=r'model\.ch=32 \(config: 64\)') as e:
    convert.convert_state_dict(state_dict, unet.build_model(config), 32)
  assert 'mis-shaped' in str(e.value) and 'input_blocks.0.0.weight' in str(e.value)


def test_key_hints_without_inference(state_dict):
  """A state dict whose flags cannot be read still gets a hint from its key names."""
  sd = {k: v for k, v in state_dict.items() if not k.startswith('input_blocks.0.')}
  sd['label_emb.weight'] = np.zeros((10, 128), np.float32)
  with pytest.raises(ValueError, match='class-conditional') as e:
    convert.convert_state_dict(sd, unet.build_model(_config()), 32)
  assert '2 missing: input_blocks.0.*;' in str(e.value)


def test_convert_twice_bit_identical(state_dict):
  config = _config()
  model = unet.build_model(config)
  a = convert.convert_state_dict(state_dict, model, 32)
  b = convert.convert_state_dict(convert.load_state_dict(STATE_DICT), model, 32)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  assert len(leaves_a) == len(state_dict)  # every tensor mapped, none left over
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == np.float32 and x.tobytes() == y.tobytes()


def _assert_same(loaded, state_dict):
  assert sorted(loaded) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(loaded[k], v)


def test_npz_and_safetensors_load_the_same(state_dict, tmp_path):
  npz = tmp_path / 'sd.npz'
  np.savez(npz, **state_dict)
  loaded = convert.load_state_dict(str(npz))
  _assert_same(loaded, state_dict)
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('safetensors is not installed')
  st = tmp_path / 'sd.safetensors'
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(st))
  loaded = convert.load_state_dict(str(st))
  _assert_same(loaded, state_dict)


def test_pt_loads_when_torch_is_installed(state_dict, tmp_path):
  torch = pytest.importorskip('torch')  # an optional extra: skipped where it is absent (CI)
  pt = tmp_path / 'sd.pt'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, str(pt))
  loaded = convert.load_state_dict(str(pt))
  _assert_same(loaded, state_dict)


def test_load_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert.load_state_dict(str(tmp_path / 'missing.pt'))
  bad = tmp_path / 'weights.h5'
  bad.write_bytes(b'x')
  with pytest.raises(ValueError, match=r'\.safetensors'):
    convert.load_state_dict(str(bad))
  pt = tmp_path / 'weights.pt'
  pt.write_bytes(b'x')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r"pip install -e '\.\[convert\]'"):
    convert.load_state_dict(str(pt))
  ints = tmp_path / 'ints.npz'
  np.savez(ints, step=np.arange(3))
  with pytest.raises(ValueError, match="'step' has dtype int"):
    convert.load_state_dict(str(ints))


def _run(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """The CLI converts the fixture into a fresh workdir."""
  wd = str(tmp_path_factory.mktemp('converted') / 'run')
  proc = _run(['-m', 'ddm_ood.convert', f'--checkpoint={STATE_DICT}', f'--config={CONFIG}',
               '--config.model.ch=32', f'--workdir={wd}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Converted' in proc.stdout
  return wd


def test_cli_then_load_denoiser_reproduces_official_eps(converted, reference):
  assert json.load(open(os.path.join(converted, 'config.json')))['model']['ch'] == 32
  eps_fn, config = api.load_denoiser(converted)
  assert config.model.learn_sigma and config.diffusion.num_timesteps == 4000
  run = jax.jit(lambda f, x, t: f(x, t))
  for i, t in enumerate(reference['timesteps']):
    x = jnp.asarray(reference['x_t'][i])
    eps = run(eps_fn, x, jnp.full((x.shape[0],), t, jnp.int32))
    assert eps.shape == x.shape
    assert float(np.abs(np.asarray(eps) - reference['eps'][i]).max()) < EPS_ATOL


def test_load_feature_fn_on_converted_workdir(converted, reference):
  """The accessor's DiffPath-1D feature on the converted workdir = the official statistic."""
  feature_fn = api.load_feature_fn(converted, ('diffpath_6d', 'diffpath_1d'))
  images = jnp.asarray(reference['images'])
  ids = jnp.arange(images.shape[0], dtype=jnp.int32)
  feats = jax.jit(lambda f, x, i: f(x, i))(feature_fn, images, ids)
  assert feats['diffpath_6d'].shape == (8, 6) and feats['diffpath_1d'].shape == (8, 1)
  np.testing.assert_allclose(np.asarray(feats['diffpath_1d'])[:, 0], reference['stats_1d'],
                             rtol=1e-3)
  with pytest.raises(ValueError, match='Unknown feature kind'):
    api.load_feature_fn(converted, ('nope',))


def test_cli_refuses_existing_checkpoint_and_wrong_flags(converted, tmp_path):
  before = sorted(set(os.listdir(converted)) - {'.lock'})
  proc = _run(['-m', 'ddm_ood.convert', f'--checkpoint={STATE_DICT}', f'--config={CONFIG}',
               '--config.model.ch=32', f'--workdir={converted}'])
  assert proc.returncode == 1 and 'already holds a checkpoint' in proc.stderr
  assert sorted(set(os.listdir(converted)) - {'.lock'}) == before
  wd = tmp_path / 'wrong'
  proc = _run(['-m', 'ddm_ood.convert', f'--checkpoint={STATE_DICT}', f'--config={CONFIG}',
               '--config.model.ch=32', '--config.model.num_res_blocks=2', f'--workdir={wd}'])
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'model.num_res_blocks=3 (config: 2)' in proc.stderr
  assert 'Traceback' not in proc.stderr and not wd.exists()


def _write_folder(root, n, seed, kind):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  for i in range(n):
    if kind == 'smooth':  # soft colour gradients
      a = rng.uniform(0, 1, (3, 3))
      img = np.stack([a[c, 0] + a[c, 1] * xx + a[c, 2] * yy for c in range(3)], -1) / 2.5
    else:  # high-frequency noise
      img = rng.uniform(0, 1, (32, 32, 3))
    Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255)).save(os.path.join(root, f'{i:03d}.png'))


def test_evaluate_on_converted_workdir(converted, tmp_path):
  """--mode=evaluate runs the suite on the converted network: results and a report."""
  ind, ood = tmp_path / 'id', tmp_path / 'ood'
  _write_folder(ind / 'train', 12, 0, 'smooth')
  _write_folder(ind / 'test', 6, 1, 'smooth')
  _write_folder(ood, 6, 2, 'noise')
  proc = _run(['-m', 'ddm_ood.main', f'--config={CONFIG}', f'--workdir={converted}',
               '--mode=evaluate', '--config.model.ch=32', '--config.scorer.num_steps=3',
               '--config.scorer.batch_size=6', f'--config.eval.id_datasets=("folder:{ind}",)',
               f'--config.eval.ood_datasets=("folder:{ood}",)',
               '--config.eval.feature_kinds=("diffpath_6d","diffpath_1d")',
               '--config.eval.num_fit=12', '--config.eval.num_test=6',
               '--config.eval.num_examples_plot=2', '--config.detector.n_components=(1,)',
               '--config.detector.covariance_types=("diag",)', '--config.detector.cv_folds=2'])
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.load(open(os.path.join(converted, 'eval', 'results.json')))
  assert res['checkpoint_step'] == 0
  assert {r['kind'] for r in res['rows']} == {'diffpath_6d', 'diffpath_1d'}
  assert res['timesteps'] == [0, 1333, 2666]
  # Metrics equal ddm_ood.metrics on the saved scores; csv, results.md and report.md tables
  # equal results.json.
  res, _ = results_check.check_run_outputs(converted)
  assert {(r['n_id'], r['n_ood']) for r in res['rows']} == {(6, 6)}


def test_training_a_converted_workdir_is_refused(converted):
  """A converted workdir has EMA params only: training it fails with a clear error, untouched."""
  from ddm_ood import train, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  before = sorted(set(os.listdir(converted)) - {'.lock'})
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r'converted from .*diffpath_celeba_ch32_state_dict.npz .*--mode=evaluate'):
    train.train(_config(ch=32), converted)
  assert sorted(set(os.listdir(converted)) - {'.lock'}) == before
  config_json = open(os.path.join(converted, 'config.json')).read()
  proc = _run(['-m', 'ddm_ood.main', f'--config={CONFIG}', f'--workdir={converted}',
               '--mode=all', '--config.model.ch=32', '--config.train.num_steps=7'])
  assert proc.returncode != 0 and 'not trained' in proc.stderr and '--mode=evaluate' in proc.stderr
  assert open(os.path.join(converted, 'config.json')).read() == config_json   # not overwritten


def test_full_size_configs_match_the_published_networks():
  """Parameter counts of the official UNetModels (counted in PyTorch with the flags)."""
  counts = {'diffpath_celeba': 52_546_438, 'diffpath_imagenet64': 121_063_942}
  for name, expected in counts.items():
    spec = importlib.util.spec_from_file_location(f'cfg_{name}',
                                                  os.path.join(ROOT, 'configs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = unet.build_model(config)
    shapes = jax.eval_shape(lambda k, m=model, s=config.data.image_size: unet.init_params(m, k, s),
                            jax.random.key(0))
    assert unet.param_count(shapes) == expected, name
