"""Workdir I/O primitives (ddm_ood.workdir): purpose tags, atomic writes, config and metrics I/O."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ddm_ood import detector
from ddm_ood import workdir as workdir_lib


def test_purposes_are_distinct_and_give_distinct_keys():
  values = [int(p) for p in workdir_lib.Purpose]
  assert len(values) == len(set(values)) == len(workdir_lib.Purpose) >= 4
  keys = [jax.random.key_data(workdir_lib.purpose_key(0, p)) for p in workdir_lib.Purpose]
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == len(keys)
  # a purpose key is never the bare seed key (the bug of issue 10: a tag folded in twice)
  bare = tuple(np.asarray(jax.random.key_data(jax.random.key(0))).ravel())
  assert bare not in {tuple(np.asarray(k).ravel()) for k in keys}


def _no_temporaries(folder):
  return [f for f in os.listdir(folder) if '.tmp' in f]


def test_atomic_savez_keeps_the_old_file_when_serialising_fails(tmp_path):
  path = str(tmp_path / 'a.npz')
  workdir_lib.atomic_savez(path, x=np.arange(3))

  class Unsaveable:
    def __array__(self, *args, **kwargs):
      raise RuntimeError('cannot serialise')

  with pytest.raises(RuntimeError, match='cannot serialise'):
    workdir_lib.atomic_savez(path, x=np.arange(5), y=Unsaveable())
  with np.load(path) as f:
    np.testing.assert_array_equal(f['x'], [0, 1, 2])
    assert f.files == ['x']
  assert _no_temporaries(tmp_path) == []


def test_atomic_write_failing_mid_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / 'c.json')
  workdir_lib.atomic_write_json(path, {'v': 1})

  def failing_fsync(fd):
    raise OSError('disk full')

  # The new bytes are already in the temporary file when fsync fails: nothing may reach `path`.
  monkeypatch.setattr(os, 'fsync', failing_fsync)
  with pytest.raises(OSError, match='disk full'):
    workdir_lib.atomic_write_json(path, {'v': 2})
  monkeypatch.undo()
  assert json.load(open(path)) == {'v': 1}
  assert _no_temporaries(tmp_path) == []
  workdir_lib.atomic_write(path, b'{"v": 3}')
  assert json.load(open(path)) == {'v': 3}


def test_read_metrics_skips_a_torn_last_line(tmp_path):
  wd = str(tmp_path)
  assert workdir_lib.read_metrics(wd) == []
  with open(workdir_lib.metrics_path(wd), 'w') as f:
    f.write('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
  assert workdir_lib.read_metrics(wd) == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]


def test_config_round_trip_and_missing_config(tmp_path):
  wd = str(tmp_path / 'run')
  config = ml_collections.ConfigDict({'model': {'ch': 8, 'ch_mult': (1, 2)}, 'seed': 3})
  workdir_lib.save_config(config, wd)
  assert sorted(os.listdir(wd)) == [workdir_lib.CONFIG_FILE]
  back = workdir_lib.load_config(wd)
  assert back.model.ch == 8 and list(back.model.ch_mult) == [1, 2] and back.seed == 3
  with pytest.raises(FileNotFoundError, match='No config.json in .*ddm_ood.main'):
    workdir_lib.load_config(str(tmp_path))


def test_save_detector_is_atomic_and_round_trips(tmp_path):
  path = str(tmp_path / 'det.npz')
  rng = np.random.default_rng(0)
  fitted = detector.fit_detector(rng.normal(size=(40, 2)),
                                 ml_collections.ConfigDict({'n_components': (1, 2),
                                                           'covariance_types': ('diag',),
                                                           'cv_folds': 2}), seed=0)
  workdir_lib.save_detector(fitted, path)
  back = workdir_lib.load_detector(path)
  for a, b in zip(fitted.params, back.params):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert _no_temporaries(tmp_path) == []


def test_detector_provenance_round_trips_and_a_mismatch_names_the_refit(tmp_path):
  from ddm_ood import provenance
  from tests import train_helpers as h
  config = h.load_config('tiny')
  params = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  digest = provenance.params_digest(params)
  assert digest == provenance.params_digest({'w': np.arange(6, dtype=np.float32).reshape(2, 3)})
  assert digest != provenance.params_digest({'w': np.arange(6, dtype=np.float32).reshape(3, 2)})
  record = provenance.record(4, digest, config)
  fitted = detector.fit_detector(np.random.default_rng(0).normal(size=(40, 2)),
                                 ml_collections.ConfigDict({'n_components': (1,),
                                                            'covariance_types': ('diag',),
                                                            'cv_folds': 2}), seed=0)
  path = str(tmp_path / 'det.npz')
  workdir_lib.save_detector(fitted, path, provenance=record)
  saved = workdir_lib.load_detector(path).info['provenance']
  assert saved == record
  provenance.check(saved, record, 'The detector', 'W')   # the same network and settings
  config.scorer.batch_size = 3                            # how, not what, is computed
  provenance.check(saved, provenance.record(4, digest, config), 'The detector', 'W')
  later = provenance.record(6, provenance.params_digest({'w': np.ones((2, 3), np.float32)}),
                            config)
  with pytest.raises(provenance.StaleDetectorError,
                     match=r'checkpoint step 4 .*now holds step 6.*--mode=evaluate --workdir=W.*'
                     r'--refit'):
    provenance.check(saved, later, 'The detector', 'W')
  config.scorer.num_steps = 8
  with pytest.raises(provenance.StaleDetectorError, match=r'scorer.num_steps: 4 then, 8 now'):
    provenance.check(saved, provenance.record(4, digest, config), 'The detector', 'W')
  # A detector of an older version: only results.json's checkpoint step can be compared.
  provenance.check({'checkpoint_step': 4}, record, 'The detector', 'W')
  with pytest.raises(provenance.StaleDetectorError, match='step 4'):
    provenance.check({'checkpoint_step': 4}, later, 'The detector', 'W')
