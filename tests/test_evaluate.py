"""End to end on the tiny config: train a few steps, run the OOD suite, check every output."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny run of the whole job (train + evaluate) through the CLI, as a user runs it."""
  wd = str(tmp_path_factory.mktemp('run'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={TINY}', f'--workdir={wd}',
         '--config.eval.ood_datasets=("mnist","noise_gaussian","fashion_mnist")',
         '--config.scorer.t_min=25']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '| **average** |' in proc.stdout  # the result table is printed
  return wd


def test_result_files(workdir):
  ev = os.path.join(workdir, 'eval')
  for f in ('results.json', 'results.csv', 'results.md', 'scores.npz'):
    assert os.path.getsize(os.path.join(ev, f)) > 100, f
  res = json.load(open(os.path.join(ev, 'results.json')))
  kinds = set(r['kind'] for r in res['rows'])
  assert kinds == {'stein_ssim', 'stein_ssim@published', 'stein', 'diffpath_6d', 'diffpath_1d'}
  roles = {r['kind']: r['role'] for r in res['rows']}
  assert roles == {'stein_ssim': 'method', 'stein_ssim@published': 'method', 'stein': 'ablation',
                   'diffpath_6d': 'baseline', 'diffpath_1d': 'baseline'}
  # The zero-shot rows carry the setting the ID-only protocol chose (a window of the run's grid)
  # and the as-published row R = 1 on the whole window, plain sum.
  s = res['settings']['fashion_mnist']
  assert s['stein_ssim']['setting']['aggregation'] == 'zsum'
  assert s['stein_ssim']['setting']['t_min'] in (25, 50)
  assert len(s['stein_ssim']['selection']) == 2   # t_mins (0, 50) snapped to the window 25..75
  assert s['stein_ssim@published']['setting'] == dict(
      kind='stein_ssim', draws='first', num_draws=1, t_min=25, k0=0, aggregation='sum')
  assert s['diffpath_6d']['setting'] is None
  pairs = set((r['id'], r['ood']) for r in res['rows'])
  assert pairs == {('fashion_mnist', 'mnist'), ('fashion_mnist', 'noise_gaussian')}
  for r in res['rows']:
    assert 0.0 <= r['auroc'] <= 1.0 and 0.0 <= r['fpr95'] <= 1.0
    if '@' not in r['kind']:
      assert len(r['per_timestep_auroc']) == len(res['kind_timesteps'][r['kind']])
  # The run's t_min = 25 on the grid 0, 25, 50, 75 (T = 100, K = 4): the seed kinds use the
  # window, the DiffPath baselines the whole grid.
  assert res['timesteps'] == [0, 25, 50, 75]
  assert res['kind_timesteps']['stein_ssim'] == res['kind_timesteps']['stein'] == [25, 50, 75]
  assert res['kind_timesteps']['diffpath_6d'] == [0, 25, 50, 75]
  # The table in the report equals results.json.
  report = open(os.path.join(workdir, 'report.md')).read()
  results_section = report.split('## Results')[1].split('## Averages')[0]
  for r in res['rows']:
    line = [l for l in results_section.splitlines()
            if l.startswith(f"| {r['id']} | {r['ood']} |")]
    assert len(line) == 1
    assert f"{r['auroc']:.4f}" in line[0] and f"{r['fpr95']:.4f}" in line[0]
  csv_lines = open(os.path.join(ev, 'results.csv')).read().splitlines()
  assert len(csv_lines) == 1 + len(res['rows'])


def test_plots_exist_and_are_nontrivial(workdir):
  plots = os.path.join(workdir, 'plots')
  expected = ['roc_fashion_mnist.png', 'hist_fashion_mnist.png', 'per_timestep_auroc.png',
              'examples.png', 'samples.png', 'loss_curve.png']
  from PIL import Image
  for f in expected:
    path = os.path.join(plots, f)
    assert os.path.getsize(path) > 5000, f
    img = np.asarray(Image.open(path).convert('L'), np.float32)
    assert img.std() > 5, f'{f} looks blank'
    assert f'plots/{f}' in open(os.path.join(workdir, 'report.md')).read()


def test_features_are_cached(workdir):
  from ddm_ood import evaluate
  from ddm_ood import workdir as workdir_lib
  cache = os.path.join(workdir, 'features')
  files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
  assert files
  before = {f: os.path.getmtime(f) for f in files}
  config = workdir_lib.load_config(workdir)
  res = evaluate.run_suite(config, workdir, make_report=False)
  assert {f: os.path.getmtime(f) for f in files} == before  # read back, not recomputed
  old = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  assert [r['auroc'] for r in res['rows']] == [r['auroc'] for r in old['rows']]


def test_zero_shot_choice_never_depends_on_the_ood_sets(workdir, tmp_path):
  """The zero-shot protocol sees ID images only: other OOD sets, same choice and detector."""
  import shutil
  from ddm_ood import evaluate
  from ddm_ood import workdir as workdir_lib
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  config = workdir_lib.load_config(copy)
  first = json.load(open(os.path.join(workdir, 'eval', 'results.json')))['settings']
  config.eval.ood_datasets = ('noise_uniform',)
  res = evaluate.run_suite(config, copy, make_report=False)
  for method in ('stein_ssim', 'stein', 'stein_ssim@published'):
    assert res['settings']['fashion_mnist'][method] == first['fashion_mnist'][method], method
  assert {r['ood'] for r in res['rows']} == {'noise_uniform'}


def test_embedded_api_matches_suite_scores(workdir):
  from ddm_ood import api
  from ddm_ood import data
  ood = api.load_anomaly_scorer(workdir, kind='stein_ssim')
  config = ood.config
  images = data.load_images('fashion_mnist', 'test', config.data,
                            max_examples=config.eval.num_test, seed=config.seed)
  # The suite names a dataset's images by their index; without ids the API hashes the pixels.
  scores = ood(images, np.arange(len(images), dtype=np.int32))
  saved = np.load(os.path.join(workdir, 'eval', 'scores.npz'))['fashion_mnist|stein_ssim|id']
  np.testing.assert_allclose(scores, saved, rtol=1e-4, atol=1e-4)
  # The pure function embeds in a user's own jit.
  assert ood.draws == 'all'   # the zero-shot detector is fitted on aggregated statistics
  f = jax.jit(api.make_anomaly_fn(ood.apply_fn, ood.schedule, config.scorer, 'stein_ssim',
                                  ood.draws))
  ids = np.arange(5, dtype=np.int32)
  s = f(ood.unet_params, ood.detector_params, images[:5], ids, ood.key)
  np.testing.assert_allclose(np.asarray(s), saved[:5], rtol=1e-4, atol=1e-4)
  # Every method of the results loads and scores as the suite did.
  all_scores = np.load(os.path.join(workdir, 'eval', 'scores.npz'))
  for method in ('stein_ssim@published', 'stein', 'diffpath_6d', 'diffpath_1d'):
    got = api.load_anomaly_scorer(workdir, kind=method)(images[:8], np.arange(8, dtype=np.int32))
    want = all_scores[f'fashion_mnist|{method}|id'][:8]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=method)


