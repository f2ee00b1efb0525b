"""``--mode=score``: anomaly scores of a folder of the user's own images, one CSV row per file.

  python -m ddm_ood.main --mode=score --workdir=DIR --images=folder:PATH --out=scores.csv

Each row: the file, its anomaly score (`api.load_anomaly_scorer`, image ids = content hashes, so
a score depends on the image only), whether it is above the FPR95 threshold (the score that 95%
of the evaluate mode's ID-test images fall at or below, `metrics.id_threshold`), and a status
('ok', or 'skipped: <reason>' for an unreadable file with ``skip_bad_files``).

`check_args` does no JAX work (main calls it first); `score_folder` does the work.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any

from absl import logging
import numpy as np

from ddm_ood import data
from ddm_ood import kinds
from ddm_ood import metrics
from ddm_ood import provenance
from ddm_ood import settings
from ddm_ood import workdir as workdir_lib

TPR = 0.95                      # the threshold keeps this fraction of the ID-test images
SCORES_FILE = os.path.join('eval', 'scores.npz')   # written by evaluate mode
CSV_COLUMNS = ('path', 'score', 'above_threshold', 'status')
FOLDER_PREFIX = 'folder:'
# A folder with train/ and test/ subfolders is scored on its test/ images (what evaluate scores).
SPLIT = 'test'


class ScoreError(workdir_lib.WorkdirError):
  """A user-facing problem with the score-mode flags or the workdir; the message says what to do."""


def default_id_dataset(config) -> str:
  """The ID set whose detector and threshold score mode uses when --id_dataset is not given."""
  return config.eval.id_datasets[0]


def default_kind(config) -> str:
  """The method score mode uses when --kind is not given: the zero-shot default
  (`kinds.default_method`)."""
  return kinds.default_method(config.eval.feature_kinds)


@dataclasses.dataclass(frozen=True)
class ScoreArgs:
  """Validated score-mode arguments (absolute paths, defaults filled in)."""
  workdir: str
  folder: str
  files: tuple[str, ...]      # the image files of ``folder``, sorted: one CSV row each
  out: str
  id_dataset: str
  kind: str
  threshold: float            # FPR95 threshold of (id_dataset, kind)
  skip_bad_files: bool
  config: Any                 # the workdir's config (ml_collections.ConfigDict)
  refit: bool = False         # rerun evaluate first when the detector / threshold is stale


def fpr95_threshold(workdir: str, id_dataset: str, kind: str) -> float:
  """The ID-test FPR95 threshold of ``(id_dataset, kind)`` from evaluate mode's saved scores.

  Raises:
    ScoreError: evaluate mode has not been run (or not with this ID set and kind).
  """
  path = os.path.join(workdir, SCORES_FILE)
  run = (f'run `python -m ddm_ood.main --mode=evaluate --workdir={workdir} --config=...` '
         'first')
  if not os.path.exists(path):
    raise ScoreError(f'No ID-test scores at {path}: evaluate mode has not been run on this '
                     f'workdir; {run} (score mode needs its fitted detector and threshold).')
  key = f'{id_dataset}|{kind}|id'
  with np.load(path) as saved:
    if key not in saved.files:
      have = sorted('--id_dataset={} --kind={}'.format(*k.split('|')[:2])
                    for k in saved.files if k.endswith('|id'))
      raise ScoreError(f'{path} has no ID-test scores for --id_dataset={id_dataset} '
                       f'--kind={kind} (it has: {", ".join(have) or "none"}); pass one of '
                       f'those or {run} with that set in config.eval.id_datasets and that kind '
                       'in config.eval.feature_kinds.')
    return metrics.id_threshold(saved[key], TPR)


def saved_provenance(workdir: str) -> dict | None:
  """The `provenance.record` of evaluate mode's saved scores (the thresholds' network), or the
  checkpoint step of results.json for a workdir evaluated by an older version (None: neither)."""
  path = os.path.join(workdir, SCORES_FILE)
  if os.path.exists(path):
    with np.load(path) as saved:
      if provenance.SCORES_KEY in saved.files:
        return json.loads(str(saved[provenance.SCORES_KEY]))
  return provenance.legacy_record(workdir)


def check_args(workdir: str, images: str | None, out: str | None, id_dataset: str | None = None,
               kind: str | None = None, skip_bad_files: bool = False,
               refit: bool = False) -> ScoreArgs:
  """Validates the score-mode flags without JAX: workdir evaluated, folder has images, out path
  writable (and the workdir, with ``refit``).

  Raises:
    ScoreError: the first problem found (one line, says what to do).
  """
  if not images:
    raise ScoreError('--mode=score needs --images=folder:PATH (the images to score).')
  if not images.startswith(FOLDER_PREFIX):
    raise ScoreError(f'--images={images} must be a folder, written folder:PATH.')
  if not out:
    raise ScoreError('--mode=score needs --out=FILE.csv (where to write one row per image).')
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out):
    raise ScoreError(f'--out={out} is a directory; pass a file name such as {out}/scores.csv.')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:  # before any image is scored
    workdir_lib.check_writable(os.path.dirname(out), f'--out={out}', 'score mode writes the CSV')
    if refit:
      workdir_lib.check_writable(workdir, f'--workdir={workdir}',
                                 '--refit reruns evaluate, which writes its results')
  except workdir_lib.WorkdirError as e:
    raise ScoreError(str(e)) from None
  try:
    config = workdir_lib.load_config(workdir)
  except FileNotFoundError as e:
    raise ScoreError(str(e)) from None
  id_dataset = id_dataset or default_id_dataset(config)
  kind = kind or default_kind(config)
  threshold = fpr95_threshold(workdir, id_dataset, kind)
  folder = os.path.abspath(os.path.expanduser(images[len(FOLDER_PREFIX):]))
  try:
    files = tuple(sorted(data.folder_files(folder, SPLIT)))
  except data.DataError as e:
    raise ScoreError(f'--images: {e}') from None
  return ScoreArgs(workdir=workdir, folder=folder, files=files, out=out, id_dataset=id_dataset,
                   kind=kind, threshold=threshold, skip_bad_files=skip_bad_files,
                   config=config, refit=refit)


def load_file(path: str, data_cfg) -> np.ndarray:
  """One image file as the ``folder:`` source loads it: float32 [S, S, C] in [-1, 1].

  Raises:
    data.DataError: the file cannot be read (the message names it).
  """
  size, channels = int(data_cfg.image_size), int(data_cfg.channels)
  x = data.formats.uint8_to_unit(data.formats.load_image_file(path, channels, size))[None]
  # The rest of `data.load_images` for a folder source (a no-op unless config.data.resize_via).
  via = int(settings.section(data_cfg, 'data')['resize_via'])
  if via:
    x = data.resize_images(x, via)
  x = data.to_channels(data.resize_images(x, size), channels)
  return np.clip(x, -1.0, 1.0)[0]


def read_images(files, data_cfg, skip_bad_files: bool):
  """Decodes ``files``; returns ``(images [M, S, S, C], {bad file: reason})``, M = good files.

  Raises:
    data.DataError: a file cannot be read and ``skip_bad_files`` is False (names the file).
  """
  images, skipped = [], {}
  for f in files:
    try:
      images.append(load_file(f, data_cfg))
    except data.DataError as e:
      if not skip_bad_files:
        raise data.DataError(f'{e} Or pass --skip_bad_files to score the other files and mark '
                             'this one skipped in the CSV.') from None
      cause = e.__cause__ or e
      skipped[f] = f'{type(cause).__name__}: {cause}'.replace('\n', ' ')
  size, c = int(data_cfg.image_size), int(data_cfg.channels)
  return (np.stack(images) if images else np.zeros((0, size, size, c), np.float32)), skipped


def default_batch_size(num_images: int, batch_size: int) -> int:
  """Images per compiled call: ``config.scorer.batch_size``, or for a smaller folder the power
  of two >= its size, so that a few files are not scored as a whole padded batch (at most
  log2(batch_size) shapes, each compiled once and kept by the persistent compilation cache)."""
  return max(1, min(int(batch_size), 1 << max(int(num_images) - 1, 0).bit_length()))


def score_batches(score_fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """``score_fn`` over ``images`` [N, ...] in batches of ``batch_size`` -> [N] float32.

  The last batch is padded (with copies of the last image) to the same shape, so one compiled
  program serves every batch; the padding's scores are dropped, no image is.
  """
  n = images.shape[0]
  out = np.zeros((n,), np.float32)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)
    out[start:stop] = np.asarray(score_fn(images[idx]))[:stop - start]
    logging.info('score: %d / %d images', stop, n)
  return out


def csv_text(files, scores: dict, skipped: dict, threshold: float) -> str:
  """The CSV: one row per file of ``files`` (``scores``: file -> score; ``skipped``: file ->
  reason)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(CSV_COLUMNS)
  for f in files:
    if f in skipped:
      w.writerow([f, '', '', f'skipped: {skipped[f]}'])
    else:
      s = float(scores[f])
      w.writerow([f, f'{s:.9g}', str(s > threshold).lower(), 'ok'])
  return buf.getvalue()


