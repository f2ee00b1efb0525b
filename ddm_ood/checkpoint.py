"""Orbax checkpoints of the training state in ``workdir/checkpoints``.

A checkpoint at step ``s`` holds two items:

* ``state``: the `train.TrainState` pytree (step, params, ema_params, opt_state, key); the RNG
  key is stored as ``jax.random.key_data`` (uint32), so it serialises like any array.
* ``meta``: JSON with the data position (epoch, index of the next batch), the step and the
  config, for humans and for resuming the exact data stream.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save (SIGKILL, preemption) leaves the previous checkpoint usable. Saving is
asynchronous: call ``manager.wait_until_finished()`` before the process exits. Every process of a
multi-host job calls the same functions; Orbax coordinates the writes.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


class CheckpointNotFoundError(FileNotFoundError):
  """Raised when a workdir holds no finished checkpoint."""


def checkpoint_dir(workdir: str) -> str:
  """Absolute path of the checkpoint directory of ``workdir``."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """A `CheckpointManager` at ``workdir/checkpoints`` keeping the ``keep`` newest steps.

  Args:
    workdir: run directory (created if missing, unless ``read_only``).
    keep: number of checkpoints kept (older ones are deleted after each save).
    read_only: open an existing directory without creating or deleting anything.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (no space left, read-only or unwritable directory)."""


_WRITE_FAILURES = {errno.ENOSPC: 'No space left on device', errno.EDQUOT: 'Disk quota exceeded',
                   errno.EROFS: 'Read-only file system', errno.EACCES: 'Permission denied',
                   errno.EPERM: 'Operation not permitted'}


def write_failure(e: BaseException) -> str | None:
  """The cause ('No space left on device', ...) when ``e`` is a failed write, else None.

  Orbax/TensorStore report them as ValueError text (``RESOURCE_EXHAUSTED: ... No space left on
  device [os_error_code='28']``), plain Python as `OSError` with an errno.
  """
  for exc in (e, e.__cause__, e.__context__):
    if isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES:
      return _WRITE_FAILURES[exc.errno]
  text = str(e)
  for code, cause in _WRITE_FAILURES.items():
    if cause in text or f"os_error_code='{code}'" in text:
      return cause
  return None


def _raise_write_error(e: BaseException, manager: ocp.CheckpointManager, what: str) -> None:
  cause = write_failure(e)
  if cause is None:
    return
  latest = manager.latest_step()
  raise CheckpointWriteError(
      f'Could not write {what} to {manager.directory}: {cause}. '
      + (f'The newest finished checkpoint ({latest}) is intact. ' if latest is not None else '')
      + 'Free space (or lower train.keep_checkpoints) or make the directory writable, then '
      'rerun the same command to resume.') from e


def _bytes_on_disk(path: str) -> int:
  """Blocks used by the files under ``path`` (in bytes), 0 if it cannot be read."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def _check_free_space(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Refuses a save that will not fit on the disk before Orbax starts writing it (Orbax would
  fail in background threads, mid-write, and its threads print tracebacks while they stop).

  The estimate is the larger of the state's size and the disk space the newest finished
  checkpoint takes (the same tree, written the same way: measured 1.7x the state's size for
  configs/tiny.py, with Orbax's metadata and file blocks); a save that fails anyway is reported
  by `save` / `wait_until_finished`.
  """
  need = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
  try:
    free = shutil.disk_usage(os.fspath(manager.directory)).free
  except (OSError, TypeError):  # not a local path (e.g. gs://): no check
    return
  latest = manager.latest_step()
  if latest is not None:
    need = max(need, _bytes_on_disk(os.path.join(os.fspath(manager.directory), str(latest))))
  if free < need:
    raise CheckpointWriteError(
        f'No space left on device for the checkpoint of step {step} in {manager.directory}: it '
        f'needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. '
        + (f'The newest finished checkpoint ({latest}) is intact. ' if latest is not None else '')
        + 'Free space (or lower train.keep_checkpoints), then rerun the same command to resume.')


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts an (asynchronous) save of ``state`` and the JSON-able ``meta`` at ``step``.

  The device-to-host copy finishes before this returns, so ``state``'s buffers may be donated to
  the next train step right away. ``force=True``: the caller decides when to save.

  Raises:
    CheckpointWriteError: the disk has less free space than the save needs (see
      `_check_free_space`), or the write failed (no space, read-only); the message names the
      newest finished checkpoint.
  """
  wait_until_finished(manager)   # as Orbax's save would: the previous save's space is taken
  _check_free_space(manager, step, state)
  try:
    manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many types
    _raise_write_error(e, manager, f'the checkpoint of step {step}')
    raise


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """`manager.wait_until_finished()`; a failed background write is a `CheckpointWriteError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    _raise_write_error(e, manager, 'a checkpoint')
    raise


def _restore_args(abstract_tree: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


class CheckpointCorruptError(ValueError):
  """Raised when a workdir holds checkpoints but none of them can be read."""


def _summary(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}'


def _restore_newest_readable(manager: ocp.CheckpointManager, restore: Any) -> tuple[Any, int]:
  """``(restore(step), step)`` for the newest step that reads; warns about each unreadable one.

  Raises:
    CheckpointCorruptError: every step failed (one line naming the steps and the first error).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      return restore(step), int(step)
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many types
      errors.append((step, e))
      older = [s for s in steps if s < step]
      logging.warning('Checkpoint %d in %s is unreadable (%s); %s', step, manager.directory,
                      _summary(e), f'falling back to step {older[0]}.' if older else
                      'no older checkpoint to fall back to.')
  first_step, first = errors[0]
  raise CheckpointCorruptError(
      f'No readable checkpoint in {manager.directory}: steps {[s for s, _ in errors]} all failed '
      f'(step {first_step}: {_summary(first)}). Delete the broken step folders and retrain, or '
      'restore them from a backup.')


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: Any) -> tuple[Any, dict] | None:
  """Restores the newest readable checkpoint of ``manager``.

  A checkpoint that fails to read (corrupt or truncated files) is skipped with a warning naming
  it, and the next older one is tried.

  Args:
    manager: from `make_manager`.
    abstract_state: pytree of `jax.ShapeDtypeStruct` (with ``sharding``) shaped like the saved
      state, e.g. ``jax.eval_shape(create_state, ...)`` with shardings attached.

  Returns:
    ``(state, meta)``, or None when the directory holds no finished checkpoint.

  Raises:
    CheckpointCorruptError: checkpoints exist but none is readable.
  """
  if manager.latest_step() is None:
    return None
  restored, _ = _restore_newest_readable(manager, lambda step: manager.restore(
      step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=abstract_state,
                                       restore_args=_restore_args(abstract_state)),
          meta=ocp.args.JsonRestore())))
  return restored.state, dict(restored.meta)


