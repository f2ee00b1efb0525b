"""Training of the base diffusion model: eps-prediction MSE, AdamW, EMA, data parallel.

Pure core: `TrainState`, `make_optimizer`, `loss_fn`, `make_train_step` (one `jax.jit` step; the
batch is sharded over the ('data',) mesh, the state replicated, the compiler inserts the gradient
all-reduce). Impure shell: `train_and_evaluate` (data, checkpoints, logging, samples, signals).

Randomness is stateless: step ``s`` uses ``fold_in(base_key, s)`` split into (t, noise, dropout)
keys, and the batch of step ``s`` is rows ``[i*B, (i+1)*B)`` of the permutation
``default_rng((seed, epoch, 0))`` with ``epoch, i = divmod(s, steps_per_epoch)`` (`BatchStream`;
hosts partition each global batch). Results therefore do not depend on device count, each global
batch is the same array for any host count (TFDS shards per host excepted), and a resumed run
continues the exact stream.

Debug knobs (``config.train``, absent = off): ``debug_sleep_per_step`` (seconds slept after each
step, lets tests interrupt a run mid-way), ``debug_nan_step`` (>= 0: the loss of that step is
made NaN, to exercise the non-finite-loss path) and ``debug_sigkill_in_save_step`` (>= 0: the
process SIGKILLs itself right after starting the asynchronous save of that step's checkpoint).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddm_ood import checkpoint as ckpt_lib
from ddm_ood import data as data_lib
from ddm_ood import sampling
from ddm_ood import schedule as schedule_lib
from ddm_ood import sharding
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib

# Purpose tags folded into jax.random.key(config.seed) (see docs/design.md, "Randomness").
TAG_INIT = 1
TAG_TRAIN = 2
TAG_SAMPLE = 3


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree of arrays).

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: flax variables ``{'params': ...}`` of the UNet.
    ema_params: exponential moving average of ``params`` (used for sampling and scoring).
    opt_state: optax state.
    key: uint32 ``jax.random.key_data`` of the base training key (constant; folded with step).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array


def make_lr_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` then constant, or cosine decay to 0.

  ``train_cfg.lr_schedule`` = 'constant' (default, as in improved-diffusion / DiffPath) or
  'cosine' (decays over ``num_steps``).
  """
  kind = train_cfg.get('lr_schedule', 'constant')
  lr, warmup = float(train_cfg.learning_rate), max(int(train_cfg.warmup_steps), 1)
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(int(train_cfg.num_steps), warmup + 1), end_value=0.0)
  if kind == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"Unknown train.lr_schedule {kind!r}; choose 'constant' or 'cosine'.")


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) followed by AdamW on `make_lr_schedule`."""
  parts = []
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
  parts.append(optax.adamw(make_lr_schedule(train_cfg),
                           weight_decay=float(train_cfg.weight_decay)))
  return optax.chain(*parts)


def create_train_state(model: unet.UNet, optimizer: optax.GradientTransformation,
                       image_size: int, seed: int) -> TrainState:
  """Initial state: UNet parameters from ``fold_in(key(seed), TAG_INIT)``, EMA = params."""
  base = jax.random.key(seed)
  params = unet.init_params(model, jax.random.fold_in(base, TAG_INIT), image_size)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
      key=jax.random.key_data(jax.random.fold_in(base, TAG_TRAIN)))


def loss_fn(params: Any, apply_fn: Callable, schedule: schedule_lib.Schedule, x0: jax.Array,
            key: jax.Array) -> jax.Array:
  """eps-prediction MSE at t ~ U{0, ..., T-1}.

  Args:
    params: UNet variables.
    apply_fn: ``apply_fn(params, x_t, t, rng) -> eps`` in train mode (dropout from ``rng``).
    schedule: diffusion schedule.
    x0: clean images [B, H, W, C] in [-1, 1].
    key: a `jax.random.key`; split into timestep, noise and dropout keys.

  Returns:
    Scalar float32 loss, mean over batch, pixels and channels.
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_timesteps, jnp.int32)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = schedule_lib.q_sample(schedule, x0, t, noise)
  eps = apply_fn(params, x_t, t, k_drop)
  return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))


