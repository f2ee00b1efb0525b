"""The default configuration: every field with its default (defined in ddm_ood/default_config.py).

  python -m ddm_ood.main --config=configs/default.py --workdir=DIR
"""

from ddm_ood.default_config import get_config  # pylint: disable=unused-import
