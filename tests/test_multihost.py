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
"""

import glob
import json
import os
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
              "--config.eval.ood_datasets=('noise_gaussian',)")
_TIMEOUT_S = 400


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, log_path, devices, *extra):
  cmd = [sys.executable, '-m', 'ddm_ood.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--mode=all', '--alsologtostderr', *_OVERRIDES, *extra]
  env = h.subprocess_env(f'{_DETERMINISTIC_XLA} --xla_force_host_platform_device_count={devices}')
  return subprocess.Popen(cmd, cwd=h.ROOT, env=env, stdout=open(log_path, 'w'),
                          stderr=subprocess.STDOUT)


def _wait_all(procs):
  """Waits for every (process, log); if one fails, kills the others (a lone peer would hang in
  its next collective) and reports the logs."""
  pending, deadline = list(procs), time.time() + _TIMEOUT_S
  try:
    while pending:
      assert time.time() < deadline, f'timed out after {_TIMEOUT_S} s: {[str(l) for _, l in pending]}'
      for proc, log in list(pending):
        try:
          rc = proc.wait(0.2)
        except subprocess.TimeoutExpired:
          continue
        pending.remove((proc, log))
        assert rc == 0, f'{log} exited with {rc}:\n{h.read(log)[-4000:]}'
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


def test_two_processes_match_one_process(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  coordinator = f'127.0.0.1:{_free_port()}'
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  procs = [(_start(multi, logs[i], 1, f'--coordinator_address={coordinator}',
                   '--num_processes=2', f'--process_id={i}'), logs[i]) for i in range(2)]
  procs.append((_start(single, tmp_path / 'single.log', 2), tmp_path / 'single.log'))
  _wait_all(procs)

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
  assert len(others) == 4, others  # detectors of stein_ssim, its @published variant, diffpath_6d
  for rel, path in {**feats_m, **others}.items():
    _assert_npz_equal(path, os.path.join(single, rel))
  with open(os.path.join(multi, 'eval', 'results.json')) as f:
    rows_m = json.load(f)['rows']
  with open(os.path.join(single, 'eval', 'results.json')) as f:
    rows_s = json.load(f)['rows']
  assert len(rows_m) == 3 and rows_m == rows_s
  # Process 0's results.csv, results.md and report.md tables hold those rows and the saved scores.
  results_check.check_run_outputs(multi)


def test_partial_distributed_flags_are_rejected():
  with pytest.raises(ValueError, match='needs all of --coordinator_address'):
    sharding.maybe_initialize_distributed('127.0.0.1:1234', None, 0)
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    sharding.maybe_initialize_distributed('127.0.0.1:1234', 2, 2)
  sharding.maybe_initialize_distributed('127.0.0.1:1234', 1, 0)  # one process: nothing to join
  assert jax.process_count() == 1 and sharding.all_processes(True) and not sharding.all_processes(0)
