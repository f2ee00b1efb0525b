"""Multi-host, for real: two JAX processes on localhost against one process, via `ddm_ood.main`.

The two processes (one CPU device each, JAX's default CPU collectives: gloo) are joined through
main's --coordinator_address / --num_processes / --process_id. They train configs/tiny.py (Orbax
multi-process checkpoints, per-host batch slices, `make_array_from_process_local_data`) and run
the evaluation (per-host feature batches, `process_allgather`). A single process with two CPU
devices runs the same command. The two runs must agree bitwise: the same mesh shape and per-device
programs, and an all-reduce of two partial sums is order-free.

`--xla_cpu_multi_thread_eigen=false` in both: Eigen's multi-threaded contractions split their sums
by the threads a process has, so e.g. the DDIM-scan features differed by ~1e-5 relative between a
1-process and a 2-process run with it on, and agree bitwise with it off (measured).

Failing together (issue 21): SIGTERM to one process makes both save the same step and exit (and
the resumed job ends bit-identical to the uninterrupted one); a bad flag on one process stops
both with its message; a process whose peers never join stops after --distributed_timeout_s.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddm_ood import checkpoint
from ddm_ood import sharding
from ddm_ood import train
from ddm_ood import unet
from tests import results_check
import train_helpers as h

_DETERMINISTIC_XLA = '--xla_cpu_multi_thread_eigen=false'
_OVERRIDES = ('--config.train.num_steps=4', '--config.train.checkpoint_every=2',
              "--config.eval.feature_kinds=('stein_ssim','diffpath_6d')",  # forward + DDIM scan
              "--config.eval.ood_datasets=('noise_gaussian',)",
              '--config.eval.near_ood_pairs=()')
_TIMEOUT_S = 400


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, log_path, devices, *extra, mode='all', sleep_per_step=0.0, cache_dir=None):
  entry = ['-m', 'ddm_ood.main']
  if sleep_per_step:   # tests/train_main.py: the same main, each train step followed by a sleep
    entry = [os.path.join(h.ROOT, 'tests', 'train_main.py'),
             f'--test_sleep_per_step={sleep_per_step}']
  cmd = [sys.executable, *entry, '--config=configs/tiny.py', f'--workdir={workdir}',
         f'--mode={mode}', '--alsologtostderr', *_OVERRIDES, *extra]
  env = h.subprocess_env(f'{_DETERMINISTIC_XLA} --xla_force_host_platform_device_count={devices}',
                         cache_dir=cache_dir)
  return subprocess.Popen(cmd, cwd=h.ROOT, env=env, stdout=open(log_path, 'w'),
                          stderr=subprocess.STDOUT)


def _start_two(workdir, logs, *extra, **kwargs):
  """Processes 0 and 1 of one job (one CPU device each), joined through a free local port."""
  coordinator = f'127.0.0.1:{_free_port()}'
  return [(_start(workdir, logs[i], 1, f'--coordinator_address={coordinator}',
                  '--num_processes=2', f'--process_id={i}', *extra, **kwargs), logs[i])
          for i in range(2)]


def _wait_all(procs, seconds=_TIMEOUT_S, expect_rc=0):
  """Waits for every (process, log); returns their exit codes. A process that exits with another
  code than ``expect_rc`` (None: any) fails the test at once, and so does running past
  ``seconds``; the others are then killed (a lone peer would hang in its next collective)."""
  pending, deadline = list(procs), time.time() + seconds
  try:
    while pending:
      assert time.time() < deadline, f'still running after {seconds} s: ' + '\n'.join(
          f'{l}:\n{h.read(l)[-2000:]}' for _, l in pending)
      for proc, log in list(pending):
        try:
          rc = proc.wait(0.2)
        except subprocess.TimeoutExpired:
          continue
        pending.remove((proc, log))
        assert expect_rc in (None, rc), f'{log} exited with {rc}:\n{h.read(log)[-4000:]}'
    return [proc.returncode for proc, _ in procs]
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _restore_full_state(workdir, config):
  model = unet.build_model(config)
  opt = train.make_optimizer(config.train)
  abstract = jax.eval_shape(lambda: train.create_train_state(model, opt, config.data.image_size,
                                                             config.seed))
  manager = checkpoint.make_manager(workdir, read_only=True)
  try:
    state, meta = checkpoint.restore_latest(manager, abstract)
  finally:
    manager.close()
  return jax.device_get(state), meta


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _npz_files(workdir, pattern):
  return {os.path.relpath(p, workdir): p for p in glob.glob(os.path.join(workdir, pattern))}


def _assert_npz_equal(a_path, b_path):
  with np.load(a_path) as a, np.load(b_path) as b:
    assert sorted(a.files) == sorted(b.files), (a_path, a.files, b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{a_path}: {k}')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """configs/tiny.py --mode=all (4 steps) by two processes and by one process with two devices."""
  tmp_path = tmp_path_factory.mktemp('runs')
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  procs = _start_two(multi, logs)
  procs.append((_start(single, tmp_path / 'single.log', 2), tmp_path / 'single.log'))
  _wait_all(procs)
  return tmp_path


def test_two_processes_match_one_process(runs):
  tmp_path = runs
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  logs = [tmp_path / f'process{i}.log' for i in range(2)]

  assert '(2 devices, 2 processes, global batch 8)' in h.read(logs[0])
  assert '(2 devices, 1 processes, global batch 8)' in h.read(tmp_path / 'single.log')
  # Training: one metrics writer (process 0), the same loss at every step, the same checkpoints
  # (Orbax multi-process saves) and the same full state (params, EMA, optimizer) bit for bit.
  m_multi, m_single = _metrics(multi), _metrics(single)
  assert [r['step'] for r in m_multi] == [r['step'] for r in m_single] == [1, 2, 3, 4]
  assert [r['loss'] for r in m_multi] == [r['loss'] for r in m_single]
  assert h.finished_steps(multi) == h.finished_steps(single) == [2, 4]
  config = h.load_config('tiny')
  state_m, meta_m = _restore_full_state(multi, config)
  state_s, meta_s = _restore_full_state(single, config)
  assert int(state_m.step) == 4 and meta_m['step'] == meta_s['step'] == 4
  leaves_m, leaves_s = jax.tree.leaves(state_m), jax.tree.leaves(state_s)
  assert len(leaves_m) == len(leaves_s) > 10
  for a, b in zip(leaves_m, leaves_s):
    np.testing.assert_array_equal(a, b)
  assert os.path.exists(os.path.join(multi, 'samples', 'samples_00000004.png'))

  # Evaluation: every cached feature file (ID train, ID test, OOD test; both kinds, all
  # statistics), the detectors and the scores are identical; so are the result rows.
  feats_m = _npz_files(multi, 'features/step_00000004/*.npz')
  feats_s = _npz_files(single, 'features/step_00000004/*.npz')
  # ID train, ID test, OOD test and the ID-train synthetic anomalies of the zero-shot selection.
  assert sorted(feats_m) == sorted(feats_s) and len(feats_m) == 4, (feats_m, feats_s)
  assert any('__synthetic' in name for name in feats_m), feats_m
  others = _npz_files(multi, 'eval/detectors/*.npz') | _npz_files(multi, 'eval/scores.npz')
  # Detectors of stein_ssim, its @published variant, diffpath_6d and zero_shot; the scores.
  assert len(others) == 5, others
  for rel, path in {**feats_m, **others}.items():
    _assert_npz_equal(path, os.path.join(single, rel))
  with open(os.path.join(multi, 'eval', 'results.json')) as f:
    rows_m = json.load(f)['rows']
  with open(os.path.join(single, 'eval', 'results.json')) as f:
    rows_s = json.load(f)['rows']
  assert len(rows_m) == 4 and rows_m == rows_s
  # Process 0's results.csv, results.md and report.md tables hold those rows and the saved scores.
  results_check.check_run_outputs(multi)


def test_partial_distributed_flags_are_rejected():
  with pytest.raises(ValueError, match='needs all of --coordinator_address'):
    sharding.maybe_initialize_distributed('127.0.0.1:1234', None, 0)
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    sharding.maybe_initialize_distributed('127.0.0.1:1234', 2, 2)
  sharding.maybe_initialize_distributed('127.0.0.1:1234', 1, 0)  # one process: nothing to join
  assert jax.process_count() == 1 and sharding.all_processes(True) and not sharding.all_processes(0)


# ---------------------------------------------------------- several hosts fail together (issue 21)
def test_sigterm_on_one_process_stops_both_at_one_step_and_resumes_bit_identical(runs, tmp_path):
  """SIGTERM to process 0 mid-way: both processes save the same step (JAX's preemption sync
  point) and exit 0 within 60 s; the same two-process command then resumes and ends
  bit-identical to the uninterrupted two-process run of `runs`."""
  wd = str(tmp_path / 'preempted')
  logs = [tmp_path / f'term{i}.log' for i in range(2)]
  cache = tmp_path / 'jax_cache'   # the resumed run reuses the compiled programs
  procs = _start_two(wd, logs, mode='train', sleep_per_step=1.0, cache_dir=cache)
  h.wait_for(lambda: any(r['step'] >= 1 for r in _metrics_or_none(wd)), procs[0][0], 300,
             'step 1 of the two-process run')
  procs[0][0].send_signal(signal.SIGTERM)
  assert _wait_all(procs, 60) == [0, 0]
  saved = []
  for log in logs:
    match = re.search(r'SIGTERM received: saved checkpoint at step (\d+) .*every one of the 2 '
                      r'processes stopped', h.read(log))
    assert match, h.read(log)[-3000:]
    saved.append(int(match.group(1)))
  assert saved[0] == saved[1] == h.finished_steps(wd)[-1] and 1 <= saved[0] < 4, saved

  resumed = [tmp_path / f'resumed{i}.log' for i in range(2)]
  _wait_all(_start_two(wd, resumed, mode='train', cache_dir=cache))
  assert f'Resumed from checkpoint at step {saved[0]}' in h.read(resumed[0])
  config = h.load_config('tiny')
  state, meta = _restore_full_state(wd, config)
  want, want_meta = _restore_full_state(str(runs / 'multi'), config)
  assert int(state.step) == 4 and meta['step'] == want_meta['step'] == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert [(r['step'], r['loss']) for r in _metrics(wd)] == [
      (r['step'], r['loss']) for r in _metrics(str(runs / 'multi'))]


def _metrics_or_none(workdir):
  try:
    return _metrics(workdir)
  except (OSError, ValueError):  # not written yet, or a line being written
    return []


@pytest.mark.parametrize('bad_flag, needle', [
    ('--config.train.num_stepz=5', "no field 'num_stepz'; did you mean 'num_steps'"),
    ("--config.eval.ood_datasets=('folder:/nonexistent_dir',)", '/nonexistent_dir'),
], ids=['typo_at_flag_parsing', 'missing_folder_at_validation'])
def test_a_bad_flag_on_one_process_stops_both_with_its_message(tmp_path, bad_flag, needle):
  """Process 1 fails its checks (at flag parsing, or validating the config): it still joins the
  job, and both processes stop within 60 s with the same one-line error; nothing is written."""
  wd = str(tmp_path / 'never')
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [(_start(wd, logs[i], 1, f'--coordinator_address={coordinator}', '--num_processes=2',
                   f'--process_id={i}', *([bad_flag] if i == 1 else [])), logs[i])
           for i in range(2)]
  assert _wait_all(procs, 60, expect_rc=1) == [1, 1]
  for log in logs:
    text = h.read(log)
    errors = [l for l in text.splitlines() if l.startswith('ddm_ood: error:')]
    assert len(errors) == 1 and 'process 1: ' in errors[0] and needle in errors[0], text[-3000:]
    assert 'Traceback' not in text
  assert not os.path.exists(wd)


def test_a_process_alone_stops_after_the_join_timeout_naming_the_flags(tmp_path):
  log = tmp_path / 'alone.log'
  t0 = time.time()
  proc = _start(str(tmp_path / 'never'), log, 1, f'--coordinator_address=127.0.0.1:{_free_port()}',
                '--num_processes=2', '--process_id=1', '--distributed_timeout_s=3', mode='train')
  assert _wait_all([(proc, log)], 60, expect_rc=1) == [1]
  errors = [l for l in h.read(log).splitlines() if l.startswith('ddm_ood: error:')]
  assert len(errors) == 1, h.read(log)[-3000:]
  for flag in ('--coordinator_address=127.0.0.1:', '--num_processes', '--process_id',
               '--distributed_timeout_s'):
    assert flag in errors[0], errors[0]
  assert time.time() - t0 < 60
