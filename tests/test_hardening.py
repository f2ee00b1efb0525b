"""Issue 11: a workdir no mistake can break, scores independent of batch position, corrupt files.

One tiny trained workdir (configs/tiny.py, 4 steps, checkpoints at 2 and 4) is shared; each test
works on its own copy. Section 11 (issue 21): every expected failure of `python -m ddm_ood.main`
is one ``ddm_ood: error:`` line without a traceback, and the workdir stays usable; the disk-full
and read-only cases mount a small tmpfs (skipped where that is not allowed).
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddm_ood import api
from ddm_ood import checkpoint
from ddm_ood import data
from ddm_ood import detector
from ddm_ood import evaluate
from ddm_ood import schedule as schedule_lib
from ddm_ood import scorer
from ddm_ood import train
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib
from tests import train_helpers as h


def _tiny():
  config = h.load_config('tiny')
  config.train.num_samples = 0
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('trained'))
  config = _tiny()
  train.train(config, wd)
  workdir_lib.save_config(config, wd)
  return wd


@pytest.fixture
def run_dir(trained, tmp_path):
  wd = str(tmp_path / 'run')
  shutil.copytree(trained, wd, ignore=shutil.ignore_patterns(workdir_lib.LOCK_FILE))
  return wd


def _cli(workdir, *args, mode='evaluate', config=os.path.join(h.ROOT, 'configs', 'tiny.py'),
         cache_dir=None):
  cmd = [sys.executable, '-m', 'ddm_ood.main', f'--config={config}', f'--workdir={workdir}',
         f'--mode={mode}', *args]
  return subprocess.run(cmd, cwd=h.ROOT, env=h.subprocess_env(cache_dir=cache_dir),
                        capture_output=True, text=True, timeout=300)


def _one_line_error(proc, *needles):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('ddm_ood: error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


def _snapshot(workdir):
  out = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(d, f)
      if f != workdir_lib.LOCK_FILE:
        with open(p, 'rb') as fh:
          out[os.path.relpath(p, workdir)] = fh.read()
  return out


# ----------------------------------------------------------------------- 1. validate, then write
def test_rejected_runs_leave_the_workdir_untouched(run_dir):
  before = _snapshot(run_dir)
  _one_line_error(_cli(run_dir, '--config.model.ch=16'), 'model.ch: checkpoint 8 vs now 16')
  _one_line_error(_cli(run_dir, "--config.eval.feature_kinds=('nope',)"),
                  "Unknown feature kind 'nope'")
  assert _snapshot(run_dir) == before
  assert workdir_lib.load_config(run_dir).model.ch == 8


# ------------------------------------------------------------- 2. model fields match checkpoint
def test_network_fields_must_match_the_checkpoint(run_dir):
  before = _snapshot(run_dir)
  config = _tiny()
  config.data.image_size = 32
  config.diffusion.num_timesteps = 50
  with pytest.raises(workdir_lib.WorkdirError) as e:
    evaluate.run_suite(config, run_dir, make_report=False)
  assert 'data.image_size: checkpoint 16 vs now 32' in str(e.value)
  assert 'diffusion.num_timesteps: checkpoint 100 vs now 50' in str(e.value)
  config = _tiny()
  config.model.num_res_blocks, config.train.num_steps = 2, 6
  with pytest.raises(workdir_lib.WorkdirError, match='model.num_res_blocks: checkpoint 1 vs now 2'):
    train.train(config, run_dir)   # resume
  assert _snapshot(run_dir) == before
  config = _tiny()  # eval-only fields may change
  config.eval.num_test = 7
  workdir_lib.check_compatible(config, run_dir)


# -------------------------------------------------------------------------- 3. symlink loops
def _write_png(path, value, dtype=np.uint8):
  from PIL import Image
  Image.fromarray(np.full((16, 16), value, dtype)).save(path)


def test_folder_counts_each_real_file_once(tmp_path):
  root = tmp_path / 'imgs'
  (root / 'sub').mkdir(parents=True)
  for i in range(3):
    _write_png(root / f'{i}.png', 40 * i)
  _write_png(root / 'sub' / 'x.png', 200)
  os.symlink('.', root / 'self')                   # a loop
  os.symlink('..', root / 'sub' / 'up')            # another loop
  os.symlink(root / '0.png', root / 'link.png')    # a second name of a file
  files = data.folder_files(str(root), 'test')
  assert len(files) == 4, files
  x = data.load_images(f'folder:{root}', 'test', _tiny().data)
  assert x.shape == (4, 16, 16, 1)


# --------------------------------------------------------------- 4. ids from the image content
def test_default_ids_make_scores_independent_of_batching():
  config = _tiny()
  model = unet.build_model(config)
  params = h.random_params(model, 16, seed=1)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (12, 16, 16, 1)).astype(np.float32)
  fitted = detector.fit_detector(rng.normal(size=(64, 6)), config.detector, seed=0)
  ood = api.AnomalyScorer(
      config=config, kind='stein_ssim', id_dataset='x', step=0, unet_params=params,
      detector_params=fitted.params, apply_fn=lambda p, x, t: model.apply(p, x, t),
      schedule=schedule_lib.make_schedule('cosine', 100), key=evaluate.scorer_key(0))
  a = ood(images)
  perm = rng.permutation(12)
  np.testing.assert_array_equal(ood(images), a)
  np.testing.assert_allclose(ood(images[perm]), a[perm], rtol=1e-4, atol=1e-4)
  halves = np.concatenate([ood(images[:6]), ood(images[6:])])
  np.testing.assert_allclose(halves, a, rtol=1e-4, atol=1e-4)
  # Position ids (the old default) do depend on the position: the test can fail.
  by_pos = ood(images[perm], np.arange(12, dtype=np.int32))
  assert np.max(np.abs(by_pos - ood(images, np.arange(12, dtype=np.int32))[perm])) > 1e-2
  ids = np.asarray(scorer.content_ids(np.concatenate([images, images[:1], -0.0 * images[:1]])))
  assert len(set(ids[:12].tolist())) == 12 and ids[12] == ids[0]
  assert ids.dtype == np.int32


# ------------------------------------------------------------------- 5. corrupt checkpoints
def _corrupt_step(workdir, step):
  for d, _, files in os.walk(os.path.join(workdir, 'checkpoints', str(step))):
    for f in files:
      if f not in ('commit_success.txt', '_CHECKPOINT_METADATA'):
        with open(os.path.join(d, f), 'wb') as fh:
          fh.write(b'\0garbage')


def test_corrupt_latest_checkpoint_falls_back(run_dir, trained, caplog):
  config = _tiny()
  _corrupt_step(run_dir, 4)
  with caplog.at_level(logging.WARNING):
    _, step = checkpoint.restore_ema_params(run_dir, config)
  assert step == 2
  assert any('Checkpoint 4 ' in r.getMessage() and 'falling back to step 2' in r.getMessage()
             for r in caplog.records)
  # Resume: from step 2, the bad step moved aside, retrained to 4, equal to the intact run.
  result = train.train(config, run_dir)
  assert result['step'] == 4
  assert os.listdir(os.path.join(run_dir, 'checkpoints_unreadable'))[0].startswith('4.')
  got, _ = checkpoint.restore_ema_params(run_dir, config)
  want, _ = checkpoint.restore_ema_params(trained, config)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:   # item 10: steps never repeat
    assert [json.loads(l)['step'] for l in f] == [1, 2, 3, 4]
  for s in (2, 4):
    _corrupt_step(run_dir, s)
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r'No readable checkpoint.*\[4, 2\]'):
    checkpoint.restore_ema_params(run_dir, config)


# ------------------------------------------------------------------- 6. corrupt feature cache
def test_truncated_feature_cache_is_recomputed(tmp_path, caplog):
  config = _tiny()
  config.eval.feature_kinds = ('stein_ssim',)
  params = h.random_params(unet.build_model(config), 16, seed=2)
  ext = evaluate.FeatureExtractor(config, params, 4, cache_dir=str(tmp_path))
  first = ext.features('noise_gaussian', 'test', 4)
  (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
             if f.endswith('.npz')]
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)
  with caplog.at_level(logging.WARNING):
    again = ext.features('noise_gaussian', 'test', 4)
  assert any(path in r.getMessage() and 'recomputing' in r.getMessage() for r in caplog.records)
  for k in first:
    np.testing.assert_array_equal(again[k], first[k])
  assert os.path.getsize(path) == size


# ---------------------------------------------------------------------------- 7. workdir lock
_HOLD = r'''
import sys, time
from ddm_ood import workdir
with workdir.lock(sys.argv[1]):
  print('LOCKED', flush=True)
  time.sleep(120)
'''


def test_second_writer_is_refused_and_lock_dies_with_holder(tmp_path):
  wd = str(tmp_path / 'wd')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, wd], cwd=h.ROOT, env=h.subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'LOCKED'
    with pytest.raises(workdir_lib.WorkdirError, match=rf'in use .*\(pid {holder.pid}\)'):
      with workdir_lib.lock(wd):
        pass
    config = _tiny()
    with pytest.raises(workdir_lib.WorkdirError, match=f'pid {holder.pid}'):
      train.train(config, wd)
    assert not os.path.exists(os.path.join(wd, 'metrics.jsonl'))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
  with workdir_lib.lock(wd):       # released by the kernel on SIGKILL
    with workdir_lib.lock(wd):     # re-entrant in one process
      pass


# ------------------------------------------------------------------------- 8. 16-bit PNGs
def test_16bit_png_scaled_by_bit_depth_not_content(tmp_path):
  d = tmp_path / 'png16'
  d.mkdir()
  _write_png(d / 'dark.png', 200, np.uint16)      # 200 / 65535: nearly black
  _write_png(d / 'bright.png', 65535, np.uint16)
  x = data.load_images(f'folder:{d}', 'test', _tiny().data)
  files = data.folder_files(str(d), 'test')
  by_name = {os.path.basename(f): x[i] for i, f in enumerate(files)}
  np.testing.assert_allclose(by_name['dark.png'], 1 / 127.5 - 1.0, atol=1e-6)  # round(200/257)=1
  np.testing.assert_allclose(by_name['bright.png'], 1.0, atol=1e-6)


# ----------------------------------------------------------------- 9. validation before work
def test_config_and_sources_validated_before_any_work(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  cases = [
      (('data', 'dataset', 'nope'), 'config.data.dataset', 'all'),
      (('eval', 'ood_datasets', ('mnist', 'nope')), 'config.eval.ood_datasets', 'evaluate'),
      (('eval', 'ood_datasets', (f'folder:{empty}',)), 'No images found', 'all'),
      (('eval', 'id_datasets', (f'folder:{tmp_path}/missing',)), 'does not exist', 'all'),
      (('eval', 'feature_kinds', ('stein', 'nope')), "Unknown feature kind 'nope'", 'all'),
      (('diffusion', 'schedule', 'sqrt'), 'diffusion.schedule', 'train'),
  ]
  for (section, field, value), needle, mode in cases:
    config = _tiny()
    config[section][field] = value
    with pytest.raises(workdir_lib.WorkdirError, match=None) as e:
      workdir_lib.validate_config(config, mode)
    assert needle in str(e.value), (field, str(e.value))
  config = _tiny()
  config.eval.ood_datasets = ('nope',)
  workdir_lib.validate_config(config, 'train')   # train-only runs do not need eval sets
  # Through the CLI in --mode=all: fails in seconds, before training, nothing written.
  wd = str(tmp_path / 'never')
  t0 = time.time()
  _one_line_error(_cli(wd, f'--config.eval.ood_datasets=("folder:{empty}",)', mode='all'),
                  'No images found')
  assert time.time() - t0 < 60 and not os.path.exists(wd)


# ------------------------------------------------------------------------------- 10. smaller
def test_bad_steps_missing_config_and_file_workdir(tmp_path):
  config = _tiny()
  config.train.num_steps = -5
  with pytest.raises(workdir_lib.WorkdirError, match='num_steps must be a positive'):
    train.train(config, str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'a')
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  _one_line_error(_cli(str(a_file), mode='train'), 'is a file, not a directory')
  _one_line_error(_cli(str(tmp_path / 'b'), config=str(tmp_path / 'missing.py')),
                  'cannot load --config', 'No such file')
  _one_line_error(_cli(str(tmp_path / 'c'), '--config.train.num_steps=0', mode='train'),
                  'num_steps must be a positive')


def test_metrics_truncated_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': float(s)}) for s in (1, 2, 3, 4, 5, 3, 4)]
  path.write_text('\n'.join(lines) + '\n{"step": 6, "lo')   # a line cut by a kill
  train.truncate_metrics(str(tmp_path), 4)
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3, 4]


# ------------------------------------------------- 11. one line per mistake (issue 21, 4-11)
_CONFIG_MISTAKES = {   # case: (mode, overrides, what the one line must name)
    'typo': ('train', ['--config.train.num_stepz=5'],
             ['--config.train.num_stepz=5', "no field 'num_stepz'", "did you mean 'num_steps'"]),
    'negative_lr': ('all', ['--config.train.learning_rate=-1'],
                    ['learning_rate must be a positive number, got -1.0']),
    'zero_batch': ('train', ['--config.train.batch_size=0'], ['batch_size must be a positive']),
    'zero_image_size': ('evaluate', ['--config.data.image_size=0'],
                        ['image_size must be positive']),
    'bad_int': ('train', ['--config.train.num_steps=ten'], ['--config.train.num_steps=ten']),
    'repeated_ood_flag': ('evaluate', ["--config.eval.ood_datasets=('mnist',)"] * 2,
                          ["eval.ood_datasets names ['mnist'] more than once",
                           'appends to the tuple']),
    'duplicate_id_set': ('all', ["--config.eval.id_datasets=('mnist','fashion_mnist','mnist')"],
                         ["eval.id_datasets names ['mnist'] more than once"]),
    'duplicate_kind': ('evaluate', ["--config.eval.feature_kinds=('stein','diffpath_1d','stein')"],
                       ["eval.feature_kinds names ['stein'] more than once"]),
}


@pytest.mark.parametrize('case', sorted(_CONFIG_MISTAKES))
def test_config_mistake_is_one_line_and_writes_nothing(case, run_dir):
  """Items 9-11: a typo, a bad value, a name listed twice: one line in seconds, nothing written."""
  mode, overrides, needles = _CONFIG_MISTAKES[case]
  before = _snapshot(run_dir)
  t0 = time.time()
  proc = _cli(run_dir, *overrides, mode=mode)
  _one_line_error(proc, *needles)
  assert time.time() - t0 < 60
  assert _snapshot(run_dir) == before
  # --verbosity=1 shows the traceback behind the same line.
  if case == 'typo':
    verbose = _cli(run_dir, *overrides, '--verbosity=1', mode=mode)
    assert 'Traceback' in verbose.stderr and verbose.stderr.count('ddm_ood: error:') == 1


def test_divergence_is_one_line_and_evaluate_says_so(tmp_path, jax_cache):
  """Item 4: one line with the 1-based step of metrics.jsonl; the checkpoint is marked, and a
  later evaluate says why it evaluates a checkpoint short of train.num_steps."""
  wd = str(tmp_path / 'div')
  steps = '--config.train.num_steps=6'
  proc = _cli(wd, steps, '--config.train.learning_rate=1e4', mode='train', cache_dir=jax_cache)
  line = _one_line_error(proc, 'Training diverged: non-finite loss at step', 'learning_rate')
  step = int(re.search(r'at step (\d+)', line).group(1))
  logged = [r['step'] for r in workdir_lib.read_metrics(wd)]
  assert logged == list(range(1, step)), (logged, line)   # every logged step before it is finite
  newest = checkpoint.latest_step(wd)
  assert f'newest checkpoint ({newest}) is intact' in line and newest < step
  assert workdir_lib.read_diverged(wd)['checkpoint_step'] == newest
  proc = _cli(wd, steps, *_SMALL_EVAL, cache_dir=jax_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f'Evaluating checkpoint step {newest}, short of the 6 steps' in proc.stderr
          and f'diverged at step {step}' in proc.stderr), proc.stderr[-3000:]
  with open(os.path.join(wd, 'eval', 'results.json')) as f:
    assert f'diverged at step {step}' in json.load(f)['training_note']


_SMALL_EVAL = ("--config.eval.feature_kinds=('diffpath_1d',)",
               "--config.eval.ood_datasets=('noise_gaussian',)")


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's subprocesses (reruns skip compiles)."""
  return tmp_path_factory.mktemp('jax_cache')


