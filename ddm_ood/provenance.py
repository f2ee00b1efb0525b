"""Which network and scorer settings a fitted detector (and its FPR95 threshold) belongs to.

Evaluate mode records, with every detector it saves (`workdir.save_detector`) and with the ID-test
scores that give score mode's FPR95 threshold (``eval/scores.npz``, key `SCORES_KEY`), a `record`:
the checkpoint step, a SHA-256 of the network's EMA parameters and one of the scorer settings.
`api.load_anomaly_scorer` and ``--mode=score`` compare it with the workdir's newest checkpoint and
its config.json and refuse a mismatch (`StaleDetectorError`, naming the command that refits):
training on after an evaluation, or changing ``config.scorer`` afterwards, never mixes a detector
with another network's features. Evaluate mode refits everything; its feature cache
(``features/step_<N>/``) records the parameters' digest too (`check_feature_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from absl import logging

from ddm_ood import default_config
from ddm_ood import settings as settings_lib
from ddm_ood.config_checks import WorkdirError

SCORES_KEY = 'provenance_json'          # the record's key in eval/scores.npz
FEATURE_CACHE_FILE = 'provenance.json'  # in each features/step_<N>/ folder
# The fields that change what the scorer computes for an image (config.scorer's batch size,
# chunking and memory budget do not).
_SCORER_SECTIONS = ('scorer', 'diffusion')
NOT_RESULTS = ('scorer.batch_size', 'scorer.chunk', 'scorer.memory_budget_gb')
_DATA_FIELDS = ('image_size', 'channels', 'resize_via')


class StaleDetectorError(WorkdirError):
  """A saved detector or threshold does not match the workdir's network or scorer settings."""


def params_digest(params: Any) -> str:
  """SHA-256 (hex) of a parameter pytree: every leaf's path, dtype, shape and bytes.

  Replicated (also multi-host) `jax.Array` leaves are read from this host's first shard.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_shards[0].data
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def scorer_settings(config) -> dict[str, Any]:
  """The settings that decide an image's features, as ``{'scorer.num_steps': 4, ...}``.

  Only the values that differ from `default_config` are listed, so a field added in a later
  version (at its default) leaves the records of older detectors valid.
  """
  given, defaults = _settings(config), _settings(default_config.get_config())
  return {k: v for k, v in sorted(given.items()) if v != defaults.get(k)}


def _settings(config) -> dict[str, Any]:
  out = {'seed': config.seed}
  for section in _SCORER_SECTIONS:
    for name, value in settings_lib.section(config[section], section).items():
      if f'{section}.{name}' not in NOT_RESULTS:
        out[f'{section}.{name}'] = value
  data = settings_lib.section(config.data, 'data')
  out.update({f'data.{name}': data[name] for name in _DATA_FIELDS})
  return json.loads(json.dumps(out, default=list))   # tuples -> lists, as a record reads back


def record(step: int, params_sha256: str, config) -> dict[str, Any]:
  """The provenance of a detector fitted now: checkpoint step, parameter and settings digests."""
  settings = scorer_settings(config)
  return dict(checkpoint_step=int(step), params_sha256=params_sha256,
              scorer_sha256=hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
              .hexdigest(), scorer_settings=settings)


def refit_hint(workdir: str) -> str:
  """The commands that refit a workdir's detectors and thresholds."""
  return (f'refit them with `python -m ddm_ood.main --mode=evaluate --workdir={workdir} '
          '--config=<the config file of this run>`, or add --refit to the --mode=score command '
          f'(it reruns evaluate with {os.path.join(workdir, "config.json")}).')


def legacy_record(workdir: str) -> dict | None:
  """``{'checkpoint_step': N}`` from ``eval/results.json`` of a workdir evaluated by a version
  that recorded no digests (None if there is none)."""
  path = os.path.join(workdir, 'eval', 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    step = json.load(f).get('checkpoint_step')
  return None if step is None else {'checkpoint_step': int(step)}


def check(recorded: dict | None, current: dict, what: str, workdir: str) -> None:
  """Raises `StaleDetectorError` unless ``recorded`` matches ``current`` (both from `record`).

  A record without digests (written by an older ddm_ood; e.g. only ``checkpoint_step`` from
  results.json) is compared on what it has; None is accepted with a warning.
  """
  if recorded is None:
    logging.warning('%s records no provenance (written by an older ddm_ood): it cannot be checked '
                    'against the network; %s', what, refit_hint(workdir))
    return
  problems = []
  old_step, new_step = recorded.get('checkpoint_step'), current['checkpoint_step']
  old_sha = recorded.get('params_sha256')
  if old_step != new_step or (old_sha and old_sha != current['params_sha256']):
    problems.append(
        f'it was fitted on the network of checkpoint step {old_step}'
        + (f' (parameters {old_sha[:12]})' if old_sha else '')
        + f', the workdir now holds step {new_step} (parameters '
        f'{current["params_sha256"][:12]})')
  if recorded.get('scorer_sha256') and recorded['scorer_sha256'] != current['scorer_sha256']:
    old, new = recorded.get('scorer_settings', {}), current['scorer_settings']
    diff = [f'{k}: {old.get(k, "default")!r} then, {new.get(k, "default")!r} now'
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    problems.append(f'the scorer settings of config.json changed ({"; ".join(diff)})')
  if problems:
    raise StaleDetectorError(
        f'{what} does not match this workdir: {"; and ".join(problems)}. Its scores would mix '
        f'two networks or settings; {refit_hint(workdir)}')


def check_feature_cache(step_dir: str, params_sha256: str, is_writer: bool = True) -> None:
  """Drops a feature-cache folder computed by other parameters than ``params_sha256``.

  ``features/step_<N>/`` is keyed by the checkpoint step; a workdir retrained to the same step
  (another seed, another learning rate after a divergence) would otherwise reuse features of the
  old network. The folder records the digest in `FEATURE_CACHE_FILE`; a mismatch removes the
  folder with a warning (the features are recomputed). Only ``is_writer`` (process 0) deletes and
  writes; the other hosts just see the files gone.
  """
  if not is_writer:
    return
  path = os.path.join(step_dir, FEATURE_CACHE_FILE)
  recorded = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        recorded = json.load(f).get('params_sha256')
    except (OSError, ValueError):
      recorded = ''
  if recorded is not None and recorded != params_sha256:
    logging.warning('The feature cache %s was computed by another network (parameters %s, now '
                    '%s); removing it, the features are recomputed.', step_dir, recorded[:12],
                    params_sha256[:12])
    shutil.rmtree(step_dir)
  if recorded != params_sha256:
    from ddm_ood import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.atomic_write_json(path, {'params_sha256': params_sha256})


__all__ = ['SCORES_KEY', 'FEATURE_CACHE_FILE', 'StaleDetectorError', 'params_digest',
           'scorer_settings', 'record', 'refit_hint', 'legacy_record', 'check',
           'check_feature_cache']
