"""Tests of ddm_ood.train / checkpoint / sampling: sharding, resume, TFDS, real data, NaN."""

import functools
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddm_ood import checkpoint
from ddm_ood import sampling
from ddm_ood import schedule as schedule_lib
from ddm_ood import train
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib
from tests import train_helpers as h

_SHARDED_SCRIPT = r'''
import json, jax, numpy as np
from tests import train_helpers as h
from ddm_ood import schedule, sharding, train, unet
assert jax.device_count() == 4, jax.devices()
config = h.load_config('tiny')
model = unet.build_model(config)
sched = schedule.make_schedule('cosine', config.diffusion.num_timesteps)
opt = train.make_optimizer(config.train)
batches = [np.random.default_rng(i).uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)
           for i in range(2)]
auto = (jax.sharding.AxisType.Auto,)
results = {}
for n in (1, 4):
  mesh = jax.make_mesh((n,), ('data',), devices=jax.devices()[:n], axis_types=auto)
  state = jax.jit(lambda: train.create_train_state(model, opt, 16, 0),
                  out_shardings=sharding.replicated_sharding(mesh))()
  step = train.make_train_step(model, sched, config.train, mesh)
  for b in batches:
    batch = jax.device_put(b, sharding.batch_sharding(mesh))
    state, metrics = step(state, batch)
  assert len(batch.sharding.device_set) == n
  results[n] = (jax.device_get(state), jax.device_get(metrics))
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
    jax.tree.leaves(results[1][0]), jax.tree.leaves(results[4][0])))
try:
  train.check_batch_size(6)
  bad_batch = 'no error'
except ValueError as e:
  bad_batch = str(e)
print('RESULT ' + json.dumps({'max_abs_diff': diff, 'loss1': float(results[1][1]['loss']),
                             'loss4': float(results[4][1]['loss']), 'bad_batch': bad_batch}))
'''


def test_sharded_step_matches_single_device():
  """Two train steps (dropout on) on a 4-device mesh == on 1 device, to atol 1e-5."""
  out = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], cwd=h.ROOT, capture_output=True,
                       text=True, timeout=300,
                       env=h.subprocess_env('--xla_force_host_platform_device_count=4'))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split('RESULT ')[-1])
  assert result['max_abs_diff'] < 1e-5, result
  assert abs(result['loss1'] - result['loss4']) < 1e-5, result
  assert 'divisible by the number of devices (4)' in result['bad_batch']


def _abstract_state(config):
  model = unet.build_model(config)
  opt = train.make_optimizer(config.train)
  return jax.eval_shape(lambda: train.create_train_state(model, opt, config.data.image_size,
                                                         config.seed))


def _restore_state(workdir, config):
  manager = checkpoint.make_manager(workdir, read_only=True)
  try:
    state, meta = checkpoint.restore_latest(manager, _abstract_state(config))
  finally:
    manager.close()
  return jax.device_get(state), meta


def test_sigkill_and_sigterm_resume_matches_uninterrupted(tmp_path):
  """SIGKILL after checkpoint 2, rerun, SIGTERM mid-run, rerun: same state as one go."""
  steps = ['--config.train.num_steps=8', '--config.train.checkpoint_every=2']
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  start = functools.partial(h.start_main, cache_dir=tmp_path / 'jax_cache')
  slow = functools.partial(start, sleep_per_step=0.5)
  baseline = start(straight, tmp_path / 'straight.log', *steps)

  run1 = slow(interrupted, tmp_path / 'run1.log', *steps)
  h.wait_for(lambda: h.finished_steps(interrupted), run1, 240, 'checkpoint 2')
  run1.send_signal(signal.SIGKILL)
  run1.wait(30)
  killed_at = h.finished_steps(interrupted)[-1]
  assert killed_at in (2, 4), h.finished_steps(interrupted)

  log2 = tmp_path / 'run2.log'
  run2 = slow(interrupted, log2, *steps)
  # run1 may have logged steps past its last checkpoint before the kill: wait until run2 has
  # truncated metrics.jsonl to its checkpoint ('Training on' follows) and logged a step itself.
  h.wait_for(lambda: 'Training on' in h.read(log2) and killed_at + 1 in [
      r['step'] for r in workdir_lib.read_metrics(interrupted)], run2, 240,
             f'step {killed_at + 1} of the resumed run')
  run2.send_signal(signal.SIGTERM)
  assert run2.wait(120) == 0, h.read(log2)[-3000:]
  text = h.read(log2)
  assert f'Resumed from checkpoint at step {killed_at}' in text
  match = re.search(r'SIGTERM received: saved checkpoint at step (\d+)', text)
  assert match, text[-3000:]
  term_step = int(match.group(1))
  assert killed_at < term_step < 8 and h.finished_steps(interrupted)[-1] == term_step

  run3 = start(interrupted, tmp_path / 'run3.log', *steps)
  assert run3.wait(240) == 0, h.read(tmp_path / 'run3.log')[-3000:]
  assert baseline.wait(240) == 0, h.read(tmp_path / 'straight.log')[-3000:]

  config = h.load_config('tiny')
  a, meta_a = _restore_state(straight, config)
  b, meta_b = _restore_state(interrupted, config)
  assert int(a.step) == int(b.step) == 8
  assert (meta_a['epoch'], meta_a['index']) == (meta_b['epoch'], meta_b['index']) == (1, 0)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert os.path.exists(os.path.join(interrupted, 'samples', 'samples_00000008.png'))
  # The logged steps of the interrupted run cover 1..8, each logged loss equal to the baseline's.
  def losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return {r['step']: r['loss'] for r in map(json.loads, f)}
  la, lb = losses(straight), losses(interrupted)
  assert sorted(la) == sorted(lb) == list(range(1, 9))
  np.testing.assert_allclose([la[s] for s in range(1, 9)], [lb[s] for s in range(1, 9)],
                             atol=1e-6)


