"""Bring your own model: guided-diffusion (ADM) and diffusers UNet2DModel equal their official code.

Fixtures (``tests/fixtures/guided_adm_ch64_*``, ``diffusers_ddpm_tiny*``,
``diffusers_options_tiny*``) are made by ``scripts/make_family_fixtures.py`` from each family's
own code (guided-diffusion commit 22e0df8, diffusers 0.42) at reduced width with non-zero random
weights. No torch and no diffusers here: the snapshots and state dicts are read by ddm_ood's
importers.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_ood import config_checks
from ddm_ood import convert
from ddm_ood import default_config
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer as scorer_lib
from ddm_ood import unet
from ddm_ood.importers import adm
from ddm_ood.importers import diffusers_snapshot

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
GUIDED_SD = os.path.join(FIXTURES, 'guided_adm_ch64_state_dict.npz')
DDPM = os.path.join(FIXTURES, 'diffusers_ddpm_tiny')
OPTIONS = os.path.join(FIXTURES, 'diffusers_options_tiny')
EPS_ATOL = 1e-4     # max abs, float32
STATS_RTOL = 1e-3
ABAR_ATOL = 1e-6


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
  with np.load(os.path.join(FIXTURES, f'{name}_reference.npz')) as f:
    return {k: f[k] for k in f.files}


def guided_config(new_attention_order: bool = False):
  """The fixture's flags (scripts/make_family_fixtures.py GUIDED_FLAGS) in ddm_ood's config."""
  config = adm.guided_diffusion_config(32, num_channels=64, num_res_blocks=1,
                                       num_head_channels=16, channel_mult=(0.5, 1, 1))
  config.model.compute_dtype = 'float32'
  config.model.use_new_attention_order = new_attention_order
  return config


@functools.lru_cache(maxsize=None)
def loaded(which: str):
  """(config, model, variables) of a fixture, converted by ddm_ood's importers."""
  if which.startswith('guided'):
    config, variables = adm.load(GUIDED_SD, guided_config(which == 'guided_new'))
  else:
    config, variables = diffusers_snapshot.load(DDPM if which == 'ddpm' else OPTIONS, None)
    config.model.compute_dtype = 'float32'
  return config, unet.build_model(config), jax.tree.map(jnp.asarray, variables)


def eps_error(which: str, ref: dict, key: str = 'eps') -> list[float]:
  _, model, variables = loaded(which)
  apply = jax.jit(model.apply)
  return [float(np.abs(np.asarray(apply(variables, jnp.asarray(x),
                                        jnp.full(x.shape[:1], t, jnp.int32))) - want).max())
          for t, x, want in zip(ref['timesteps'], ref['x_t'], ref[key])]


def rel_err(got, want):
  """Largest |got - want| / |want|, the denominator floored at 1e-3 of the column's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  floor = 1e-3 * np.abs(want).reshape(want.shape[0], -1).max(axis=0)
  return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), floor)))


def diffpath_features(which: str, images):
  config, model, variables = loaded(which)
  sched = schedule_lib.schedule_for(config.diffusion)
  sc = dict(mode='ddim', num_steps=10)
  score = jax.jit(scorer_lib.make_trajectory_scorer(model.apply, sched, sc,
                                                    ('diffpath_6d', 'diffpath_1d')))
  out = score(variables, jnp.asarray(images), jnp.arange(len(images), dtype=jnp.int32),
              jax.random.key(0))['features']
  return jax.tree.map(np.asarray, out), sched


# ------------------------------------------------------------------------------ guided-diffusion


@pytest.mark.parametrize('which,key', [('guided', 'eps'), ('guided_new', 'eps_new_order')])
def test_guided_eps_equals_official(which, key):
  """fp16 state dict (read as float32), resblock_updown, num_head_channels, channel_mult 0.5,
  both attention orders: eps = the official UNetModel's at t = 0, 500, 999."""
  ref = reference('guided_adm_ch64')
  assert list(ref['timesteps']) == [0, 500, 999]
  errors = eps_error(which, ref, key)
  print(which, errors)
  assert max(errors) < EPS_ATOL, errors
  # The other attention order is off by O(1): the option is read, not ignored.
  other = 'eps_new_order' if key == 'eps' else 'eps'
  assert np.abs(ref[other] - ref[key]).max() > 100 * EPS_ATOL


