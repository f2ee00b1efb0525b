"""`--mode=score`: a folder of images (one corrupt) -> one CSV row per file, on a tiny workdir."""

import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as h
from ddm_ood import data
from ddm_ood import score_files

BAD = 'zz_broken.png'
N_FILES = 7   # 2 Fashion-MNIST test images, 3 noise images, 1 RGB 20x20 image, 1 corrupt file


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny train + evaluate through the CLI (one kind, one OOD set: what score mode needs)."""
  wd = str(tmp_path_factory.mktemp('run'))
  proc = _main(f'--config={os.path.join(h.ROOT, "configs", "tiny.py")}', f'--workdir={wd}',
               '--config.eval.feature_kinds=("stein_ssim",)',
               '--config.eval.ood_datasets=("noise_gaussian",)',
               '--config.eval.near_ood_pairs=()')
  assert proc.returncode == 0, proc.stderr[-4000:]
  return wd


@pytest.fixture(scope='module')
def folder(run, tmp_path_factory):
  """N_FILES image files (the corrupt one last in sorted order) and a copy of the good ones."""
  from PIL import Image
  from ddm_ood import workdir as workdir_lib
  root = tmp_path_factory.mktemp('images')
  good = root / 'good'
  (root / 'mine').mkdir()
  cfg = workdir_lib.load_config(run).data
  fm = data.load_images('fashion_mnist', 'test', cfg, max_examples=2)
  arrays = {f'fm_{i}.png': np.round((x[..., 0] + 1) * 127.5).astype(np.uint8)
            for i, x in enumerate(fm)}
  rng = np.random.default_rng(0)
  for i in range(3):
    arrays[f'noise_{i}.png'] = rng.integers(0, 256, (16, 16), dtype=np.uint8)
  arrays['rgb.png'] = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
  for name, a in arrays.items():
    Image.fromarray(a).save(root / 'mine' / name)
  shutil.copytree(root / 'mine', good)
  (root / 'mine' / BAD).write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 8)
  return str(root / 'mine'), str(good)


def _main(*args, env=None):
  """``python -m ddm_ood.main *args`` with TensorFlow's import blocked (not needed to score)."""
  cmd = [sys.executable, '-m', 'ddm_ood.main', *args]
  return subprocess.run(cmd, cwd=h.ROOT, env={**h.subprocess_env(no_tf_marker=os.devnull),
                                              **(env or {})},
                        capture_output=True, text=True, timeout=600)


def _read_csv(path):
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  assert tuple(rows[0]) == score_files.CSV_COLUMNS
  return rows[1:]


def test_corrupt_file_is_an_error_naming_it_without_the_flag(run, folder, tmp_path):
  out = tmp_path / 'scores.csv'
  proc = _main('--mode=score', f'--workdir={run}', f'--images=folder:{folder[0]}', f'--out={out}')
  assert proc.returncode == 1
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith('ddm_ood: error: Cannot read image file')
  assert os.path.join(folder[0], BAD) in err and '--skip_bad_files' in err
  assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_skip_bad_files_writes_one_row_per_file(run, folder, tmp_path):
  from ddm_ood import api
  out = tmp_path / 'scores.csv'
  proc = _main('--mode=score', f'--workdir={run}', f'--images=folder:{folder[0]}', f'--out={out}',
               '--skip_bad_files')
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = _read_csv(out)
  assert len(rows) == N_FILES
  assert [r[0] for r in rows] == sorted(r[0] for r in rows)
  bad = os.path.join(folder[0], BAD)
  assert rows[-1][:3] == [bad, '', ''] and re.fullmatch(r'skipped: \w+Error: .+', rows[-1][3])
  assert f'skipped {bad}' in proc.stderr  # listed in the log
  scored = [r for r in rows if r[3] == 'ok']
  assert len(scored) == N_FILES - 1
  # Equal to the embedded API on the same images, read by the folder source.
  good_files = data.folder_files(folder[1], 'test')
  ood = api.load_anomaly_scorer(run, id_dataset='fashion_mnist', kind='stein_ssim')
  ref = ood(data.load_images(f'folder:{folder[1]}', 'test', ood.config.data))
  ref = {os.path.basename(f): s for f, s in zip(good_files, ref)}
  got = {os.path.basename(r[0]): float(r[1]) for r in scored}
  assert set(got) == set(ref)
  np.testing.assert_allclose([got[k] for k in sorted(got)], [ref[k] for k in sorted(got)],
                             rtol=1e-5, atol=1e-5)
  # The above-threshold column against a threshold recomputed from evaluate's ID-test scores.
  saved = np.load(os.path.join(run, 'eval', 'scores.npz'))
  id_scores = np.sort(saved['fashion_mnist|stein_ssim|id'])
  t = id_scores[int(np.ceil(0.95 * id_scores.size)) - 1]
  assert np.mean(id_scores <= t) >= 0.95 > np.mean(id_scores < t)
  assert [r[2] for r in scored] == [str(float(r[1]) > t).lower() for r in scored]
  assert {r[2] for r in scored} == {'true', 'false'}  # (noise above, Fashion-MNIST below)


def test_batch_size_does_not_change_scores(run, folder, tmp_path):
  args = score_files.check_args(run, f'folder:{folder[0]}', str(tmp_path / 'a.csv'),
                                skip_bad_files=True)
  assert (args.id_dataset, args.kind) == ('fashion_mnist', 'zero_shot')  # the defaults
  id_scores = np.load(os.path.join(run, 'eval', 'scores.npz'))['fashion_mnist|zero_shot|id']
  assert id_scores.size == 32  # config.eval.num_test: the 31st smallest keeps 31/32 >= 95%
  assert args.threshold == np.sort(id_scores)[30]
  a = score_files.score_folder(args, batch_size=4)   # 6 good files: the last batch padded
  b = score_files.score_folder(args, batch_size=16)
  assert len(a['scores']) == N_FILES - 1 and list(a['skipped']) == [os.path.join(folder[0], BAD)]
  np.testing.assert_allclose([a['scores'][f] for f in sorted(a['scores'])],
                             [b['scores'][f] for f in sorted(a['scores'])], rtol=1e-5, atol=1e-5)


