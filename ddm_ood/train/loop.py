"""The training shell: resume, the step loop, checkpoints, SIGTERM, metrics and sample grids.

Metrics go through `metric_writer.MetricWriter` (TensorBoard event files in the workdir plus
the log; no TensorFlow) and progress (steps/s, ETA) through `metric_writer.ProgressReporter`;
``metrics.jsonl`` is kept for the report's loss plot and is truncated to the restored step on
resume.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddm_ood import checkpoint as ckpt_lib
from ddm_ood import metric_writer
from ddm_ood import sampling
from ddm_ood import schedule as schedule_lib
from ddm_ood import sharding
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib
from ddm_ood.train import step as step_lib
from ddm_ood.train import stream as stream_lib


# ------------------------------------------------------------------------------- metrics.jsonl
def append_metrics(workdir: str, record: dict) -> None:
  """Appends one JSON record to ``workdir/metrics.jsonl`` (a kill can only tear the last line)."""
  with open(workdir_lib.metrics_path(workdir), 'a') as f:
    f.write(json.dumps(record) + '\n')


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps the records of steps <= ``step`` of ``workdir/metrics.jsonl``, each once, in step order.

  On resume from checkpoint ``step`` the steps logged after it by the interrupted run are dropped
  (they are redone); a line torn by a kill is dropped too.
  """
  if not os.path.exists(workdir_lib.metrics_path(workdir)):
    return
  records = {r['step']: r for r in workdir_lib.read_metrics(workdir)
             if isinstance(r, dict) and isinstance(r.get('step'), int) and r['step'] <= step}
  workdir_lib.atomic_write(workdir_lib.metrics_path(workdir),
                           ''.join(json.dumps(records[k]) + '\n' for k in sorted(records)))


# ------------------------------------------------------------------------------------ helpers
class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN / inf; the message names the step and what to do."""


class _StopSignal:
  """SIGTERM (preemption) on any process -> every process saves after the same step and stops.

  One process: a handler that sets a flag. Several: JAX's preemption service
  (`multihost_utils.reached_preemption_sync_point`; it catches SIGTERM on every host and
  chooses one step all of them reach); where that service is disabled, each process's flag is
  combined with the others' every step.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._jax_sync = jax.process_count() > 1

  def __enter__(self):
    if not self._jax_sync:
      self._install_handler()
    return self

  def _install_handler(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def should_stop(self, step: int) -> bool:
    """Whether to save ``step`` and stop; every process calls it after every step."""
    if self._jax_sync:
      try:
        self.received = self.received or multihost_utils.reached_preemption_sync_point(step)
        return self.received
      except RuntimeError:  # jax_enable_preemption_service is off: combine the flags instead
        self._jax_sync = False
        self._install_handler()
    if jax.process_count() > 1:
      return not sharding.all_processes(not self.received)
    return self.received

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def write_samples(config: ml_collections.ConfigDict, model: unet.UNet, ema_params: Any,
                  mesh: jax.sharding.Mesh, step: int, workdir: str) -> str | None:
  """DDIM samples from the EMA params -> ``workdir/samples/samples_{step:08d}.png`` (process 0).

  Every process runs the (replicated) sampler; only process 0 writes. Returns the path.
  """
  tc = config.train
  if int(tc.num_samples) <= 0:
    return None
  sched = schedule_lib.schedule_for(config.diffusion)
  shape = (int(tc.num_samples), config.data.image_size, config.data.image_size,
           config.data.channels)
  rep = sharding.replicated_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=rep)
  def sample(params, key):
    return sampling.ddim_sample(lambda p, x, t: model.apply(p, x, t), params, sched, key, shape,
                                int(tc.sample_steps))

  images = sample(ema_params, workdir_lib.purpose_key(config.seed, workdir_lib.Purpose.SAMPLE))
  path = os.path.join(workdir, 'samples', f'samples_{int(step):08d}.png')
  if jax.process_index() == 0:
    sampling.save_image_grid(np.asarray(images.addressable_shards[0].data), path)
    logging.info('Wrote %d EMA samples (%d DDIM steps) to %s', shape[0], tc.sample_steps, path)
  return path


