"""The config a workdir was converted or trained with, as a config file: ``configs/workdir.py:DIR``.

For a workdir that ``python -m ddm_ood.convert --diffusers=...`` wrote (its network lives only in
``DIR/config.json``), with any field overridden on the command line::

  python -m ddm_ood.main --config=configs/workdir.py:runs/ddpm_cifar10 \\
      --workdir=runs/ddpm_cifar10 --mode=evaluate \\
      --config.eval.id_datasets='("folder:/data/id",)' --config.eval.ood_datasets='("folder:/data/ood",)'
"""

from ddm_ood import workdir


def get_config(workdir_path: str = ''):
  """Returns ``workdir_path``'s config.json (missing fields take their defaults)."""
  if not workdir_path:
    raise ValueError('Name the workdir: --config=configs/workdir.py:/path/to/workdir')
  return workdir.load_config(workdir_path)
