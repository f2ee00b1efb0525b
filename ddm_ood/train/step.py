"""The pure training step: lr schedule, optimizer, `TrainState`, eps-MSE loss, jitted step.

Randomness is stateless: step ``s`` uses ``fold_in(purpose_key(seed, TRAIN), s)`` split into
(t, noise, dropout) keys, so results do not depend on device count and a resumed run continues
the exact stream. The batch is sharded over the ('data',) mesh and the state replicated; the
compiler inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddm_ood import schedule as schedule_lib
from ddm_ood import settings
from ddm_ood import sharding
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib


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
  kind = settings.section(train_cfg, 'train')['lr_schedule']
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
  """Initial state: UNet parameters from ``purpose_key(seed, INIT)``, EMA = params."""
  params = unet.init_params(model, workdir_lib.purpose_key(seed, workdir_lib.Purpose.INIT),
                            image_size)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
      key=jax.random.key_data(workdir_lib.purpose_key(seed, workdir_lib.Purpose.TRAIN)))


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
    train_cfg: ``config.train`` (optimizer, EMA decay).
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

  def apply_train(params, x_t, t, rng):
    return model.apply(params, x_t, t, train=True, rngs={'dropout': rng})

  def train_step(state: TrainState, batch: jax.Array):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, apply_train, schedule, batch, key)
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


__all__ = ['TrainState', 'make_lr_schedule', 'make_optimizer', 'create_train_state', 'loss_fn',
           'make_train_step']