@contextlib.contextmanager
def _tmpfs(path, size):
  """A tmpfs of ``size`` (e.g. '3m') mounted at ``path``; the test is skipped where mounting is
  not allowed (needs root / CAP_SYS_ADMIN, as in the project's CI container)."""
  os.makedirs(path, exist_ok=True)
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({mount.stderr.strip() or mount.returncode}); the '
                'disk-full and read-only cases need one')
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def _remount(path, options):
  subprocess.run(['mount', '-o', f'remount,{options}', str(path)], check=True)


def test_disk_full_is_one_line_and_the_run_resumes(tmp_path, jax_cache):
  """Item 5: no space left while training (Orbax's background writer) and while evaluating:
  one line each, no traceback; with space freed the same commands resume and finish."""
  with _tmpfs(tmp_path / 'disk', '3m') as disk:
    wd = os.path.join(disk, 'run')
    steps = '--config.train.num_steps=6'
    line = _one_line_error(_cli(wd, steps, mode='train', cache_dir=jax_cache),
                           'No space left on device', 'rerun the same command')
    newest = checkpoint.latest_step(wd)
    assert newest is not None and f'newest finished checkpoint ({newest}) is intact' in line
    _remount(disk, 'size=16m')
    proc = _cli(wd, steps, mode='train', cache_dir=jax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'Resumed from checkpoint at step {newest}' in proc.stderr
    assert [r['step'] for r in workdir_lib.read_metrics(wd)] == [1, 2, 3, 4, 5, 6]
    # Evaluate with only a few KB left: features / detectors / results cannot be written.
    filler = os.path.join(disk, 'filler')
    free = shutil.disk_usage(disk).free
    with open(filler, 'wb') as f:
      f.write(b'\0' * (free - 16 * 1024))
    _one_line_error(_cli(wd, steps, *_SMALL_EVAL, cache_dir=jax_cache), 'No space left on device',
                    'Free space')
    os.remove(filler)
    proc = _cli(wd, steps, *_SMALL_EVAL, cache_dir=jax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(wd, 'eval', 'results.json')))['checkpoint_step'] == 6


