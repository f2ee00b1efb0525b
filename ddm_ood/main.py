"""Command-line entry point.

  python -m ddm_ood.main --config=configs/fashion_mnist.py --workdir=/tmp/run            # train + evaluate
  python -m ddm_ood.main --config=configs/celeba.py --workdir=DIR --mode=train
  python -m ddm_ood.main --config=configs/tiny.py --workdir=DIR --mode=evaluate --config.train.num_steps=10
"""

import os

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
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ddm_ood import sharding
  sharding.maybe_initialize_distributed()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  from ddm_ood import api
  api.save_config(config, workdir)
  if _MODE.value in ('train', 'all'):
    from ddm_ood import train
    train.train_and_evaluate(config, workdir)
  if _MODE.value in ('evaluate', 'all'):
    from ddm_ood import evaluate
    evaluate.run_suite(config, workdir, print_table=True)
  logging.info('Done.')


if __name__ == '__main__':
  app.run(main)