def make_train_step(model: unet.UNet, schedule: schedule_lib.Schedule,
                    train_cfg: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Builds the jitted ``train_step(state, batch) -> (state, metrics)``.

  Args:
    model: the UNet.
    schedule: diffusion schedule.
    train_cfg: ``config.train`` (optimizer, EMA decay, debug knobs).
    mesh: if given, the state is pinned replicated and the batch [B, H, W, C] sharded over
      'data' on this mesh; otherwise shardings follow the inputs.

  Returns:
    A jitted function; ``state`` is donated. ``metrics`` = {loss, grad_norm, lr} float32
    scalars. The EMA decay is ``min(ema_decay, (1 + step) / (10 + step))`` so that short runs
    are not dominated by the initial parameters.
  """
  optimizer = make_optimizer(train_cfg)
  lr_schedule = make_lr_schedule(train_cfg)
  ema_decay = float(train_cfg.ema_decay)
  nan_step = int(train_cfg.get('debug_nan_step', -1))

  def apply_train(params, x_t, t, rng):
    return model.apply(params, x_t, t, train=True, rngs={'dropout': rng})

  def train_step(state: TrainState, batch: jax.Array):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, apply_train, schedule, batch, key)
    if nan_step >= 0:
      loss = jnp.where(state.step == nan_step, jnp.nan, loss)
      grads = jax.tree.map(lambda g: jnp.where(state.step == nan_step, jnp.nan, g), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_f = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': jnp.asarray(lr_schedule(state.step), jnp.float32)}
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  rep, data = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=(0,))


# ------------------------------------------------------------------------------------ data order
class BatchStream:
  """Deterministic batches: the rows of global step ``s`` are a function of ``s`` alone.

  Two layouts of the training set over ``process_count`` hosts:

  * ``sharded=False`` (in-memory sources; every host holds the full set): one permutation
    ``np.random.default_rng((seed, epoch, 0))`` per epoch, shared by all hosts; the global batch of
    step ``s`` is its rows ``[i G, (i + 1) G)`` (``G = process_count * local_batch_size``) and host
    ``p`` reads the ``p``-th ``local_batch_size`` of its sorted rows. The hosts partition each
    global batch, which is the same array, row for row, for any number of hosts (so training
    is too: each row's noise comes from its global position).
  * ``sharded=True`` (TFDS with ``split_for_jax_process``; each host holds its own shard): each host
    permutes its shard with ``default_rng((seed, epoch, process_index))``.

  The incomplete tail batch of an epoch is skipped. Images are held as uint8.
  """

  def __init__(self, images: np.ndarray, local_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, sharded: bool = False):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
    self.images = images
    self.local_batch_size = int(local_batch_size)
    self.seed, self.process_index = int(seed), int(process_index)
    self.process_count, self.sharded = int(process_count), bool(sharded)
    # Rows one permutation serves per step: this host's only (sharded) or the global batch.
    self._rows_per_step = self.local_batch_size * (1 if sharded else self.process_count)
    if images.shape[0] < self._rows_per_step:
      where = 'on this host' if sharded or process_count == 1 else 'in the training set'
      raise ValueError(f'Only {images.shape[0]} training images {where}, fewer than the batch '
                       f'of {self._rows_per_step} they must fill; lower train.batch_size.')
    self.steps_per_epoch = images.shape[0] // self._rows_per_step
    self._perm_epoch, self._perm = -1, None

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, batch index within the epoch) of global step ``step``."""
    return divmod(int(step), self.steps_per_epoch)

  def batch(self, step: int) -> np.ndarray:
    """This host's rows of the batch of global step ``step``: float32 [B_local, H, W, C]."""
    epoch, index = self.position(step)
    if epoch != self._perm_epoch:
      stream_id = self.process_index if self.sharded else 0
      rng = np.random.default_rng((self.seed, epoch, stream_id))
      self._perm, self._perm_epoch = rng.permutation(self.images.shape[0]), epoch
    start = index * self._rows_per_step
    # Sort the whole global batch, then slice: hosts concatenated in order give the single-host
    # batch row for row (rows pair with per-row noise, so the order matters, not just the set).
    rows = np.sort(self._perm[start:start + self._rows_per_step])
    if not self.sharded:
      rows = rows[self.process_index * self.local_batch_size:
                  (self.process_index + 1) * self.local_batch_size]
    return self.images[rows].astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] -> uint8 (4x less host memory; exact for 8-bit sources)."""
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ shell
class _MetricWriter:
  """metrics.jsonl (process 0) and, when importable without cost, TensorBoard."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    try:  # tensorboardX if installed; tf.summary only if TensorFlow is already loaded.
      import tensorboardX  # pytype: disable=import-error
      self._tb = ('tbx', tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard')))
    except ImportError:
      tf = sys.modules.get('tensorflow')
      if tf is not None and hasattr(tf, 'summary'):
        try:
          self._tb = ('tf', tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard')))
        except Exception:  # pylint: disable=broad-except
          self._tb = None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is None:
      return
    step = int(record['step'])
    scalars = {k: v for k, v in record.items() if k not in ('step', 'time')}
    try:
      kind, writer = self._tb
      if kind == 'tbx':
        for k, v in scalars.items():
          writer.add_scalar(k, v, step)
        writer.flush()
      else:
        with writer.as_default(step=step):
          import tensorflow as tf  # already loaded
          for k, v in scalars.items():
            tf.summary.scalar(k, v)
        writer.flush()
    except Exception:  # pylint: disable=broad-except
      self._tb = None

  def truncate(self, step: int) -> None:
    """Keeps the records of steps <= ``step`` (each once, in step order): on resume from a
    checkpoint the steps logged after it by the interrupted run are dropped (they are redone)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    records = {}
    with open(self.path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:  # a line cut short by a kill
          continue
        if isinstance(r, dict) and isinstance(r.get('step'), int) and r['step'] <= step:
          records[r['step']] = line if line.endswith('\n') else line + '\n'
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(records[k] for k in sorted(records))
    os.replace(tmp, self.path)

  def last_record(self) -> dict:
    if not os.path.exists(self.path):
      return {}
    with open(self.path) as f:
      lines = [l for l in f.read().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else {}


class _SigtermFlag:
  """Installs a SIGTERM handler (main thread only) that just sets a flag."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


def check_batch_size(global_batch: int) -> int:
  """Returns the per-host batch size; raises ValueError unless it splits over devices/hosts."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch % n_dev:
    raise ValueError(f'train.batch_size={global_batch} (global) must be divisible by the '
                     f'number of devices ({n_dev}); e.g. use {max(n_dev, global_batch // n_dev * n_dev)}.')
  return global_batch // n_proc


def write_samples(config: ml_collections.ConfigDict, model: unet.UNet, ema_params: Any,
                  mesh: jax.sharding.Mesh, step: int, workdir: str) -> str | None:
  """DDIM samples from the EMA params -> ``workdir/samples/samples_{step:08d}.png`` (process 0).

  Every process runs the (replicated) sampler; only process 0 writes. Returns the path.
  """
  tc = config.train
  if int(tc.num_samples) <= 0:
    return None
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  shape = (int(tc.num_samples), config.data.image_size, config.data.image_size,
           config.data.channels)
  rep = sharding.replicated_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=rep)
  def sample(params, key):
    return sampling.ddim_sample(lambda p, x, t: model.apply(p, x, t), params, sched, key, shape,
                                int(tc.sample_steps))

  key = jax.random.fold_in(jax.random.key(config.seed), TAG_SAMPLE)
  images = sample(ema_params, key)
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


def _load_training_images(config: ml_collections.ConfigDict) -> np.ndarray:
  images = data_lib.load_images(
      config.data.dataset, 'train', config.data, max_examples=config.data.max_train_examples,
      process_split=data_lib.is_process_split(config.data.dataset, jax.process_count()))
  expected = (config.data.image_size, config.data.image_size, config.data.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f'Training images of {config.data.dataset!r} have shape {images.shape}, '
                     f'expected [N, {expected[0]}, {expected[1]}, {expected[2]}].')
  return to_uint8(images)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the base diffusion model in ``workdir``; returns the final metrics.

  Writes ``workdir/checkpoints`` (Orbax; every ``train.checkpoint_every`` steps, at the end and
  on SIGTERM), ``workdir/metrics.jsonl`` (every ``train.log_every`` steps) and EMA sample grids
  ``workdir/samples/samples_{step:08d}.png``. Rerunning the same command resumes from the newest
  checkpoint; a finished run only makes sure the final sample grid exists.

  Args:
    config: full config (see ddm_ood/default_config.py).
    workdir: run directory (created).

  Returns:
    dict with 'step' and the last logged 'loss', 'grad_norm', 'lr', 'steps_per_sec', plus
    'preempted' (True when stopped by SIGTERM before num_steps).

  Raises:
    FloatingPointError: the loss or gradient became NaN/inf (the bad state is not saved).
    SystemExit(0): after saving, when SIGTERM was received (preemption); rerun to resume.
    workdir.WorkdirError: a bad config (e.g. ``train.num_steps <= 0``), a network config that
      differs from the checkpoint's, or another process holding the workdir.
  """
  workdir = workdir_lib.check_workdir_path(workdir)
  workdir_lib.validate_config(config, 'train')
  with workdir_lib.lock(workdir):
    workdir_lib.check_compatible(config, workdir)
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  tc = config.train
  num_steps = int(tc.num_steps)
  local_batch = check_batch_size(int(tc.batch_size))
  mesh = sharding.data_mesh()
  model = unet.build_model(config)
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  optimizer = make_optimizer(tc)
  writer = _MetricWriter(workdir, enabled=is_main)

  init_fn = functools.partial(create_train_state, model, optimizer, config.data.image_size,
                              config.seed)
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
      writer.truncate(start)
    logging.info('UNet parameters: %s (%d devices, %d processes, global batch %d)',
                 f'{unet.param_count(state.params):,}', jax.device_count(), jax.process_count(),
                 tc.batch_size)

    if start >= num_steps:
      logging.info('Training already complete (step %d >= train.num_steps=%d).', start, num_steps)
      final = os.path.join(workdir, 'samples', f'samples_{start:08d}.png')
      if not os.path.exists(final):
        write_samples(config, model, state.ema_params, mesh, start, workdir)
      last = writer.last_record()
      last.pop('time', None)
      return {**last, 'step': start, 'preempted': False}

    stream = BatchStream(_load_training_images(config), local_batch, config.seed,
                         jax.process_index(), jax.process_count(),
                         sharded=data_lib.is_process_split(config.data.dataset,
                                                           jax.process_count()))
    logging.info('Training on %d images of %r (%d steps per epoch) from step %d to %d.',
                 stream.images.shape[0], config.data.dataset, stream.steps_per_epoch, start,
                 num_steps)
    train_step = make_train_step(model, sched, tc, mesh)
    sleep = float(tc.get('debug_sleep_per_step', 0.0))
    kill_in_save = int(tc.get('debug_sigkill_in_save_step', -1))

    def meta_for(step):
      epoch, index = stream.position(step)
      return {'step': int(step), 'epoch': int(epoch), 'index': int(index),
              'config': json.loads(config.to_json_best_effort())}

    def check_finite(step, metrics):
      m = jax.device_get(metrics)
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        manager.wait_until_finished()
        raise FloatingPointError(
            f'Non-finite training loss at step {step} (loss={m["loss"]}, grad_norm='
            f'{m["grad_norm"]}). Nothing was saved after it; the newest checkpoint '
            f'({ckpt_lib.latest_step(workdir)}) is intact. Try a lower train.learning_rate '
            '(or longer train.warmup_steps / a grad_clip), and check the data is finite and in '
            '[-1, 1].')
      return m

    result = {}
    t_log, step_log = time.time(), start
    pending = None  # (step, metrics) of the previous step, checked one step late (no stall)
    preempted = False
    with _SigtermFlag() as sigterm:
      step = start
      while step < num_steps:
        batch = sharding.global_batch_from_local(stream.batch(step), mesh)
        state, metrics = train_step(state, batch)
        if pending is not None:
          check_finite(*pending)
        pending = (step, metrics)
        step += 1
        if step == start + 1:  # steps/s excludes compilation
          jax.block_until_ready(metrics)
          t_log, step_log = time.time(), step
        if sleep:
          time.sleep(sleep)
        log_now = step % int(tc.log_every) == 0 or step == num_steps
        save_now = step % int(tc.checkpoint_every) == 0 or step == num_steps or sigterm.received
        if log_now or save_now:
          m = check_finite(*pending)
          pending = None
        if log_now:
          now = time.time()
          sps = (step - step_log) / max(now - t_log, 1e-9) if step > step_log else None
          t_log, step_log = now, step
          result = {'step': step, 'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                    'lr': float(m['lr']), 'steps_per_sec': sps, 'time': now}
          writer.write(result)
          logging.info('step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %s steps/s  ETA %s',
                       step, num_steps, result['loss'], result['grad_norm'], result['lr'],
                       'n/a' if sps is None else f'{sps:.2f}',
                       'n/a' if sps is None else _format_eta((num_steps - step) / max(sps, 1e-9)))
        if save_now:
          ckpt_lib.save(manager, step, state, meta_for(step))
          if step == kill_in_save:  # tests: a SIGKILL while Orbax writes this checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        if sigterm.received and step < num_steps:
          preempted = True
          break
        if tc.sample_every and step % int(tc.sample_every) == 0 and step < num_steps:
          write_samples(config, model, state.ema_params, mesh, step, workdir)
    manager.wait_until_finished()
    if preempted:
      logging.warning('SIGTERM received: saved checkpoint at step %d in %s; exiting. Rerun the '
                      'same command to resume.', step, manager.directory)
      raise SystemExit(0)
    write_samples(config, model, state.ema_params, mesh, step, workdir)
    logging.info('Training finished at step %d.', step)
    result = dict(result)
    result.pop('time', None)
    return {**result, 'step': step, 'preempted': False}
  finally:
    manager.wait_until_finished()
    manager.close()


__all__ = ['TrainState', 'make_lr_schedule', 'make_optimizer', 'create_train_state', 'loss_fn',
           'make_train_step', 'BatchStream', 'check_batch_size', 'write_samples',
           'train_and_evaluate', 'TAG_INIT', 'TAG_TRAIN', 'TAG_SAMPLE']