def read_latest_meta(workdir: str) -> dict | None:
  """The JSON ``meta`` of the newest readable checkpoint of ``workdir`` (None: no checkpoint).

  Only the small JSON item is read; an unreadable step is skipped with a warning.
  """
  if latest_step(workdir) is None:
    return None
  manager = make_manager(workdir, read_only=True)
  try:
    restored, _ = _restore_newest_readable(manager, lambda step: manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))
  finally:
    manager.close()
  return dict(restored.meta)


def latest_step(workdir: str) -> int | None:
  """Step of the newest finished checkpoint in ``workdir``, or None if there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = make_manager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_ema_params(workdir: str, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh | None = None) -> tuple[Any, int]:
  """Restores only the EMA parameters of the newest checkpoint (all that scoring needs).

  The optimizer state and raw parameters are not read. The target structure comes from
  ``jax.eval_shape`` of the network's init, so nothing is allocated twice.

  Args:
    workdir: run directory that `train.train` wrote.
    config: the run's config (``config.model`` / ``config.data`` define the network).
    mesh: mesh the parameters are replicated on (default: `sharding.data_mesh()`).

  Returns:
    ``(ema_params, step)``: the flax variables dict ``{'params': ...}`` and the checkpoint step.

  Raises:
    CheckpointNotFoundError: if ``workdir`` has no finished checkpoint.
    CheckpointCorruptError: if no checkpoint is readable (an unreadable newest one is skipped
      with a warning and the next older one used).
  """
  from ddm_ood import sharding
  from ddm_ood import unet

  step = latest_step(workdir)
  if step is None:
    raise CheckpointNotFoundError(
        f'no checkpoint in {checkpoint_dir(workdir)}: train first with --mode=train')
  mesh = mesh or sharding.data_mesh()
  replicated = sharding.replicated_sharding(mesh)
  model = unet.build_model(config)
  shapes = jax.eval_shape(
      lambda k: unet.init_params(model, k, config.data.image_size), jax.random.key(0))
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  manager = make_manager(workdir, read_only=True)
  try:
    restored, step = _restore_newest_readable(manager, lambda s: manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={'ema_params': abstract}, restore_args={'ema_params': _restore_args(abstract)},
            partial_restore=True))))
  except CheckpointCorruptError as e:
    raise CheckpointCorruptError(
        f'{e} If the checkpoints are intact, config.model / config.data.image_size / channels '
        'may not match the trained network.') from None
  finally:
    manager.close()
  return restored.state['ema_params'], int(step)


__all__ = ['CheckpointNotFoundError', 'CheckpointCorruptError', 'CheckpointWriteError',
           'read_latest_meta', 'checkpoint_dir', 'make_manager', 'save', 'wait_until_finished',
           'write_failure', 'restore_latest', 'latest_step', 'restore_ema_params']