def _set_aside_newer_steps(manager, step: int, workdir: str) -> None:
  """Moves checkpoint steps newer than the restored ``step`` (unreadable ones, skipped by
  `checkpoint.restore_latest`) to ``workdir/checkpoints_unreadable`` so training can save over
  their step numbers; nothing is deleted."""
  newer = [s for s in manager.all_steps() if s > step]
  if not newer:
    return
  dest = os.path.join(workdir, 'checkpoints_unreadable')
  os.makedirs(dest, exist_ok=True)
  for s in newer:
    src = os.path.join(str(manager.directory), str(s))
    target = os.path.join(dest, f'{s}.{int(time.time())}')
    os.replace(src, target)
    logging.warning('Moved unreadable checkpoint %s to %s; training continues from step %d.',
                    src, target, step)
  manager.reload()


# ------------------------------------------------------------------------------------ train
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the base diffusion model in ``workdir``; returns the final metrics.

  Writes ``workdir/checkpoints`` (Orbax; every ``train.checkpoint_every`` steps, at the end and
  on SIGTERM), TensorBoard event files and ``workdir/metrics.jsonl`` (every ``train.log_every``
  steps) and EMA sample grids ``workdir/samples/samples_{step:08d}.png``. Rerunning the same
  command resumes from the newest checkpoint; a finished run only makes sure the final sample
  grid exists.

  Args:
    config: full config (see ddm_ood/default_config.py).
    workdir: run directory (created).

  Returns:
    dict with 'step' and the last logged 'loss', 'grad_norm', 'lr', 'steps_per_sec', plus
    'preempted' (True when stopped by SIGTERM before num_steps).

  Raises:
    TrainingDivergedError: the loss or gradient became NaN/inf (a `FloatingPointError`; the bad
      state is not saved, the newest checkpoint is marked in ``workdir/diverged.json``).
    checkpoint.CheckpointWriteError: a checkpoint did not fit on the disk or could not be written.
    SystemExit(0): after saving, when SIGTERM was received (preemption) by any process: all
      processes save the same step; rerun to resume.
    workdir.WorkdirError: a bad config (e.g. ``train.num_steps <= 0``), a network config that
      differs from the checkpoint's, or another process holding the workdir.
  """
  with workdir_lib.opened(config, workdir, 'train') as workdir:
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  tc = config.train
  num_steps = int(tc.num_steps)
  local_batch = stream_lib.check_batch_size(int(tc.batch_size))
  mesh = sharding.data_mesh()
  model = unet.build_model(config)
  sched = schedule_lib.schedule_for(config.diffusion)
  optimizer = step_lib.make_optimizer(tc)

  init_fn = functools.partial(step_lib.create_train_state, model, optimizer,
                              config.data.image_size, config.seed)
  rep = sharding.replicated_sharding(mesh)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                          jax.eval_shape(init_fn))
  manager = ckpt_lib.make_manager(workdir, int(tc.keep_checkpoints))
  try:
    restored = ckpt_lib.restore_latest(manager, abstract)
    if restored is not None:
      state, meta = restored
      logging.info('Resumed from checkpoint at step %d (data epoch %s, index %s) in %s',
                   int(state.step), meta.get('epoch'), meta.get('index'), manager.directory)
    else:
      state = jax.jit(init_fn, out_shardings=rep)()
    start = int(state.step)
    if is_main:
      _set_aside_newer_steps(manager, start, workdir)
      truncate_metrics(workdir, start)
    logging.info('UNet parameters: %s (%d devices, %d processes, global batch %d)',
                 f'{unet.param_count(state.params):,}', jax.device_count(), jax.process_count(),
                 tc.batch_size)

    if start >= num_steps:
      logging.info('Training already complete (step %d >= train.num_steps=%d).', start, num_steps)
      final = os.path.join(workdir, 'samples', f'samples_{start:08d}.png')
      if not os.path.exists(final):
        write_samples(config, model, state.ema_params, mesh, start, workdir)
      records = workdir_lib.read_metrics(workdir)
      last = dict(records[-1]) if records else {}
      last.pop('time', None)
      return {**last, 'step': start, 'preempted': False}

    stream = stream_lib.make_stream(config, local_batch)
    logging.info('Training on %d images of %r (%d steps per epoch) from step %d to %d.',
                 stream.images.shape[0], config.data.dataset, stream.steps_per_epoch, start,
                 num_steps)
    train_step = step_lib.make_train_step(model, sched, tc, mesh)
    writer = metric_writer.MetricWriter(workdir if is_main else None)
    report_progress = metric_writer.ProgressReporter(
        num_steps, writer, every_steps=int(tc.log_every)) if is_main else None
    try:
      return _loop(config, workdir, state, stream, train_step, manager, mesh, model, writer,
                   report_progress)
    finally:
      writer.close()
  finally:
    ckpt_lib.wait_until_finished(manager)
    manager.close()


def _loop(config, workdir, state, stream, train_step, manager, mesh, model, writer,
          report_progress) -> dict:
  """Steps from ``state.step`` to ``train.num_steps``; see `train`."""
  tc = config.train
  num_steps, start = int(tc.num_steps), int(state.step)

  def meta_for(step):
    epoch, index = stream.position(step)
    return {'step': int(step), 'epoch': int(epoch), 'index': int(index),
            'config': json.loads(config.to_json_best_effort())}

  def check_finite(step, metrics):
    """``step``: the 1-based number of the step that produced ``metrics`` (as metrics.jsonl)."""
    m = jax.device_get(metrics)
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      ckpt_lib.wait_until_finished(manager)
      newest = manager.latest_step()
      message = (
          f'Training diverged: non-finite loss at step {step} (loss={m["loss"]}, grad_norm='
          f'{m["grad_norm"]}). Nothing was saved after it; the newest checkpoint ({newest}) is '
          'intact and marked as the last finite one (diverged.json). Resume from it with a lower '
          'train.learning_rate (or longer train.warmup_steps / a smaller train.grad_clip), and '
          'check the data is finite and in [-1, 1].')
      workdir_lib.mark_diverged(workdir, step, newest, message)
      raise TrainingDivergedError(message)
    return m

  result = {}
  t_log, step_log = time.time(), start
  pending = None  # (step, metrics) of the previous step, checked one step late (no stall)
  preempted = False
  with _StopSignal() as stop_signal:
    step = start
    while step < num_steps:
      batch = sharding.global_batch_from_local(stream.batch(step), mesh)
      state, metrics = train_step(state, batch)
      if pending is not None:
        check_finite(*pending)
      step += 1
      pending = (step, metrics)
      if step == start + 1:  # steps/s excludes compilation
        jax.block_until_ready(metrics)
        t_log, step_log = time.time(), step
      if report_progress is not None:
        report_progress(step)
      log_now = step % int(tc.log_every) == 0 or step == num_steps
      stop = stop_signal.should_stop(step)
      save_now = step % int(tc.checkpoint_every) == 0 or step == num_steps or stop
      if log_now or save_now:
        m = check_finite(*pending)
        pending = None
      if log_now:
        now = time.time()
        sps = (step - step_log) / max(now - t_log, 1e-9) if step > step_log else None
        t_log, step_log = now, step
        scalars = {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                   'lr': float(m['lr'])}
        writer.write_scalars(step, scalars)
        result = {'step': step, **scalars, 'steps_per_sec': sps, 'time': now}
        if jax.process_index() == 0:
          append_metrics(workdir, result)
      if save_now:
        ckpt_lib.save(manager, step, state, meta_for(step))
      if stop and step < num_steps:
        preempted = True
        break
      if tc.sample_every and step % int(tc.sample_every) == 0 and step < num_steps:
        write_samples(config, model, state.ema_params, mesh, step, workdir)
  ckpt_lib.wait_until_finished(manager)
  writer.flush()
  workdir_lib.clear_diverged(workdir)   # a finite checkpoint past the divergence now exists
  if preempted:
    if manager.latest_step() != step:
      raise ckpt_lib.CheckpointWriteError(
          f'SIGTERM received, but the checkpoint of step {step} is not in {manager.directory} '
          f'after saving (newest: {manager.latest_step()}); rerun the same command to resume '
          'from the newest one.')
    logging.warning('SIGTERM received: saved checkpoint at step %d in %s%s; exiting. Rerun the '
                    'same command to resume.', step, manager.directory,
                    f' (every one of the {jax.process_count()} processes stopped after this step)'
                    if jax.process_count() > 1 else '')
    raise SystemExit(0)
  write_samples(config, model, state.ema_params, mesh, step, workdir)
  logging.info('Training finished at step %d.', step)
  result = dict(result)
  result.pop('time', None)
  return {**result, 'step': step, 'preempted': False}


__all__ = ['train', 'write_samples', 'append_metrics', 'truncate_metrics', 'TrainingDivergedError']