def load_checked_scorer(args: ScoreArgs):
  """`api.load_anomaly_scorer` of ``args``, its detector and FPR95 threshold both fitted on the
  workdir's newest checkpoint and scorer settings (`provenance.check`).

  With ``args.refit``, a stale detector or threshold is refitted first (evaluate mode on the
  workdir's config.json). Returns ``(scorer, args)`` (``args.threshold`` updated after a refit).

  Raises:
    provenance.StaleDetectorError: stale, and ``args.refit`` is False (names the refit commands).
  """
  from ddm_ood import api  # pylint: disable=g-import-not-at-top  # JAX starts here
  try:
    ood = api.load_anomaly_scorer(args.workdir, id_dataset=args.id_dataset, kind=args.kind)
    provenance.check(saved_provenance(args.workdir), ood.provenance,
                     f'The FPR95 threshold of --id_dataset={args.id_dataset} --kind={args.kind} '
                     f'({os.path.join(args.workdir, SCORES_FILE)})', args.workdir)
    return ood, args
  except provenance.StaleDetectorError as e:
    if not args.refit:
      raise
    logging.warning('--refit: %s Rerunning evaluate on %s with its config.json.', e, args.workdir)
  from ddm_ood import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.run_suite(args.config, args.workdir)
  args = dataclasses.replace(args, threshold=fpr95_threshold(args.workdir, args.id_dataset,
                                                             args.kind))
  return api.load_anomaly_scorer(args.workdir, id_dataset=args.id_dataset, kind=args.kind), args


