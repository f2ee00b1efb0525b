"""Guards of a run directory: validate before writing, match the checkpoint, one writer at a time.

`python -m ddm_ood.main` calls, before it writes anything:

* `validate_config` (`ddm_ood.config_checks`, re-exported here): the whole config and every
  named source, cheaply (names, folders exist and hold images; nothing is loaded);
* `check_compatible`: every field that defines the trained network (``MODEL_FIELDS``) equals the
  checkpoint's saved config, so evaluating or resuming with another architecture, resolution or
  schedule stops with the list of differing fields;
* `lock`: an exclusive ``fcntl`` lock on ``workdir/.lock`` (released by the kernel when the process
  exits or is killed), so a second writer is refused with the holder's pid.

Only then is ``config.json`` written. Errors raised here are `WorkdirError` (one line each).

This module also owns the workdir's files: atomic writes (`atomic_write`, `atomic_write_json`,
`atomic_savez`), ``config.json`` (`save_config` / `load_config`), ``metrics.jsonl``
(`read_metrics`) and the RNG purpose tags (`Purpose`, `purpose_key`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import io
import json
import os
import tempfile
from typing import Any, Iterator

import ml_collections

from ddm_ood import default_config
from ddm_ood.config_checks import SourceError, WorkdirError, validate_config  # noqa: F401

LOCK_FILE = '.lock'
# Config sections / fields that define the trained network (anything else may change between the
# training run and later evaluations).
MODEL_FIELDS = ('data.image_size', 'data.channels', 'model', 'diffusion')
# ... except these, which choose how the network is computed, not what it is.
NON_MODEL_FIELDS = ('model.compute_dtype', 'model.precision', 'model.attention')


# ------------------------------------------------------------------------ layout, I/O, RNG
CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'


class Purpose(enum.IntEnum):
  """RNG purpose tags: every random stream is ``fold_in(key(config.seed), purpose)``.

  Distinct by construction (an IntEnum with unique values, checked in tests), so no two purposes
  share a key. Values are part of the results: changing one changes what a seed produces.
  """
  INIT = 1       # UNet initialisation
  TRAIN = 2      # training noise / timesteps / dropout (then folded with the step)
  SAMPLE = 3     # EMA sample grids
  SCORER = 4     # trajectory noise of the scorer (then folded with image id, draw, timestep)


def purpose_key(seed: int, purpose: Purpose):
  """``fold_in(jax.random.key(seed), purpose)``: the base key of one purpose (typed key)."""
  import jax  # pylint: disable=g-import-not-at-top  # importable before JAX picks its devices
  return jax.random.fold_in(jax.random.key(int(seed)), int(Purpose(purpose)))


def atomic_write(path: str, content: str | bytes) -> None:
  """Writes ``content`` to ``path`` via a temporary file in the same folder and ``os.replace``.

  A reader (or a run killed mid-write) sees the old file or the new one, never a partial file;
  if writing fails, the temporary file is removed and ``path`` is left as it was.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb' if isinstance(content, bytes) else 'w', newline='' if isinstance(
        content, str) else None) as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: str, obj: Any, indent: int | None = 1) -> None:
  """`atomic_write` of ``json.dumps(obj)``."""
  atomic_write(path, json.dumps(obj, indent=indent))


def atomic_savez(path: str, **arrays) -> None:
  """`atomic_write` of ``np.savez(**arrays)`` (``path`` should end in ``.npz``)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write(path, buf.getvalue())


def scorer_key(seed: int):
  """The base key of the scorer's trajectory noise (per-image noise is folded in from ids)."""
  return purpose_key(seed, Purpose.SCORER)


def safe_name(name: str) -> str:
  """A dataset name as a file-name component ('folder:/a/b' -> 'folder__a_b')."""
  return ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in name)


def detector_path(workdir: str, id_name: str, kind: str) -> str:
  """Where the evaluate mode saves the detector fitted on ``id_name`` for method ``kind``."""
  return os.path.join(workdir, 'eval', 'detectors', f'{safe_name(id_name)}__{kind}.npz')


DETECTOR_FORMAT_VERSION = 1