def test_guided_fixture_is_fp16_and_diffpath_statistics_match():
  with np.load(GUIDED_SD) as f:
    dtypes = {f[k].dtype for k in f.files}
  assert np.dtype(np.float16) in dtypes  # as guided-diffusion's use_fp16 saves the torso
  ref = reference('guided_adm_ch64')
  assert json.loads(str(ref['meta']))['guided_commit'].startswith('22e0df8')
  feats, sched = diffpath_features('guided', ref['images'])
  assert np.abs(np.asarray(sched.alphas_cumprod, np.float64) - ref['alphas_cumprod']).max() < \
      ABAR_ATOL
  np.testing.assert_array_equal(ref['ddim_timesteps'], np.arange(0, 1000, 100))
  err6 = rel_err(feats['diffpath_6d'], ref['stats_6d'])
  err1 = rel_err(feats['diffpath_1d'][:, 0], ref['stats_1d'])
  print(f'diffpath_6d {err6:.2e}, diffpath_1d {err1:.2e}')
  assert err6 < STATS_RTOL and err1 < STATS_RTOL


def test_guided_checkpoint_errors_name_the_field(tmp_path):
  """A class-conditional checkpoint and a wrong resblock_updown are refused, named, nothing
  written."""
  sd = convert.load_state_dict(GUIDED_SD)
  labelled = tmp_path / 'cond.npz'
  np.savez(labelled, **sd, **{'label_emb.weight': np.ones((1000, 256), np.float16)})
  workdir = tmp_path / 'wd'
  with pytest.raises(ValueError, match='class-conditional .* does not support.*uncond'):
    convert.convert('checkpoint', str(labelled), guided_config(), str(workdir))
  config = guided_config()
  config.model.resblock_updown = False
  with pytest.raises(ValueError, match=r'model\.resblock_updown=True \(config: False\)'):
    convert.convert('checkpoint', GUIDED_SD, config, str(workdir))
  with pytest.raises(ValueError, match='needs --config'):
    convert.convert('checkpoint', GUIDED_SD, None, str(workdir))
  assert not workdir.exists()


# ------------------------------------------------------------------------------ diffusers


def check_snapshot_eps(which: str, prediction: str, schedule: str) -> dict:
  """The snapshot's config as read, and its eps = the official one; returns the reference."""
  ref = reference(f'diffusers_{which}_tiny')
  config, _, _ = loaded(which)
  assert config.model.family == 'diffusers_unet2d'
  assert (config.model.prediction_type, config.diffusion.schedule) == (prediction, schedule)
  errors = eps_error(which, ref)
  print(which, 'eps', errors)
  assert max(errors) < EPS_ATOL
  assert float(np.abs(ref['eps']).mean()) > 0.1
  return ref


def test_diffusers_pipeline_eps_schedule_and_statistics_equal_official():
  """google/ddpm-cifar10-32's layout (pipeline folder): eps, alphas_cumprod and DiffPath's
  statistics of the official UNet2DModel and DDPMScheduler."""
  ref = check_snapshot_eps('ddpm', 'epsilon', 'diffusers_linear')
  feats, sched = diffpath_features('ddpm', ref['images'])
  assert np.abs(np.asarray(sched.alphas_cumprod, np.float64) - ref['alphas_cumprod']).max() < \
      ABAR_ATOL
  assert rel_err(feats['diffpath_6d'], ref['stats_6d']) < STATS_RTOL
  assert rel_err(feats['diffpath_1d'][:, 0], ref['stats_1d']) < STATS_RTOL


@pytest.mark.parametrize('name,beta_start,beta_end', [('linear', 1e-4, 0.02),
                                                      ('scaled_linear', 0.00085, 0.012),
                                                      ('squaredcos_cap_v2', 1e-4, 0.02)])
def test_diffusers_schedules_equal_the_official_scheduler(name, beta_start, beta_end):
  want = reference('diffusers_ddpm_tiny')[f'alphas_cumprod_{name}']
  got = schedule_lib.make_schedule(f'diffusers_{name}', 1000, beta_start=beta_start,
                                   beta_end=beta_end).alphas_cumprod
  assert np.abs(np.asarray(got, np.float64) - want).max() < ABAR_ATOL