def test_sigkill_while_writing_a_checkpoint_resumes_bit_identical(tmp_path):
  """SIGKILL while Orbax writes checkpoint 4 (async save started), rerun: equal to one go."""
  steps = ['--config.train.num_steps=6', '--config.train.checkpoint_every=2',
           '--config.train.num_samples=0']
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  start = functools.partial(h.start_main, cache_dir=tmp_path / 'jax_cache')
  run1 = start(killed, tmp_path / 'run1.log', *steps, sigkill_in_save_step=4)
  assert run1.wait(240) == -signal.SIGKILL, h.read(tmp_path / 'run1.log')[-3000:]
  assert h.finished_steps(killed) == [2], os.listdir(os.path.join(killed, 'checkpoints'))
  baseline = start(straight, tmp_path / 'straight.log', *steps)
  run2 = start(killed, tmp_path / 'run2.log', *steps)
  assert run2.wait(240) == 0, h.read(tmp_path / 'run2.log')[-3000:]
  assert 'Resumed from checkpoint at step 2' in h.read(tmp_path / 'run2.log')
  assert baseline.wait(240) == 0, h.read(tmp_path / 'straight.log')[-3000:]
  config = h.load_config('tiny')
  a, _ = _restore_state(straight, config)
  b, _ = _restore_state(killed, config)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with open(os.path.join(killed, 'metrics.jsonl')) as f:
    assert [json.loads(l)['step'] for l in f] == list(range(1, 7))


def test_tfds_celeba_config_mock_data(tmp_path):
  """configs/celeba.py with tiny overrides trains 2 steps on tfds.testing.mock_data."""
  tfds = pytest.importorskip('tensorflow_datasets')
  config = h.load_config('celeba')
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 8, (1, 2), 1
  config.model.attn_resolutions, config.model.num_heads, config.model.num_groups = (16,), 2, 4
  config.diffusion.num_timesteps = 20
  config.data.max_train_examples = 16
  tc = config.train
  tc.batch_size, tc.num_steps, tc.warmup_steps = 4, 2, 1
  tc.log_every, tc.checkpoint_every, tc.num_samples, tc.sample_steps = 1, 2, 2, 2
  with tfds.testing.mock_data(num_examples=16):
    result = train.train(config, str(tmp_path))
  logged = workdir_lib.read_metrics(str(tmp_path))
  assert [r['step'] for r in logged] == [1, 2]
  assert result['step'] == 2 and result['loss'] == logged[-1]['loss']
  assert checkpoint.latest_step(str(tmp_path)) == 2
  # The final sample grid: 2 RGB samples of 32 x 32 side by side, 2-pixel padding.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = Image.open(tmp_path / 'samples' / 'samples_00000002.png')
  assert grid.mode == 'RGB' and grid.size == (2 * 34 + 2, 34 + 2)


def test_fashion_mnist_loss_decreases(tmp_path):
  """20 steps on the installed Fashion-MNIST lower the eps-MSE (starts at ~1: zero output)."""
  config = h.load_config('tiny')
  config.data.max_train_examples = 2000
  tc = config.train
  tc.batch_size, tc.num_steps, tc.learning_rate, tc.warmup_steps = 16, 20, 2e-3, 2
  tc.log_every, tc.checkpoint_every, tc.num_samples = 1, 20, 4
  config.model.dropout = 0.0
  result = train.train(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == list(range(1, 21))
  losses = np.array([r['loss'] for r in records])
  first, last = losses[:4].mean(), losses[-5:].mean()
  assert last < 0.8 * first, losses
  assert result['step'] == 20 and set(records[-1]) >= {'loss', 'grad_norm', 'lr',
                                                       'steps_per_sec', 'time'}
  ema, step = checkpoint.restore_ema_params(str(tmp_path), config)
  assert step == 20 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))
  # The same losses as TensorBoard scalars in the workdir (metric_writer), plus steps/s.
  tb_loss = _tensorboard_scalars(str(tmp_path), 'loss')
  assert sorted(tb_loss) == list(range(1, 21))
  np.testing.assert_allclose([tb_loss[s] for s in range(1, 21)], losses, rtol=1e-6)
  assert set(_tensorboard_scalars(str(tmp_path), 'steps_per_sec')) == set(range(2, 21))