def test_api_bad_input(workdir):
  from ddm_ood import api
  ood = api.load_anomaly_scorer(workdir)
  s = ood.config.data.image_size
  with pytest.raises(ValueError, match='rank|shape'):
    ood(np.zeros((s, s, 1), np.float32))
  with pytest.raises(ValueError, match='channel'):
    ood(np.zeros((2, s, s, 3), np.float32))
  with pytest.raises(ValueError, match='size'):
    ood(np.zeros((2, s + 4, s + 4, 1), np.float32))
  with pytest.raises(ValueError, match='dtype|float'):
    ood(np.zeros((2, s, s, 1), np.uint8))
  bad = np.zeros((2, s, s, 1), np.float32)
  bad[1, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    ood(bad)
  with pytest.raises(FileNotFoundError, match='detector'):
    api.load_anomaly_scorer(workdir, id_dataset='textures')


def test_evaluate_rejects_bad_suite(workdir, tmp_path):
  from ddm_ood import data
  from ddm_ood import evaluate
  from ddm_ood import workdir as workdir_lib
  config = workdir_lib.load_config(workdir)
  config.eval.ood_datasets = ('no_such_set',)
  with pytest.raises(data.DataError, match='no_such_set'):
    evaluate.run_suite(config, workdir, make_report=False)
  config.eval.ood_datasets = (f'folder:{tmp_path}',)  # exists, but holds no image
  with pytest.raises(data.DataError, match='image'):
    evaluate.run_suite(config, workdir, make_report=False)
  config.eval.ood_datasets = ('mnist',)
  config.eval.feature_kinds = ('stein_ssim', 'magic')
  with pytest.raises(ValueError, match='magic'):
    evaluate.run_suite(config, workdir, make_report=False)


def test_main_job_on_embedded_default_at_reduced_size(tmp_path):
  """README's main-job command on configs/fashion_mnist.py, shrunk by command-line overrides.

  Runs the whole default suite (every ID set, every OOD set, every feature kind) end to end.
  """
  config = os.path.join(ROOT, 'configs', 'fashion_mnist.py')
  overrides = ['--config.model.ch=8', '--config.model.num_groups=4',
               '--config.train.num_steps=2', '--config.train.batch_size=8',
               '--config.train.num_samples=4', '--config.train.sample_steps=2',
               '--config.data.texture_crops=40', '--config.data.synthetic_examples=24',
               # grid t = 0, 200, ..., 800; the config's t_min = 400 keeps three points
               '--config.scorer.num_steps=5', '--config.scorer.batch_size=16',
               '--config.scorer.chunk=8', '--config.eval.num_fit=40',
               '--config.eval.num_test=24', '--config.eval.num_examples_plot=1',
               '--config.detector.n_components=(1,2)',
               '--config.detector.covariance_types=("diag",)', '--config.detector.cv_folds=2',
               '--config.select.num_val=12', '--config.select.t_mins=(0,400)',
               '--config.select.localisation_images=6']
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={config}', f'--workdir={tmp_path}',
         *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.load(open(tmp_path / 'eval' / 'results.json'))
  from configs import fashion_mnist
  ev = fashion_mnist.get_config().eval
  methods = list(ev.feature_kinds) + ['stein_ssim@published', 'stein_ssim@oracle']
  expected = {(i, o, k) for i in ev.id_datasets for o in ev.ood_datasets if o != i
              for k in methods}
  assert {(r['id'], r['ood'], r['kind']) for r in res['rows']} == expected
  assert res['kind_timesteps']['stein_ssim'] == [0, 200, 400, 600, 800]
  assert res['kind_timesteps']['diffpath_6d'] == [0, 200, 400, 600, 800]
  # The leave-one-out check covers every OOD set; the localisation study ran on 6 images.
  assert set(res['leave_one_out']) == set(ev.ood_datasets)
  assert res['localisation']['num_images'] == 6 and res['localisation']['donor'] == 'textures'
  report = open(tmp_path / 'report.md').read()
  for section in ('three ways', 'Leave-one-OOD-set-out', 'Localisation', 'Zero-shot selection'):
    assert section in report, section
  assert os.path.exists(tmp_path / 'report.md')
  assert len(os.listdir(tmp_path / 'plots')) >= 2 * len(ev.id_datasets) + 4


def test_validation_study_script(workdir):
  """scripts/validation_study.py on the tiny run (its window sums are checked against the scorer)."""
  cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'validation_study.py'),
         f'--workdir={workdir}', '--draws=1,2', '--t_mins=0,25,50,100', '--num_fit=24',
         '--num_val=12']
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout)
  # t_min = 100 is past the grid 0, 25, 50, 75 (T = 100, K = 4) and is skipped.
  assert set(out['settings']) == {f'R={r},t_min={t}' for r in (1, 2) for t in (0, 25, 50)}
  assert out['best'] in out['settings'] and out['split'] == 'train only'
  for s in out['settings'].values():
    assert set(s['auroc']) == {'fashion_mnist vs mnist', 'fashion_mnist vs noise_gaussian'}
    assert all(0.0 <= a <= 1.0 for a in s['auroc'].values())
    assert s['timesteps'] == [t for t in (0, 25, 50, 75) if t >= s['t_min']]
  assert out['settings']['R=1,t_min=0']['auroc'] != out['settings']['R=2,t_min=0']['auroc']