def test_read_only_workdir_and_out_fail_before_any_work(run_dir, tmp_path):
  """Items 6-7: a read-only workdir (evaluate) and a read-only --out (score) are refused before
  any work, in one line; the workdir is untouched and usable once writable."""
  with _tmpfs(tmp_path / 'ro', '8m') as disk:
    wd = os.path.join(disk, 'run')
    shutil.copytree(run_dir, wd)
    before = _snapshot(wd)
    _remount(disk, 'ro')
    t0 = time.time()
    _one_line_error(_cli(wd, *_SMALL_EVAL), f'--workdir={wd} is not writable',
                    'Read-only file system')
    out = os.path.join(disk, 's.csv')
    images = tmp_path / 'images'
    images.mkdir()
    _write_png(images / 'a.png', 7)
    proc = subprocess.run(
        [sys.executable, '-m', 'ddm_ood.main', '--mode=score', f'--workdir={run_dir}',
         f'--images=folder:{images}', f'--out={out}'], cwd=h.ROOT, env=h.subprocess_env(),
        capture_output=True, text=True, timeout=300)
    _one_line_error(proc, f'--out={out} is not writable', 'Read-only file system')
    assert time.time() - t0 < 60 and not os.path.exists(out)
    _remount(disk, 'rw')
    assert _snapshot(wd) == before
    _, step = checkpoint.restore_ema_params(wd, _tiny())
    assert step == 4