def _tensorboard_scalars(workdir, tag):
  """{step: value} of scalar ``tag`` in the TensorBoard event files directly in ``workdir``."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  assert [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents.')], os.listdir(workdir)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def test_nonfinite_loss_raises_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = h.load_config('tiny')
  config.train.num_steps, config.train.checkpoint_every = 6, 2
  h.nan_at_step(monkeypatch, 3)   # the 4th step: metrics.jsonl counts steps from 1
  with pytest.raises(train.TrainingDivergedError, match=r'step 4 .*learning_rate'):
    train.train(config, str(tmp_path))
  assert checkpoint.latest_step(str(tmp_path)) == 2
  assert [r['step'] for r in workdir_lib.read_metrics(str(tmp_path))] == [1, 2, 3]
  marked = workdir_lib.read_diverged(str(tmp_path))
  assert (marked['step'], marked['checkpoint_step']) == (4, 2)
  assert 'diverged at step 4' in workdir_lib.training_note(str(tmp_path), 2)
  ema, step = checkpoint.restore_ema_params(str(tmp_path), config)
  assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))


def test_restore_ema_params_without_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointNotFoundError, match='train first with --mode=train'):
    checkpoint.restore_ema_params(str(tmp_path), h.load_config('tiny'))
  assert checkpoint.latest_step(str(tmp_path)) is None


def test_batch_stream_is_a_function_of_the_step():
  images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
  a, b = train.BatchStream(images, 3, seed=1), train.BatchStream(images, 3, seed=1)
  assert a.steps_per_epoch == 3 and a.position(7) == (2, 1)
  seq = [a.batch(s) for s in range(7)]
  np.testing.assert_array_equal(b.batch(5), seq[5])   # random access == sequential
  np.testing.assert_array_equal(b.batch(0), seq[0])
  rows = np.concatenate([x[:, 0, 0, 0] for x in seq[:3]])
  assert len(set(rows.tolist())) == 9                  # no repeats within an epoch
  assert seq[0].dtype == np.float32 and seq[0].min() >= -1 and seq[0].max() <= 1
  # Step 0 = the first rows of default_rng((seed, epoch 0, 0)) (the documented stream).
  first = np.sort(np.random.default_rng((1, 0, 0)).permutation(10)[:3])
  np.testing.assert_array_equal(seq[0][:, 0, 0, 0], (first * 4).astype(np.float32) / 127.5 - 1.0)


def test_batch_stream_hosts_partition_the_global_batch():
  images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
  one = train.BatchStream(images, 6, seed=3)
  hosts = [train.BatchStream(images, 2, seed=3, process_index=p, process_count=3)
           for p in range(3)]
  assert one.steps_per_epoch == hosts[0].steps_per_epoch == 6
  for step in (0, 1, 5, 6, 13):   # across epochs
    parts = [h.batch(step)[:, 0, 0, 0] for h in hosts]
    merged = np.concatenate(parts)
    assert len(set(merged.tolist())) == 6                        # disjoint host slices
    # Row for row (not just the same set): rows pair with per-row noise in the train step.
    np.testing.assert_array_equal(merged, one.batch(step)[:, 0, 0, 0])
  # TFDS shards: each host permutes its own shard with its own stream.
  shard = train.BatchStream(images[:20], 2, seed=3, process_index=1, process_count=3,
                            sharded=True)
  assert shard.steps_per_epoch == 10
  rows = np.sort(np.random.default_rng((3, 0, 1)).permutation(20)[:2])
  np.testing.assert_array_equal(shard.batch(0)[:, 0, 0, 0], rows.astype(np.float32) / 127.5 - 1.0)
  with pytest.raises(ValueError, match='process_index'):
    train.BatchStream(images, 2, seed=0, process_index=3, process_count=3)
  with pytest.raises(ValueError, match='lower train.batch_size'):
    train.BatchStream(images, 16, seed=0, process_index=0, process_count=3)


def test_ddim_sample_shape_range_and_grid(tmp_path):
  sched = schedule_lib.make_schedule('cosine', 50)
  apply_fn = lambda p, x, t: p * x   # toy "network"
  out = jax.jit(lambda k: sampling.ddim_sample(apply_fn, 0.5, sched, k, (3, 4, 4, 1), 5))(
      jax.random.key(0))
  assert out.shape == (3, 4, 4, 1) and float(abs(out).max()) <= 1.0
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 5), [0, 250, 500, 749, 999])
  path = sampling.save_image_grid(np.asarray(out), str(tmp_path / 'g.png'))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(path).size == (2 * 6 + 2, 2 * 6 + 2)
