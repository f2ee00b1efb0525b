"""End to end on the tiny config: train a few steps, run the OOD suite, check every output."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddm_ood import kinds
from ddm_ood import protocol
from tests import results_check
from tests import train_helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
NO_TF_PIDS = '.no_tf_pids'   # beside the workdir: pids of the processes that had TF blocked


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny run of the whole job (train + evaluate) through the CLI, as a user runs it, with
  ``import tensorflow`` made to fail (TensorFlow is only for tfds: sources)."""
  wd = str(tmp_path_factory.mktemp('run'))
  env = h.subprocess_env(no_tf_marker=wd + NO_TF_PIDS)
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={TINY}', f'--workdir={wd}',
         '--config.eval.ood_datasets=("mnist","noise_gaussian","fashion_mnist")',
         '--config.scorer.t_min=25']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '| **average** |' in proc.stdout  # the result table is printed
  return wd


def test_result_files(workdir):
  # Every metric equals ddm_ood.metrics on the saved scores; the csv, results.md and the report's
  # tables equal results.json cell by cell.
  res, _ = results_check.check_run_outputs(workdir)
  # eval.num_test; a class split views its parent's first num_test images.
  from ddm_ood import data, workdir as workdir_lib
  config = workdir_lib.load_config(workdir)
  n_low, n_high = (len(data.class_split_indices(f'mnist[{c}]', 'test', config.data, 32))
                   for c in ('0-4', '5-9'))
  assert n_low + n_high == 32
  assert {(r['n_id'], r['n_ood']) for r in res['rows']} == {(32, 32), (n_low, n_high)}
  selected = ['stein_ssim', 'stein', 'eps_ssim', 'stein_ssim_ddim', 'stein_ddim',
              'stein+stein_ddim']
  roles = {r['kind']: r['role'] for r in res['rows']}
  assert roles == {'zero_shot': 'method', 'stein_ssim': 'method', 'stein_ssim@published': 'method',
                   **{k: 'ablation' for k in selected[1:]},
                   'diffpath_6d': 'baseline', 'diffpath_1d': 'baseline'}
  # The zero-shot rows carry the setting the ID-only protocol chose (a window of the run's grid,
  # then the complexity statistics on or off) and the as-published row R = 1 on the whole
  # window, plain sum.
  for id_name in ('fashion_mnist', 'mnist[0-4]'):
    s = res['settings'][id_name]
    assert s['stein_ssim']['setting']['aggregation'] == 'zsum'
    assert s['stein_ssim']['setting']['t_min'] in (25, 50)
    # t_min_fractions (0, 0.5): t >= 0, 50, snapped to the window 25..75; then complexity on.
    assert len(s['stein_ssim']['selection']) == 3
    assert [r['setting']['complexity'] for r in s['stein_ssim']['selection']] == [
        False, False, True]
    assert s['stein_ssim@published']['setting'] == dict(
        kind='stein_ssim', draws='first', num_draws=1, t_min=25, k0=0, aggregation='sum',
        complexity=False)
    assert s['diffpath_6d']['setting'] is None
    # The default is the candidate kind whose chosen setting has the best criterion.
    zs = s['zero_shot']
    assert [r['setting']['kind'] for r in zs['selection']] == selected
    crit = {r['setting']['kind']: r['criterion'] for r in zs['selection']}
    assert zs['setting']['kind'] == max(crit, key=crit.get)
    assert zs['setting'] == s[zs['setting']['kind']]['setting']
    for k in selected:
      assert crit[k] == max(r['criterion'] for r in s[k]['selection'])
  pairs = set((r['id'], r['ood'], r['suite']) for r in res['rows'])
  assert pairs == {('fashion_mnist', 'mnist', 'far'), ('fashion_mnist', 'noise_gaussian', 'far'),
                   ('mnist[0-4]', 'mnist[5-9]', 'near')}
  for r in res['rows']:
    if r['kind'] in kinds.NAMES:   # the base kinds have per-timestep statistics
      assert len(r['per_timestep_auroc']) == len(res['kind_timesteps'][r['kind']])
    else:
      assert 'per_timestep_auroc' not in r
  # The run's t_min = 25 on the grid 0, 25, 50, 75 (T = 100, K = 4): the seed kinds use the
  # window, the DiffPath baselines the whole grid.
  assert res['timesteps'] == [0, 25, 50, 75]
  assert res['kind_timesteps']['stein_ssim'] == res['kind_timesteps']['stein'] == [25, 50, 75]
  assert res['kind_timesteps']['stein+stein_ddim'] == [25, 50, 75]
  assert res['kind_timesteps']['diffpath_6d'] == [0, 25, 50, 75]