def test_empty_batch_gives_an_empty_result():
  """Item 8: zero images -> zero scores / maps (was a ZeroDivisionError in content_ids)."""
  config = _tiny()
  model = unet.build_model(config)
  params = h.random_params(model, 16, seed=3)
  fitted = detector.fit_detector(np.random.default_rng(0).normal(size=(64, 6)), config.detector,
                                 seed=0)
  sched = schedule_lib.make_schedule('cosine', 100)
  ood = api.AnomalyScorer(
      config=config, kind='stein_ssim', id_dataset='x', step=0, unet_params=params,
      detector_params=fitted.params, apply_fn=lambda p, x, t: model.apply(p, x, t),
      schedule=sched, key=evaluate.scorer_key(0))
  empty = np.zeros((0, 16, 16, 1), np.float32)
  assert np.asarray(scorer.content_ids(empty)).shape == (0,)
  scores = ood(empty)
  assert scores.shape == (0,) and scores.dtype == np.float32
  assert ood(empty, np.zeros(0, np.int32)).shape == (0,)
  maps = api.build_anomaly_map_fn(config, lambda p, x, t: model.apply(p, x, t), sched, params,
                                  evaluate.scorer_key(0), output='both')(empty)
  assert maps['map'].shape == maps['baseline'].shape == (0, 16, 16)


def test_feature_cache_of_another_network_is_recomputed(tmp_path, caplog):
  """The feature cache is keyed by checkpoint step; features another network computed at the
  same step (a retrained workdir) are dropped, not reused."""
  config = _tiny()
  config.eval.feature_kinds = ('diffpath_1d',)
  model = unet.build_model(config)
  a = evaluate.FeatureExtractor(config, h.random_params(model, 16, seed=4), 4,
                                cache_dir=str(tmp_path)).features('noise_gaussian', 'test', 4)
  other = evaluate.FeatureExtractor(config, h.random_params(model, 16, seed=5), 4,
                                    cache_dir=str(tmp_path))
  with caplog.at_level(logging.WARNING):
    b = other.features('noise_gaussian', 'test', 4)
  assert any('computed by another network' in r.getMessage() for r in caplog.records)
  assert not np.array_equal(a['features/diffpath_1d'], b['features/diffpath_1d'])
  again = evaluate.FeatureExtractor(config, h.random_params(model, 16, seed=5), 4,
                                    cache_dir=str(tmp_path)).features('noise_gaussian', 'test', 4)
  np.testing.assert_array_equal(again['features/diffpath_1d'], b['features/diffpath_1d'])