def test_second_start_loads_the_compiled_scorer_and_scores_bit_identically(run, folder,
                                                                              tmp_path):
  """--mode=score through a fresh persistent compilation cache, again (a hit, no compile), and
  with the cache off: the same CSV byte for byte; off writes nothing."""
  cache, env = tmp_path / 'cache', dict(JAX_LOG_COMPILES='1')
  outs = []
  for name, setting in (('first', cache), ('second', cache), ('off', 'off')):
    outs.append(tmp_path / f'{name}.csv')
    proc = _main('--mode=score', f'--workdir={run}', f'--images=folder:{folder[1]}',
                 f'--out={outs[-1]}', f'--compilation_cache={setting}', env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hit = "Persistent compilation cache hit for 'jit_anomaly_fn'" in proc.stderr
    assert hit == (name == 'second'), name
    if name == 'first':
      entries = sorted(os.listdir(cache))
      assert any(e.startswith('jit_anomaly_fn') for e in entries), entries
  assert sorted(os.listdir(cache)) == entries
  assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()


def test_above_threshold_column():
  text = score_files.csv_text(['a', 'b', 'c', 'd'], {'a': 1.0, 'b': 2.0, 'd': 1.5},
                              {'c': 'OSError: broken'}, threshold=1.5)
  assert text.splitlines() == ['path,score,above_threshold,status', 'a,1,false,ok',
                               'b,2,true,ok', 'c,,,skipped: OSError: broken', 'd,1.5,false,ok']


def test_bad_flags_and_unevaluated_workdir(run, folder, tmp_path):
  images, out = f'folder:{folder[1]}', str(tmp_path / 's.csv')
  with pytest.raises(score_files.ScoreError, match='--images=folder:PATH'):
    score_files.check_args(run, None, out)
  with pytest.raises(score_files.ScoreError, match='folder:PATH'):
    score_files.check_args(run, folder[1], out)
  with pytest.raises(score_files.ScoreError, match='--out'):
    score_files.check_args(run, images, None)
  with pytest.raises(score_files.ScoreError, match='directory'):
    score_files.check_args(run, images, str(tmp_path))
  with pytest.raises(score_files.ScoreError, match='No images'):
    score_files.check_args(run, f'folder:{tmp_path}', out)
  with pytest.raises(score_files.ScoreError,
                     match=r'--kind=diffpath_1d .*has: --id_dataset=fashion_mnist '
                     r'--kind=stein_ssim, --id_dataset=fashion_mnist --kind=stein_ssim@published, '
                     r'--id_dataset=fashion_mnist --kind=zero_shot\)'):
    score_files.check_args(run, images, out, kind='diffpath_1d')
  trained_only = str(tmp_path / 'trained_only')
  shutil.copytree(run, trained_only, ignore=shutil.ignore_patterns('eval', '.lock'))
  with pytest.raises(score_files.ScoreError, match='--mode=evaluate'):
    score_files.check_args(trained_only, images, out)
  proc = _main('--mode=score', f'--workdir={run}', f'--images={images}')
  assert proc.returncode == 1 and 'needs --out' in proc.stderr
  proc = _main('--mode=evaluate', f'--workdir={run}', f'--images={images}')
  assert proc.returncode == 1 and '--images only apply to --mode=score' in proc.stderr
  assert not os.path.exists(out)


def test_stale_detector_is_refused_until_refit(run, folder, tmp_path):
  """Evaluate at step 4, train on to step 6: score mode and the API refuse the detector and
  threshold of step 4 (never mixing two networks) and name the refit commands; --refit refits."""
  from ddm_ood import api
  from ddm_ood import provenance
  from ddm_ood import train
  from ddm_ood import workdir as workdir_lib
  wd = str(tmp_path / 'run')
  shutil.copytree(run, wd, ignore=shutil.ignore_patterns(workdir_lib.LOCK_FILE))
  config = workdir_lib.load_config(wd)
  config.train.num_steps = 6           # what `--mode=train --config.train.num_steps=6` does
  train.train(config, wd)
  workdir_lib.save_config(config, wd)
  out = tmp_path / 'scores.csv'
  proc = _main('--mode=score', f'--workdir={wd}', f'--images=folder:{folder[1]}', f'--out={out}')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('ddm_ood: error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in ('checkpoint step 4', 'now holds step 6', f'--mode=evaluate --workdir={wd}',
                 '--refit'):
    assert needle in errors[0], errors[0]
  assert not out.exists()
  with pytest.raises(provenance.StaleDetectorError, match=r'step 4 .*step 6.*--mode=evaluate'):
    api.load_anomaly_scorer(wd)
  proc = _main('--mode=score', f'--workdir={wd}', f'--images=folder:{folder[1]}', f'--out={out}',
               '--refit')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Rerunning evaluate' in proc.stderr
  ood = api.load_anomaly_scorer(wd)
  assert ood.step == 6 and ood.provenance['checkpoint_step'] == 6
  got = {os.path.basename(r[0]): float(r[1]) for r in _read_csv(out)}
  want = ood(data.load_images(f'folder:{folder[1]}', 'test', ood.config.data))
  files = [os.path.basename(f) for f in data.folder_files(folder[1], 'test')]
  np.testing.assert_allclose([got[f] for f in files], want, rtol=1e-5, atol=1e-5)