def _png(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(path).convert('RGB'))


def test_plots_show_the_saved_results(workdir, tmp_path, monkeypatch):
  """Each plot is linked from the report, has its figure's size, and draws the saved data."""
  import re  # pylint: disable=g-import-not-at-top
  import matplotlib.axes  # pylint: disable=g-import-not-at-top
  from ddm_ood import metrics, report  # pylint: disable=g-import-not-at-top
  plots = os.path.join(workdir, 'plots')
  # Pixel sizes (width, height) = figsize in inches x 90 dpi: two OOD panels of 3.6 x 3.2;
  # one ID panel; 3 example sets (ID + 2 OOD) x 2 images, rows of 10 x 2.1 (5 columns: image,
  # denoised, error, weighted error, anomaly map); 6 x 6; 6 x 3.5.
  sizes = {'roc_fashion_mnist.png': (648, 288), 'hist_fashion_mnist.png': (648, 288),
           'roc_mnist_0-4_.png': (324, 288), 'hist_mnist_0-4_.png': (324, 288),
           'per_timestep_auroc.png': (648, 288), 'examples.png': (900, 1134),
           'samples.png': (540, 540), 'loss_curve.png': (540, 315)}
  text = open(os.path.join(workdir, 'report.md')).read()
  assert set(re.findall(r'\]\(plots/([^)]+)\)', text)) == set(os.listdir(plots)) == set(sizes)
  for f, (w, h) in sizes.items():
    assert _png(os.path.join(plots, f)).shape == (h, w, 3), f

  # Re-render the plots from results.json, scores.npz, the sample grid and metrics.jsonl,
  # recording what is drawn: the PNGs are those of the run, and the data are the saved ones.
  drawn = []
  for name in ('plot', 'hist', 'imshow'):
    orig = getattr(matplotlib.axes.Axes, name)
    def spy(ax, *args, _name=name, _orig=orig, **kw):
      drawn.append((_name, ax, args, kw))
      return _orig(ax, *args, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
  res, scores = results_check.load_outputs(workdir)
  grid_png = os.path.join(workdir, 'samples', 'samples_00000004.png')
  out = {
      'roc_fashion_mnist.png': lambda p: report.plot_roc(res, scores, 'fashion_mnist', p),
      'hist_fashion_mnist.png': lambda p: report.plot_histograms(res, scores, 'fashion_mnist',
                                                                 'zero_shot', p),
      'per_timestep_auroc.png': lambda p: report.plot_per_timestep(res, 'stein_ssim', p),
      'samples.png': lambda p: report.plot_samples(grid_png, p),
      'loss_curve.png': lambda p: report.plot_loss(workdir, p)}
  calls = {}
  for f, render in out.items():
    start = len(drawn)
    render(str(tmp_path / f))
    calls[f] = [(n, ax.get_title(), args, kw) for n, ax, args, kw in drawn[start:]]
    np.testing.assert_array_equal(_png(tmp_path / f), _png(os.path.join(plots, f)), err_msg=f)

  by = {(r['ood'], r['kind']): r for r in res['rows'] if r['id'] == 'fashion_mnist'}
  # ROC: one curve per method and OOD set, the ROC of the saved scores, whose trapezoid area is
  # the row's AUROC (also in the legend), plus the chance diagonal.
  roc = {(title, kw.get('label')): args for n, title, args, kw in calls['roc_fashion_mnist.png']}
  want = {(f'fashion_mnist vs {o}', f"{k} ({by[(o, k)]['auroc']:.3f})") for o, k in by}
  assert set(roc) == want | {(f'fashion_mnist vs {o}', None) for o in ('mnist', 'noise_gaussian')}
  for o, k in by:
    fpr, tpr = roc[(f'fashion_mnist vs {o}', f"{k} ({by[(o, k)]['auroc']:.3f})")]
    want_fpr, want_tpr = metrics.roc_curve_points(scores[f'fashion_mnist|{k}|id'],
                                                  scores[f'fashion_mnist|{k}|{o}'])
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert abs(area - by[(o, k)]['auroc']) < 1e-12, (o, k)
  # Histograms: the default's ID and OOD scores, clipped only at the pooled 0.5 / 99.5
  # percentiles (at most the pooled minimum and maximum of 64 scores move).
  hists = [(title, kw['label'], args[0]) for n, title, args, kw in calls['hist_fashion_mnist.png']]
  assert [(t, l) for t, l, _ in hists] == [
      (f'zero_shot: fashion_mnist vs {o}', lab) for o in ('mnist', 'noise_gaussian')
      for lab in ('ID fashion_mnist', f'OOD {o}')]
  for title, label, x in hists:
    ood = title.split(' vs ')[1]
    s = scores[f"fashion_mnist|zero_shot|{'id' if label.startswith('ID') else ood}"]
    assert x.shape == s.shape and np.count_nonzero(x != s) <= 2, (title, label)
  # Per-timestep AUROC: the rows' curves over the seed method's window.
  lines = {kw['label']: args for n, title, args, kw in calls['per_timestep_auroc.png']
           if n == 'plot' and title.endswith('fashion_mnist')}
  assert set(lines) == {'mnist', 'noise_gaussian'}
  for o, (t, a) in lines.items():
    assert list(t) == res['kind_timesteps']['stein_ssim'] == [25, 50, 75]
    assert list(a) == by[(o, 'stein_ssim')]['per_timestep_auroc']
  # Samples: the trainer's last grid, 4 samples of 16 x 16 in a 2 x 2 grid with 2 px padding.
  (_, _, (img,), _), = calls['samples.png']
  assert img.shape == (38, 38)
  np.testing.assert_array_equal(img, _png(grid_png)[..., 0])
  # Loss: every logged step's loss from metrics.jsonl.
  (_, _, (steps, losses), _), = calls['loss_curve.png']
  logged = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl')) if l.strip()]
  logged = [r for r in logged if 'loss' in r]
  assert list(steps) == [1, 2, 3, 4] == [r['step'] for r in logged]
  assert list(losses) == [r['loss'] for r in logged]


def test_features_are_cached(workdir):
  from ddm_ood import evaluate
  from ddm_ood import workdir as workdir_lib
  import re  # pylint: disable=g-import-not-at-top
  cache = os.path.join(workdir, 'features')
  files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f.endswith('.npz')]
  # The folder records which network computed it (a retrained step is not reused).
  assert os.listdir(cache) == ['step_00000004'] and os.path.exists(
      os.path.join(cache, 'step_00000004', 'provenance.json'))
  # One file per (dataset, split, count) the suite used, under the checkpoint's step: ID train
  # (num_fit 64 + num_val 24), the synthetic anomalies of the 24 held-out images, and the test
  # splits (num_test 32), each with the rows of every feature kind.
  # Fused kinds are made of their parts, which are cached.
  from ddm_ood import data
  config = workdir_lib.load_config(workdir)
  found = {}
  for f in files:
    m = re.fullmatch(r'([\w-]+)__(train|test|synthetic[0-9a-f]{8})__n(\d+)__[0-9a-f]{12}\.npz',
                     os.path.basename(f))
    assert m and os.path.basename(os.path.dirname(f)) == 'step_00000004', f
    split = 'synthetic' if m[2].startswith('synthetic') else m[2]
    found[(m[1], split)] = int(m[3])
    with np.load(f) as z:
      rows = len(z['complexity/image'])
      assert rows == int(m[3]) or split == 'synthetic', f
      for kind in kinds.base_kinds(config.eval.feature_kinds):
        assert len(z[f'features/{kind}']) == rows, (f, kind)
      assert z['complexity/image'].shape == (rows, 2)
  # The near-OOD class splits are views of mnist: its train and test rows, cached once; only
  # the synthetic anomalies of mnist[0-4]'s held-out images are its own.
  syn = found.pop(('mnist_0-4_', 'synthetic'))
  held_out = data.class_split_indices('mnist[0-4]', 'train', config.data, 88)
  assert syn == held_out[-1] + 1 - held_out[np.searchsorted(held_out, 64)]
  assert len(found) == len(files) - 1 and found == {
      ('fashion_mnist', 'train'): 88, ('fashion_mnist', 'synthetic'): 24,
      ('fashion_mnist', 'test'): 32, ('mnist', 'test'): 32, ('noise_gaussian', 'test'): 32,
      ('mnist', 'train'): 88}
  before = {f: os.path.getmtime(f) for f in files}
  res = evaluate.run_suite(config, workdir, make_report=False)
  assert {f: os.path.getmtime(f) for f in files} == before  # read back, not recomputed
  old = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  assert [r['auroc'] for r in res['rows']] == [r['auroc'] for r in old['rows']]