def test_diffusers_every_option_and_v_prediction():
  """Flat folder; scale-shift, resnet resamplers, head dim 8, mish, learned time embedding,
  flip / shift, centred input, mid scale factor, learned variance, DDIM scaled_linear + v."""
  ref = check_snapshot_eps('options', 'v_prediction', 'diffusers_scaled_linear')
  # eps, not the raw v, is what the network returns
  assert np.abs(ref['v'] - ref['eps']).max() > 0.1


@pytest.mark.parametrize('prediction', ['v_prediction', 'sample'])
def test_prediction_types_convert_to_eps(prediction):
  """The wrapper keeps the parameter tree and returns the eps of diffusers' schedulers."""
  config = default_config.get_config()
  config.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4)
  config.diffusion.schedule = 'diffusers_linear'
  base = unet.build_model(config)
  config.model.prediction_type = prediction
  wrapped = unet.build_model(config)
  params = unet.init_params(base, jax.random.key(0), 8)
  params = jax.tree.map(lambda p: p + 0.1, params)
  shapes = jax.eval_shape(lambda k: unet.init_params(wrapped, k, 8), jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([3, 700])
  out, eps = jax.jit(base.apply)(params, x, t), jax.jit(wrapped.apply)(params, x, t)
  sched = schedule_lib.schedule_for(config.diffusion)
  a, s = (np.asarray(v)[np.asarray(t)][:, None, None, None] for v in
          (sched.sqrt_alphas_cumprod, sched.sigmas))
  want = a * out + s * x if prediction == 'v_prediction' else (x - a * out) / s
  np.testing.assert_allclose(eps, want, rtol=1e-5, atol=1e-5)


def _snapshot_copy(tmp_path, src=DDPM):
  dst = tmp_path / 'snap'
  shutil.copytree(src, dst)
  return dst


def _edit(path, **changes):
  cfg = json.load(open(path))
  cfg.update(changes)
  json.dump(cfg, open(path, 'w'))


@pytest.mark.parametrize('file,changes,message', [
    ('unet/config.json', dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D',
                                                'DownBlock2D']),
     r"down_block_types\[1\]='CrossAttnDownBlock2D' \(supported: 'DownBlock2D', "
     r"'AttnDownBlock2D'\)"),
    ('unet/config.json', dict(shiny_new_option=3), r'unknown option\(s\) shiny_new_option'),
    ('unet/config.json', dict(num_class_embeds=10), r'class conditioning \(num_class_embeds=10'),
    ('unet/config.json', dict(time_embedding_type='fourier'), "time_embedding_type='fourier'"),
    ('unet/config.json', dict(_class_name='UNet2DConditionModel'), 'UNet2DConditionModel'),
    ('unet/config.json', dict(block_out_channels=[32, 64, 96]),
     r'68 mis-shaped: down_blocks\.2\.resnets\.0\.conv1\.bias \[64\] vs expected \[96\]'),
    ('scheduler/scheduler_config.json', dict(beta_schedule='sigmoid'),
     r"beta_schedule='sigmoid' \(supported: linear, scaled_linear, squaredcos_cap_v2\)"),
    ('scheduler/scheduler_config.json', dict(_class_name='ScoreSdeVeScheduler'),
     "scheduler 'ScoreSdeVeScheduler'"),
    ('scheduler/scheduler_config.json', dict(prediction_type='flow'), "prediction_type='flow'"),
    ('scheduler/scheduler_config.json', dict(rescale_betas_zero_snr=True),
     'rescale_betas_zero_snr'),
])
def test_unsupported_snapshot_is_refused_and_writes_nothing(tmp_path, file, changes, message):
  snap = _snapshot_copy(tmp_path)
  _edit(snap / file, **changes)
  workdir = tmp_path / 'wd'
  with pytest.raises(ValueError, match=message) as e:
    convert.convert('diffusers', str(snap), None, str(workdir))
  print(e.value)
  assert not workdir.exists()


