"""Command-line entry point.

  python -m ddm_ood.main --config=configs/fashion_mnist.py --workdir=/tmp/run            # train + evaluate
  python -m ddm_ood.main --config=configs/celeba.py --workdir=DIR --mode=train
  python -m ddm_ood.main --config=configs/tiny.py --workdir=DIR --mode=evaluate --config.train.num_steps=10
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, features and reports.')
_MODE = flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate'],
                          "'train': train (or resume) the base DDM; 'evaluate': run the OOD suite "
                          "on the latest checkpoint; 'all': both, then print the result table.")
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Multi-process runs without a cluster JAX detects (e.g. several "
    "processes on one machine): 'host:port' of process 0; set with --num_processes and "
    '--process_id on every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, in [0, num_processes) (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ddm_ood import workdir as workdir_lib
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
  if not _COORDINATOR.value:  # one process: every core a device (before JAX starts its backend)
    from ddm_ood import cpu_devices
    cpu_devices.configure(
        divides=(config.train.batch_size,) if _MODE.value in ('train', 'all') else ())
  from ddm_ood import sharding
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  from ddm_ood import api
  from ddm_ood import checkpoint
  from ddm_ood import data
  try:
    with workdir_lib.lock(workdir):
      workdir_lib.check_compatible(config, workdir)
      api.save_config(config, workdir)  # only once the config has been accepted
      if _MODE.value in ('train', 'all'):
        from ddm_ood import train
        train.train_and_evaluate(config, workdir)
      if _MODE.value in ('evaluate', 'all'):
        from ddm_ood import evaluate
        evaluate.run_suite(config, workdir, print_table=True)
  except (workdir_lib.WorkdirError, data.DataError, checkpoint.CheckpointNotFoundError,
          checkpoint.CheckpointCorruptError) as e:
    _fail(str(e))
  logging.info('Done.')


def _fail(message: str) -> None:
  """Exits with status 1 and a one-line message (user errors need no traceback)."""
  print(f'ddm_ood: error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


if __name__ == '__main__':
  app.run(main)