def score_folder(args: ScoreArgs, batch_size: int | None = None) -> dict:
  """Scores ``args.files`` and writes ``args.out`` atomically.

  Args:
    args: from `check_args`.
    batch_size: images per scorer call (default `default_batch_size`); the scores do not depend
      on it (to float32 rounding).

  Returns:
    ``{'scores': {file: score}, 'skipped': {file: reason}, 'threshold': float}``.
  """
  ood, args = load_checked_scorer(args)
  images, skipped = read_images(args.files, data.suite_data_config(args.config),
                                args.skip_bad_files)
  good = [f for f in args.files if f not in skipped]
  batch_size = int(batch_size or default_batch_size(len(good), ood.config.scorer.batch_size))
  logging.info('score: %d files in %s (%d skipped), ID set %s, kind %s, step %d, FPR95 '
               'threshold %.6g', len(args.files), args.folder, len(skipped), args.id_dataset,
               args.kind, ood.step, args.threshold)
  scores = dict(zip(good, score_batches(ood, images, batch_size))) if good else {}
  workdir_lib.atomic_write(args.out, csv_text(args.files, scores, skipped, args.threshold))
  for f, reason in skipped.items():
    logging.warning('score: skipped %s: %s', f, reason)
  above = sum(s > args.threshold for s in scores.values())
  logging.info('score: wrote %s: %d scored (%d above the threshold), %d skipped', args.out,
               len(scores), above, len(skipped))
  return {'scores': scores, 'skipped': skipped, 'threshold': args.threshold}
