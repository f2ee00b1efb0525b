"""improved-diffusion's ImageNet-64 model (DiffPath's second base model), converted from PyTorch.

The network is exactly improved-diffusion's ``UNetModel`` for the published
``imagenet64_uncond_100M_1500K.pt`` (its README's flags: 64x64 RGB, 128 channels, 3 res blocks,
channel_mult (1, 2, 3, 4), attention at 16 and 8 with 4 heads, learn_sigma, dropout 0, cosine
schedule with T = 4000, scale-shift norm, rescale_timesteps); DiffPath scores with ddim10.
121,063,942 parameters.

Every set goes through DiffPath's "correct resizing" (``data.resize_via = 32``: first down to
32x32, then up to 64x64), so that no set keeps more detail than the 32x32 ones; naive resizing
inflates AUROCs (DiffPath, Table 7).

  python -m ddm_ood.convert --checkpoint=imagenet64_uncond_100M_1500K.pt \
      --config=configs/diffpath_imagenet64.py --workdir=runs/diffpath_imagenet64
  python -m ddm_ood.main --config=configs/diffpath_imagenet64.py \
      --workdir=runs/diffpath_imagenet64 --mode=evaluate
"""

from ddm_ood import convert


def get_config():
  """Returns the configuration of the converted improved-diffusion ImageNet-64 model."""
  config = convert.improved_diffusion_config(64, (1, 2, 3, 4), dropout=0.0)
  # ImageNet is not a ddm_ood source: this model is converted, never trained here.
  config.data.dataset = 'imagenet64 (converted, not trainable here)'
  config.data.resize_via = 32
  config.scorer.batch_size = 128
  return config
