"""guided-diffusion's LSUN bedroom model (``lsun_bedroom.pt``; ``lsun_cat.pt`` and
``lsun_horse.pt`` have the same network).

The flags of guided-diffusion's README for the LSUN models: those of
``configs/guided_256_uncond.py`` with ``--dropout 0.1`` (inactive when scoring): 552,814,086
parameters.

  python -m ddm_ood.convert --checkpoint=lsun_bedroom.pt --config=configs/guided_lsun_bedroom.py \\
      --workdir=runs/guided_lsun_bedroom
"""

from ddm_ood.importers import adm


def get_config():
  """Returns the configuration of guided-diffusion's converted LSUN bedroom model."""
  config = adm.guided_diffusion_config(256, dropout=0.1)
  config.data.dataset = 'lsun_bedroom (converted, not trainable here)'
  return config