def test_config_keeps_the_evaluation_settings_of_a_base_config():
  """--config with --diffusers: its evaluation settings stay, its network and schedule do not."""
  from configs import diffpath_celeba  # pylint: disable=g-import-not-at-top
  base = diffpath_celeba.get_config()
  config = diffusers_snapshot.snapshot_config(DDPM, base)
  assert config.eval.to_dict() == base.eval.to_dict()
  assert config.scorer.to_dict() == base.scorer.to_dict()
  assert config.model.compute_dtype == base.model.compute_dtype == 'float32'
  assert config.model.family == 'diffusers_unet2d' and config.model.learn_sigma is False
  assert config.model.diffusers_unet2d.block_out_channels == (32, 64, 64)
  assert (config.diffusion.schedule, config.diffusion.num_timesteps) == ('diffusers_linear', 1000)
  assert base.model.family == 'adm' and base.diffusion.schedule == 'cosine'  # not modified


def test_deprecated_attention_names_load(tmp_path):
  """diffusers < 0.14 snapshots (query / key / value / proj_attn) convert to the same weights."""
  config, model, variables = loaded('ddpm')
  sd = convert.load_state_dict(os.path.join(DDPM, 'unet', 'diffusion_pytorch_model.safetensors'))
  old = {k.replace('.to_q.', '.query.').replace('.to_k.', '.key.').replace('.to_v.', '.value.')
          .replace('.to_out.0.', '.proj_attn.'): v for k, v in sd.items()}
  assert any('.proj_attn.' in k for k in old)
  again = diffusers_snapshot.convert_state_dict(old, model, config.data.image_size)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ full size


DDPM_CIFAR10 = dict(  # google/ddpm-cifar10-32 unet/config.json (diffusers' conversion)
    _class_name='UNet2DModel', act_fn='silu', attention_head_dim=None,
    block_out_channels=[128, 256, 256, 256], center_input_sample=False,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32,
    out_channels=3, sample_size=32, time_embedding_type='positional',
    up_block_types=['UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'])
DDPM_CELEBAHQ = dict(  # google/ddpm-celebahq-256 (and -church / -bedroom / -cat)
    DDPM_CIFAR10, block_out_channels=[128, 128, 256, 256, 512, 512], sample_size=256,
    down_block_types=['DownBlock2D'] * 4 + ['AttnDownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'AttnUpBlock2D'] + ['UpBlock2D'] * 4)


def _count(config) -> int:
  model = unet.build_model(config)
  shapes = jax.eval_shape(lambda k: unet.init_params(model, k, config.data.image_size),
                          jax.random.key(0))
  return unet.param_count(shapes)


@pytest.mark.parametrize('unet_json,expected', [(DDPM_CIFAR10, 35_746_307),
                                                (DDPM_CELEBAHQ, 113_673_219)])
def test_diffusers_full_size_parameter_counts(tmp_path, unet_json, expected):
  """= UNet2DModel(**config.json) counted in PyTorch (diffusers 0.42, meta device)."""
  json.dump(unet_json, open(tmp_path / 'config.json', 'w'))
  json.dump({'_class_name': 'DDPMScheduler', 'beta_schedule': 'linear', 'beta_start': 1e-4,
             'beta_end': 0.02, 'num_train_timesteps': 1000, 'clip_sample': True,
             'trained_betas': None, 'variance_type': 'fixed_small'},
            open(tmp_path / 'scheduler_config.json', 'w'))
  (tmp_path / 'diffusion_pytorch_model.safetensors').write_bytes(b'')  # not read here
  config = diffusers_snapshot.snapshot_config(str(tmp_path))
  assert _count(config) == expected


@pytest.mark.parametrize('size,flags,expected', [
    (256, {}, 552_814_086),      # 256x256_diffusion_uncond.pt, lsun_*.pt
    (512, {}, 557_973_638),      # the 512 flags, unconditional
    (128, dict(num_head_channels=-1), 420_505_606),
    (64, dict(num_channels=192, num_res_blocks=3, use_new_attention_order=True), 295_136_454),
])
def test_guided_full_size_parameter_counts(size, flags, expected):
  """= guided-diffusion's create_model(..., class_cond=False) counted in PyTorch."""
  assert _count(adm.guided_diffusion_config(size, **flags)) == expected


def test_guided_configs_are_the_published_networks():
  from configs import guided_256_uncond, guided_lsun_bedroom  # pylint: disable=g-import-not-at-top
  for module in (guided_256_uncond, guided_lsun_bedroom):
    config = module.get_config()
    assert _count(config) == 552_814_086
    config_checks.validate_config(config, 'evaluate')
    assert config.diffusion.schedule == 'linear' and config.diffusion.num_timesteps == 1000


def test_allowed_values_come_from_the_registries():
  config = default_config.get_config()
  config.model.family = 'vit'
  with pytest.raises(config_checks.WorkdirError, match="family 'vit'.*'adm', 'diffusers_unet2d'"):
    config_checks.validate_config(config, 'train')
  config = default_config.get_config()
  config.diffusion.schedule = 'sigmoid'
  with pytest.raises(config_checks.WorkdirError, match='diffusers_squaredcos_cap_v2'):
    config_checks.validate_config(config, 'train')
  assert set(schedule_lib.SCHEDULES) == set(schedule_lib.SCHEDULE_REGISTRY)
  assert unet.FAMILY_NAMES == tuple(unet.FAMILIES)


# ------------------------------------------------------------------------------ CLI end to end


def _run(module, *args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import train_helpers  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, '-m', module, *args], cwd=train_helpers.ROOT,
                        env=train_helpers.subprocess_env(), capture_output=True, text=True,
                        timeout=600)


def _write_pngs(root, n, size, seed, smooth):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  for i in range(n):
    if smooth:
      a = rng.uniform(0, 1, (3, 3))
      img = np.stack([a[c, 0] + a[c, 1] * xx + a[c, 2] * yy for c in range(3)], -1) / 2.5
    else:
      img = rng.uniform(0, 1, (size, size, 3))
    Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255)).save(os.path.join(root, f'{i:03d}.png'))


