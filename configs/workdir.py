"""The config a workdir was converted or trained with, as a config file: ``configs/workdir.py:DIR``.

For a workdir that ``python -m ddm_ood.convert --diffusers=...`` wrote (its network lives only in
``DIR/config.json``), with any field overridden on the command line::

  python -m ddm_ood.main --config=configs/workdir.py:runs/ddpm_cifar10 \\
      --workdir=runs/ddpm_cifar10 --mode=evaluate \\
      --config.eval.id_datasets='("folder:/data/id",)' \\
      --config.eval.ood_datasets='("folder:/data/ood",)'
"""

import ml_collections

from ddm_ood import workdir


def _tuples(value):
  """JSON lists back to tuples (the type every sequence field has, and command-line overrides
  need)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(workdir_path: str = ''):
  """Returns ``workdir_path``'s config.json (missing fields take their defaults)."""
  if not workdir_path:
    raise ValueError('Name the workdir: --config=configs/workdir.py:/path/to/workdir')
  return ml_collections.ConfigDict(_tuples(workdir.load_config(workdir_path).to_dict()))