def test_evaluation_writes_tensorboard_scalars(workdir):
  """Evaluate mode writes its AUROCs as TensorBoard scalars next to training's."""
  import glob  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  res = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  files = glob.glob(os.path.join(workdir, 'eval', 'events.out.tfevents.*'))
  assert files, os.listdir(os.path.join(workdir, 'eval'))
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))   # training's
  acc = event_accumulator.EventAccumulator(os.path.dirname(files[0]))
  acc.Reload()
  tags = acc.Tags().get('tensors', []) + acc.Tags().get('scalars', [])
  def value(tag):
    if tag in acc.Tags().get('scalars', []):
      return acc.Scalars(tag)[-1].value
    return float(np.asarray(tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto)))
  for kind, avg in res['averages'].items():
    tag = f'eval/average_auroc/{kind}'
    assert tag in tags, (tag, tags[:5])
    assert abs(value(tag) - avg['auroc']) < 1e-6
  r = res['rows'][0]
  assert abs(value(f"eval/fpr95/{r['id']}/{r['ood']}/{r['kind']}") - r['fpr95']) < 1e-6


def test_the_job_ran_without_tensorflow(workdir):
  """The fixture's job ran with TensorFlow's import blocked and still wrote the training event
  file with the same tags and steps (loss etc. every log_every step, steps/s after the first)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  with open(workdir + NO_TF_PIDS) as f:
    assert f.read().split()   # the blocker was loaded in the job's process(es)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert {'loss', 'grad_norm', 'lr', 'steps_per_sec', 'uptime'} <= set(acc.Tags()['tensors'])
  assert [e.step for e in acc.Tensors('loss')] == [1, 2, 3, 4]   # configs/tiny.py: 4 steps
  assert [e.step for e in acc.Tensors('steps_per_sec')] == [2, 3, 4]


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
  config.eval.near_ood_pairs = (('mnist[0-4]', 'digits'),)
  res = evaluate.run_suite(config, copy, make_report=False)
  # Every selected kind's setting (fused ones too), the default's pick among them with every
  # candidate's criterion, and the published row: the same, whatever the OOD sets.
  for id_name in ('fashion_mnist', 'mnist[0-4]'):
    for method in ('zero_shot', *protocol.selected_kinds(config.eval.feature_kinds),
                   'stein_ssim@published'):
      assert res['settings'][id_name][method] == first[id_name][method], (id_name, method)
  assert {r['ood'] for r in res['rows']} == {'noise_uniform', 'digits'}


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
  # Every method of the results (fused kinds, the complexity statistics and the default's pick
  # included) loads and scores as the suite did; the API's default is the zero-shot default.
  all_scores = np.load(os.path.join(workdir, 'eval', 'scores.npz'))
  res = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  methods = list(res['averages'])
  assert methods[0] == 'zero_shot' and 'stein+stein_ddim' in methods
  for method in methods:
    ood_m = api.load_anomaly_scorer(workdir, kind=method)
    got = ood_m(images[:8], np.arange(8, dtype=np.int32))
    want = all_scores[f'fashion_mnist|{method}|id'][:8]
    # The SSIM map of the DDIM path amplifies float32 rounding (the suite runs sharded over 2
    # devices, the API on one): its per-timestep statistics agree to 1e-3, the scores to 3%.
    tol = 3e-2 if 'stein_ssim_ddim' in (ood_m.scorer_kind or '') else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=method)
  default = api.load_anomaly_scorer(workdir)
  assert default.kind == 'zero_shot'
  assert default.scorer_kind == res['settings']['fashion_mnist']['zero_shot']['setting']['kind']


def test_embedded_fn_of_a_fused_kind_with_complexity_matches_the_suite(workdir):
  """The pure function of a setting (fused kind, complexity statistics) scores images as the
  suite's statistics do, whatever the protocol happened to pick on the tiny run."""
  from ddm_ood import api, data, evaluate, selection
  from ddm_ood import workdir as workdir_lib
  config = workdir_lib.load_config(workdir)
  ood = api.load_anomaly_scorer(workdir, kind='stein_ssim')
  extractor = evaluate.FeatureExtractor(config, ood.unet_params, ood.step,
                                        cache_dir=os.path.join(workdir, 'features'))
  fit = extractor.features('fashion_mnist', 'train', 88)
  test = extractor.features('fashion_mnist', 'test', 32)
  images = data.load_images('fashion_mnist', 'test', config.data, max_examples=6,
                            seed=config.seed)
  for setting in (selection.Setting('stein+stein_ddim', 'all', 1, 'zsum', True),
                  selection.Setting('stein_ssim', 'first', 0, 'concat', True)):
    det = selection.fit(setting, fit, len(protocol.grid_of(config, setting.kind)),
                        config.detector, 0)
    fn = jax.jit(api.make_anomaly_fn(ood.apply_fn, ood.schedule, config.scorer, setting.kind,
                                     setting.draws, setting.complexity))
    got = fn(ood.unet_params, (det.reducer, det.params), images, np.arange(6, dtype=np.int32),
             ood.key)
    want = selection.score(det, setting, test)[:6]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=str(setting))


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
               '--config.select.num_val=12', '--config.select.t_min_fractions=(0.0,0.4)',
               '--config.select.localisation_images=6']
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={config}', f'--workdir={tmp_path}',
         *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.load(open(tmp_path / 'eval' / 'results.json'))
  from configs import fashion_mnist
  ev = fashion_mnist.get_config().eval
  methods = ['zero_shot', *ev.feature_kinds, 'stein_ssim@published', 'stein_ssim@oracle']
  expected = {(i, o, k, 'far') for i in ev.id_datasets for o in ev.ood_datasets if o != i
              for k in methods}
  expected |= {(i, o, k, 'near') for i, o in ev.near_ood_pairs for k in methods}
  assert {(r['id'], r['ood'], r['kind'], r['suite']) for r in res['rows']} == expected
  assert res['kind_timesteps']['stein_ssim'] == [0, 200, 400, 600, 800]
  assert res['kind_timesteps']['diffpath_6d'] == [0, 200, 400, 600, 800]
  # The leave-one-out check covers every OOD set; the localisation study ran on 6 images.
  assert set(res['leave_one_out']) == set(ev.ood_datasets)
  assert res['localisation']['num_images'] == 6 and res['localisation']['donor'] == 'textures'
  report = open(tmp_path / 'report.md').read()
  for section in ('The zero-shot default', 'Near-OOD: class splits', 'Leave-one-OOD-set-out',
                  'Localisation', 'Zero-shot selection', 'Per-corruption AUROC'):
    assert section in report, section
  results_check.check_run_outputs(str(tmp_path))
  import re  # pylint: disable=g-import-not-at-top
  from ddm_ood import evaluate  # pylint: disable=g-import-not-at-top
  # Every plot is linked from the report: ROC and histograms per ID set, and one of each other.
  linked = set(re.findall(r'\]\(plots/([^)]+)\)', report))
  assert linked == set(os.listdir(tmp_path / 'plots')) == {
      f'{p}_{evaluate.safe_name(i)}.png' for i in [*ev.id_datasets, *(
          i for i, _ in ev.near_ood_pairs)] for p in ('roc', 'hist')} | {
          'per_timestep_auroc.png', 'examples.png', 'samples.png', 'loss_curve.png',
          'localisation.png'}
