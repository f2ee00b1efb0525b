"""DiffPath's published CelebA-32 base model, converted from PyTorch, and the paper's suite.

The network is exactly improved-diffusion's ``UNetModel`` for DiffPath's CelebA flags
(``configs/celeba_model_config.yaml`` of github.com/clear-nus/diffpath plus improved-diffusion's
defaults): 32x32 RGB, 128 channels, 3 res blocks, channel_mult (1, 2, 2, 2), attention at 16 and
8 with 4 heads, scale-shift norm, learn_sigma, dropout 0.3 (off at evaluation), cosine schedule
with T = 4000, rescale_timesteps; DiffPath scores with ddim10. 52,546,438 parameters.

  python -m ddm_ood.convert --checkpoint=celeba_ema_0.9999_499999.pt \
      --config=configs/diffpath_celeba.py --workdir=runs/diffpath_celeba
  python -m ddm_ood.main --config=configs/diffpath_celeba.py --workdir=runs/diffpath_celeba \
      --mode=evaluate

Needs TFDS-prepared data for the suite (see ddm_ood/data/tfds_source.py).
"""

from ddm_ood import convert


def get_config():
  """Returns the configuration of DiffPath's converted CelebA model."""
  config = convert.improved_diffusion_config(32, (1, 2, 2, 2), dropout=0.3)
  config.data.dataset = 'tfds:celeb_a'
  config.scorer.batch_size = 256
  return config