def test_cli_convert_evaluate_score_a_diffusers_snapshot(tmp_path):
  """convert --diffusers (and its refusal), --mode=evaluate with folder sets (DiffPath resizing
  through the coarsest set, 16 px), --mode=score: the usual workdir outputs."""
  bad = _snapshot_copy(tmp_path)
  _edit(bad / 'unet' / 'config.json', up_block_types=['UpBlock2D', 'KUpBlock2D', 'UpBlock2D'])
  proc = _run('ddm_ood.convert', f'--diffusers={bad}', f'--workdir={tmp_path / "bad_wd"}')
  assert proc.returncode == 1 and "up_block_types[1]='KUpBlock2D'" in proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'bad_wd').exists()

  wd = str(tmp_path / 'wd')
  proc = _run('ddm_ood.convert', f'--diffusers={DDPM}', f'--workdir={wd}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'diffusers_unet2d, 1,113,955 parameters' in proc.stdout
  ind, ood = tmp_path / 'id', tmp_path / 'ood'
  _write_pngs(ind / 'train', 12, 32, 0, True)
  _write_pngs(ind / 'test', 6, 32, 1, True)
  _write_pngs(ood, 6, 16, 2, False)
  proc = _run('ddm_ood.main', f'--config=configs/workdir.py:{wd}', f'--workdir={wd}',
              '--mode=evaluate', '--config.data.resize_via=-1', '--config.scorer.mode=ddim',
              '--config.scorer.num_steps=2', '--config.scorer.batch_size=6',
              f'--config.eval.id_datasets=("folder:{ind}",)',
              f'--config.eval.ood_datasets=("folder:{ood}",)',
              '--config.eval.feature_kinds=("diffpath_6d",)', '--config.eval.num_fit=12',
              '--config.eval.num_test=6', '--config.eval.num_examples_plot=2',
              '--config.detector.n_components=(1,)', '--config.detector.covariance_types=("diag",)',
              '--config.detector.cv_folds=2')
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.load(open(os.path.join(wd, 'eval', 'results.json')))
  assert res['timesteps'] == [0, 500]
  assert {(r['kind'], r['n_id'], r['n_ood']) for r in res['rows']} == {('diffpath_6d', 6, 6)}
  feature_files = [f for _, _, fs in os.walk(os.path.join(wd, 'features')) for f in fs]
  assert feature_files
  out = tmp_path / 'scores.csv'
  proc = _run('ddm_ood.main', '--mode=score', f'--workdir={wd}', f'--images=folder:{ood}',
              f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = list(__import__('csv').DictReader(open(out)))
  assert len(rows) == 6 and all(np.isfinite(float(r['score'])) for r in rows)
