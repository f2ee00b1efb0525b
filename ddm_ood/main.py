"""Command-line entry point.

  python -m ddm_ood.main --config=configs/fashion_mnist.py --workdir=/tmp/run            # train + evaluate
  python -m ddm_ood.main --config=configs/celeba.py --workdir=DIR --mode=train
  python -m ddm_ood.main --config=configs/tiny.py --workdir=DIR --mode=evaluate --config.train.num_steps=10
  python -m ddm_ood.main --mode=score --workdir=DIR --images=folder:PATH --out=scores.csv
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, features and reports.')
_MODE = flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate', 'score'],
                          "'train': train (or resume) the base DDM; 'evaluate': run the OOD suite "
                          "on the latest checkpoint; 'all': both, then print the result table; "
                          "'score': anomaly scores of --images as a CSV (after 'evaluate'; uses "
                          "the workdir's config, no --config).")
_IMAGES = flags.DEFINE_string('images', None, "--mode=score: the images to score, 'folder:PATH'.")
_OUT = flags.DEFINE_string('out', None, '--mode=score: the CSV to write (one row per image file).')
_ID_DATASET = flags.DEFINE_string('id_dataset', None, '--mode=score: whose detector and FPR95 '
                                  'threshold (default: the first of config.eval.id_datasets).')
_KIND = flags.DEFINE_string('kind', None, '--mode=score: feature kind (default: the first of '
                            'config.eval.feature_kinds).')
_SKIP_BAD_FILES = flags.DEFINE_bool('skip_bad_files', False, '--mode=score: mark unreadable '
                                    'image files skipped in the CSV instead of stopping.')
_SCORE_FLAGS = ('images', 'out', 'id_dataset', 'kind', 'skip_bad_files')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Multi-process runs without a cluster JAX detects (e.g. several "
    "processes on one machine): 'host:port' of process 0; set with --num_processes and "
    '--process_id on every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, in [0, num_processes) (with --coordinator_address).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, "JAX's persistent compilation cache: a folder, or 'off' (default: "
    '$DDM_OOD_COMPILATION_CACHE, else $XDG_CACHE_HOME/ddm_ood/jax/<host>; see '
    'ddm_ood/compile_cache.py).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ddm_ood import workdir as workdir_lib
  _use_compilation_cache()
  if _MODE.value == 'score':
    return _score()
  given = [f'--{n}' for n in _SCORE_FLAGS if flags.FLAGS[n].present]
  if given:
    _fail(f'{", ".join(given)} only apply to --mode=score.')
  if not flags.FLAGS['config'].present:
    _fail(f'--config=FILE is required with --mode={_MODE.value}.')
  try:
    config = _CONFIG.value
    config.keys()  # a missing / broken file surfaces on the first attribute access
  except OSError as e:
    reason = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    _fail(f'cannot load --config={config_flags.get_config_filename(flags.FLAGS["config"])}: '
          f'{reason}')
  try:  # before any work and before JAX starts: a typo fails in seconds, nothing written
    workdir = workdir_lib.check_workdir_path(_WORKDIR.value)
    workdir_lib.validate_config(config, _MODE.value)
  except workdir_lib.WorkdirError as e:
    _fail(str(e))
  from ddm_ood import host_malloc
  logging.info(host_malloc.describe())
  if not _COORDINATOR.value:  # one process: every core a device (before JAX starts its backend)
    from ddm_ood import cpu_devices
    cpu_devices.configure(
        divides=(config.train.batch_size,) if _MODE.value in ('train', 'all') else ())
  from ddm_ood import sharding
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  from ddm_ood import checkpoint
  from ddm_ood import data
  try:
    with workdir_lib.held(config, workdir, _MODE.value):
      workdir_lib.save_config(config, workdir)  # only once the config has been accepted
      if _MODE.value in ('train', 'all'):
        from ddm_ood import train
        train.train(config, workdir)
      if _MODE.value in ('evaluate', 'all'):
        from ddm_ood import evaluate
        evaluate.run_suite(config, workdir, print_table=True)
  except (workdir_lib.WorkdirError, data.DataError, checkpoint.CheckpointNotFoundError,
          checkpoint.CheckpointCorruptError) as e:
    _fail(str(e))
  logging.info('Done.')


def _score() -> None:
  """--mode=score: flags and workdir checked before any JAX work, then the folder is scored."""
  from ddm_ood import data
  from ddm_ood import score_files
  if flags.FLAGS['config'].present:
    _fail("--mode=score reads the workdir's config.json; drop --config.")
  if _COORDINATOR.value:
    _fail('--mode=score runs in one process; drop --coordinator_address.')
  try:
    args = score_files.check_args(_WORKDIR.value, _IMAGES.value, _OUT.value, _ID_DATASET.value,
                                  _KIND.value, _SKIP_BAD_FILES.value)
  except score_files.ScoreError as e:
    _fail(str(e))
  from ddm_ood import checkpoint
  try:
    score_files.score_folder(args)
  except (data.DataError, checkpoint.CheckpointNotFoundError,
          checkpoint.CheckpointCorruptError, FileNotFoundError) as e:
    _fail(str(e))
  logging.info('Done.')


def _use_compilation_cache() -> None:
  """Every mode compiles through the persistent cache (a second start skips compilation)."""
  from ddm_ood import compile_cache
  compile_cache.configure(_COMPILATION_CACHE.value)


def _fail(message: str) -> None:
  """Exits with status 1 and a one-line message (user errors need no traceback)."""
  print(f'ddm_ood: error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


if __name__ == '__main__':
  from ddm_ood import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.maybe_reexec()  # replaces this process with one on tcmalloc, where installed
  app.run(main)
