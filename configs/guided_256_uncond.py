"""guided-diffusion's unconditional ImageNet 256x256 model (``256x256_diffusion_uncond.pt``).

The network is exactly guided-diffusion's ``UNetModel`` for its README's flags
``--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256
--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64
--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True``
(channel_mult (1, 1, 2, 2, 4, 4), legacy attention order, dropout 0): 552,814,086 parameters.
The fp16 checkpoint is read as float32. Scored with DiffPath's ddim10 (t = 0, 100, ..., 900) in
bfloat16 on accelerators (``model.compute_dtype = 'auto'``; float32 on CPU); every set is resized
through the coarsest set's native size first (``data.resize_via = -1``: the 32x32 sets -> 32).

  python -m ddm_ood.convert --checkpoint=256x256_diffusion_uncond.pt \\
      --config=configs/guided_256_uncond.py --workdir=runs/guided_256_uncond
  python -m ddm_ood.main --config=configs/guided_256_uncond.py \\
      --workdir=runs/guided_256_uncond --mode=evaluate
"""

from ddm_ood.importers import adm


def get_config():
  """Returns the configuration of guided-diffusion's converted 256x256 unconditional model."""
  config = adm.guided_diffusion_config(256)
  config.data.dataset = 'imagenet256 (converted, not trainable here)'
  return config