def save_detector(fitted, path: str, provenance: dict | None = None) -> None:
  """Saves a `detector.FittedDetector` atomically to ONE ``.npz`` file (no pickle): its arrays,
  the aggregation (`features.Reducer`) if any, and the info as a JSON string. The name is used
  as given; no '.npz' is appended.

  ``provenance`` (`provenance.record`: the checkpoint step and the digests of the network and the
  scorer settings it was fitted on) is stored as ``info['provenance']``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays = {name: np.asarray(getattr(fitted.params, name)) for name in fitted.params._fields}
  if fitted.reducer is not None:
    arrays.update(reducer_mean=np.asarray(fitted.reducer.mean),
                  reducer_weight=np.asarray(fitted.reducer.weight))
  info = dict(fitted.info, format_version=DETECTOR_FORMAT_VERSION)
  if provenance is not None:
    info['provenance'] = provenance
  atomic_savez(os.fspath(path), info_json=np.array(json.dumps(info, sort_keys=True)), **arrays)


def load_detector(path: str):
  """Loads a detector written by `save_detector`: a `detector.FittedDetector` (float64 params);
  ``info['provenance']`` is its record (absent in files of older versions)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddm_ood import detector, features  # pylint: disable=g-import-not-at-top
  with np.load(os.fspath(path), allow_pickle=False) as data:
    params = detector.DetectorParams(
        **{name: np.array(data[name]) for name in detector.DetectorParams._fields})
    info = json.loads(str(data['info_json']))
    reducer = None
    if 'reducer_mean' in data:
      reducer = features.Reducer(np.array(data['reducer_mean']), np.array(data['reducer_weight']))
  info.pop('format_version', None)
  return detector.FittedDetector(params, info, reducer)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` in order ([] if none); a torn last line is skipped."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


DIVERGED_FILE = 'diverged.json'


def mark_diverged(workdir: str, step: int, checkpoint_step: int | None, message: str) -> None:
  """Records (process 0) that training diverged at ``step`` (1-based, as ``metrics.jsonl``) and
  which checkpoint is the newest finite one, in ``workdir/diverged.json``."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(workdir, DIVERGED_FILE), dict(
        step=int(step), checkpoint_step=checkpoint_step, message=message))


def clear_diverged(workdir: str) -> None:
  """Removes the divergence record once training has gone past it (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, DIVERGED_FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def read_diverged(workdir: str) -> dict | None:
  """The record of `mark_diverged` (None if training never diverged or went on past it)."""
  path = os.path.join(workdir, DIVERGED_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def training_note(workdir: str, step: int) -> str | None:
  """Why checkpoint ``step`` falls short of the steps its training run was configured for, or
  None when it does not (or the workdir was converted from a published checkpoint)."""
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top
  meta = checkpoint.read_latest_meta(workdir) or {}
  target = (meta.get('config') or {}).get('train', {}).get('num_steps')
  if meta.get('converted_from') or target is None or step >= int(target):
    return None
  short = (f'Evaluating checkpoint step {step}, short of the {target} steps its training run '
           'was configured for (train.num_steps): ')
  diverged = read_diverged(workdir)
  if diverged and diverged.get('checkpoint_step') == step:
    return (short + f'training diverged at step {diverged["step"]} (see '
            f'{os.path.join(workdir, DIVERGED_FILE)}) and this is the newest finite checkpoint. '
            'To finish, resume with a lower train.learning_rate (--mode=train).')
  return (short + 'training stopped early (interrupted, preempted or killed). To finish, rerun '
          '--mode=train with the same config, then evaluate again.')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json`` atomically (process 0 only); read back by `load_config`."""
  import jax  # pylint: disable=g-import-not-at-top  # importable before JAX picks its devices
  if jax.process_index() != 0:
    return
  atomic_write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=1))


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(
        defaults.get(k), dict) else v
  return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained / converted and evaluated with (``workdir/config.json``).

  Fields that the saved config lacks (a workdir written by an older version) take their
  `default_config` values, so every field is present.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is this a ddm_ood workdir? Run '
                            '`python -m ddm_ood.main --config=... --workdir=...` first.')
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_merged(default_config.get_config().to_dict(), saved))


def _as_json(config: ml_collections.ConfigDict | dict) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=list))


def model_fields(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The fields of ``MODEL_FIELDS`` as a flat ``{'model.ch': 8, ...}`` dict (JSON values)."""
  cfg = _as_json(config)
  out = {}
  for field in MODEL_FIELDS:
    section, _, name = field.partition('.')
    value = cfg.get(section, {})
    if name:
      out[field] = value.get(name) if isinstance(value, dict) else None
    elif isinstance(value, dict):
      out.update({f'{section}.{k}': v for k, v in value.items()})
  return {k: v for k, v in out.items() if k not in NON_MODEL_FIELDS}


def check_workdir_path(workdir: str) -> str:
  """Absolute ``workdir``; raises `WorkdirError` if it exists and is not a directory."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pass a directory '
                       '(a new or an existing run directory).')
  return workdir


def check_writable(path: str, what: str, why: str) -> None:
  """Raises `WorkdirError` unless files can be created in directory ``path`` (existing or to be
  created: then its nearest existing ancestor is tried), so that a read-only or unwritable
  location fails before any work instead of after it.

  Args:
    path: the directory the run will write into.
    what: how the user named it, e.g. '--workdir=/runs/a'.
    why: what the run writes there, for the message.
  """
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  try:
    if not os.path.isdir(probe):
      raise NotADirectoryError(errno.ENOTDIR, 'a file, not a directory')
    fd, tmp = tempfile.mkstemp(prefix='.ddm_ood_write_check', dir=probe)
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise WorkdirError(
        f'{what} is not writable ({probe}: {e.strerror or e}); {why} there. Use a writable '
        'directory (or copy the run to one) or fix its permissions. Nothing was written.'
    ) from None


def saved_config(workdir: str) -> dict | None:
  """The config stored with the newest readable checkpoint of ``workdir`` (None if none)."""
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top
  meta = checkpoint.read_latest_meta(workdir)
  if meta is not None and isinstance(meta.get('config'), dict):
    return meta['config']
  return None


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises `WorkdirError` unless the network fields of ``config`` match the checkpoint's.

  Nothing is checked when ``workdir`` has no checkpoint yet (a new run).

  Args:
    config: the config of this run.
    workdir: the run directory.
  """
  saved = saved_config(workdir)
  if saved is None:
    return
  from ddm_ood import default_config  # pylint: disable=g-import-not-at-top
  new, old = model_fields(config), model_fields(saved)
  # Fields added after that run was trained had their default value then.
  defaults = model_fields(default_config.get_config())
  old = {k: (defaults.get(k) if old.get(k) is None else old[k]) for k in set(new) | set(old)}
  diff = [f'{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}'
          for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
  if diff:
    raise WorkdirError(
        f'The config does not match the model trained in {workdir} ({"; ".join(diff)}). These '
        'fields define the trained network and cannot change after training: drop the '
        'overrides (or use the config the run was trained with), or train in a new --workdir. '
        'Nothing was written.')


# ------------------------------------------------------------------------------------ lock
@contextlib.contextmanager
def opened(config: ml_collections.ConfigDict, workdir: str, mode: str) -> Iterator[str]:
  """The guarded start of a run on ``workdir``; yields the absolute workdir.

  Checks the path and the config for ``mode`` ('train', 'evaluate', 'all'), then `held`.
  """
  workdir = check_workdir_path(workdir)
  validate_config(config, mode)
  with held(config, workdir, mode):
    yield workdir


@contextlib.contextmanager
def held(config: ml_collections.ConfigDict, workdir: str, mode: str) -> Iterator[None]:
  """Holds the `lock` of ``workdir`` and checks its checkpoint against ``config``.

  The network fields must match the checkpoint's (`check_compatible`); for ``mode`` 'train' or
  'all' the checkpoint must be trainable (`check_trainable`).
  """
  with lock(workdir):
    check_compatible(config, workdir)
    if mode in ('train', 'all'):
      check_trainable(workdir)
    yield


def check_trainable(workdir: str) -> None:
  """Refuses to train a workdir converted from a published checkpoint (no optimizer state)."""
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top  # Orbax: only here
  meta = checkpoint.read_latest_meta(workdir)
  if meta and meta.get('converted_from'):
    raise WorkdirError(
        f'{workdir} holds a checkpoint converted from {meta["converted_from"]} (EMA parameters '
        'only, no optimizer state): it can be evaluated and scored but not trained. Run '
        '--mode=evaluate or --mode=score on it, or train in a new --workdir.')


_held: dict[str, list] = {}  # workdir -> [file object, depth]: re-entrant within one process


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (re-entrant in one process); refuses a second writer.

  The lock is ``fcntl.flock`` on ``workdir/.lock``, which also records the holder's pid: the
  kernel releases it when the process exits for any reason (SIGKILL included), so a stale file
  never blocks. Multi-host jobs lock on process 0 only.

  Raises:
    WorkdirError: another process holds the lock (the message names its pid).
  """
  import jax  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if jax.process_index() != 0:
    yield
    return
  if workdir in _held:
    _held[workdir][1] += 1
    try:
      yield
    finally:
      _held[workdir][1] -= 1
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.seek(0)
    holder = f.read().strip() or 'unknown'
    f.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    raise WorkdirError(f'{workdir} is in use by another ddm_ood process (pid {holder}); wait '
                       'for it to finish (or stop it), or use another --workdir.') from None
  f.seek(0)
  f.truncate()
  f.write(f'{os.getpid()}\n')
  f.flush()
  _held[workdir] = [f, 1]
  try:
    yield
  finally:
    _held.pop(workdir)
    f.close()  # closing the descriptor releases the flock


__all__ = ['save_detector', 'load_detector', 'scorer_key', 'safe_name', 'detector_path',
           'CONFIG_FILE', 'METRICS_FILE', 'DIVERGED_FILE', 'Purpose', 'purpose_key', 'atomic_write',
           'atomic_write_json', 'atomic_savez', 'metrics_path', 'read_metrics', 'save_config',
           'load_config', 'WorkdirError', 'SourceError', 'MODEL_FIELDS', 'model_fields',
           'check_workdir_path', 'check_writable', 'saved_config', 'mark_diverged',
           'clear_diverged', 'read_diverged', 'training_note',
           'check_compatible', 'validate_config', 'lock', 'LOCK_FILE']
