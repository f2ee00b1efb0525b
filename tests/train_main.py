"""`python -m ddm_ood.main` with test hooks installed first (see train_helpers.start_main).

  python tests/train_main.py --test_sleep_per_step=0.5 --test_sigkill_in_save_step=4 \
      --config=configs/tiny.py --workdir=DIR --mode=train
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from ddm_ood import main  # noqa: E402
from tests import train_helpers  # noqa: E402

_SLEEP = flags.DEFINE_float('test_sleep_per_step', 0.0, 'Seconds slept after each train step.')
_KILL = flags.DEFINE_integer('test_sigkill_in_save_step', -1,
                             'SIGKILL the process right after starting the save of this step.')


def _main(argv):
  train_helpers.install_process_hooks(_SLEEP.value, _KILL.value)
  main.main(argv)


if __name__ == '__main__':
  app.run(_main)
