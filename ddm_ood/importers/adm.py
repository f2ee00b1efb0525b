"""Importer of improved-diffusion / guided-diffusion (ADM) ``UNetModel`` checkpoints (family 'adm').

``python -m ddm_ood.convert --checkpoint=FILE --config=CONFIG`` reads the state dict
(`state_dict.load_state_dict`; guided-diffusion's float16 tensors become float32) and maps it onto
the `unet.UNet` of ``CONFIG`` (`ddm_ood.adm_params`). The weights do not say how many heads the
attention has, its qkv layout, the GroupNorm epsilon or the schedule: the config does
(`improved_diffusion_config`, `guided_diffusion_config`, ``configs/diffpath_*.py``,
``configs/guided_*.py``).
"""

from __future__ import annotations

import ml_collections

from ddm_ood import adm_params
from ddm_ood import unet as unet_lib
from ddm_ood.importers.state_dict import load_state_dict

# guided-diffusion's create_model: channel_mult by image size when --channel_mult is ''.
GUIDED_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                       128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def load(checkpoint_path: str, config: ml_collections.ConfigDict | None):
  """(config, flax variables) of an ADM state dict for ``config`` (required: it names the flags).

  Raises:
    ValueError: no config, a config of another family, or a state dict that does not fit it
      (`adm_params.convert_state_dict` names the keys and the field).
  """
  if config is None:
    raise ValueError('--checkpoint needs --config describing the network it was trained with '
                     '(e.g. configs/guided_256_uncond.py, configs/diffpath_celeba.py).')
  if config.model.family != 'adm':
    raise ValueError(f"--checkpoint reads improved/guided-diffusion (family 'adm') state dicts, "
                     f'but the config has model.family={config.model.family!r}.')
  state_dict = load_state_dict(checkpoint_path)
  model = unet_lib.build_model(config)
  variables = adm_params.convert_state_dict(state_dict, model, int(config.data.image_size),
                                            bool(config.model.use_new_attention_order))
  return config, variables


def improved_diffusion_config(image_size: int, channel_mult: tuple[int, ...],
                              dropout: float) -> ml_collections.ConfigDict:
  """The default config with an improved-diffusion ``UNetModel`` and DiffPath's suite.

  The network of improved-diffusion's ``create_model`` for ``--num_channels 128
  --num_res_blocks 3 --learn_sigma True`` and its defaults (attention at 16 and 8, 4 heads,
  scale-shift norm, 32 GroupNorm groups, rescale_timesteps), cosine schedule with T = 4000; scored
  with ddim10 on ID {CIFAR-10, SVHN, CelebA} x OOD {the others, CIFAR-100, DTD} (TFDS).

  Args:
    image_size: 32 or 64 (RGB).
    channel_mult: improved-diffusion's channel_mult for that size.
    dropout: the training dropout (inactive when scoring; kept for the record).
  """
  from ddm_ood import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.data.image_size = image_size
  config.data.channels = 3
  config.data.max_train_examples = 0
  m = config.model
  m.ch = 128
  m.ch_mult = tuple(channel_mult)
  m.num_res_blocks = 3
  m.attn_resolutions = (16, 8)
  m.num_heads = 4
  m.dropout = dropout
  m.num_groups = 32
  m.norm_eps = 1e-5
  m.learn_sigma = True
  m.downsample_padding = 'symmetric'
  m.rescale_timesteps = True
  # DiffPath computes in float32; the proven equality with its statistics holds in float32
  # ('auto' = bfloat16 on accelerators: faster, features differ slightly), and on GPUs / TPUs
  # only with full-precision float32 matmuls and convolutions (their default is TF32 / bf16
  # passes: 4e-3 off DiffPath's statistics on an H200, 1.2e-5 with 'highest').
  m.compute_dtype = 'float32'
  m.precision = 'highest'
  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 4000
  config.scorer.mode = 'ddim'           # DiffPath: ddim10, t = 0, 400, ..., 3600
  config.scorer.num_steps = 10
  ev = config.eval
  ev.id_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a')
  ev.ood_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a', 'tfds:cifar100',
                     'tfds:dtd')
  ev.feature_kinds = ('diffpath_6d', 'diffpath_1d', 'stein_ssim', 'stein')
  ev.num_fit = 50_000
  ev.num_test = 10_000
  return config


def guided_diffusion_config(image_size: int, num_channels: int = 256, num_res_blocks: int = 2,
                            attention_resolutions: tuple[int, ...] = (32, 16, 8),
                            num_head_channels: int = 64, num_heads: int = 4,
                            channel_mult: tuple[float, ...] | None = None,
                            dropout: float = 0.0, use_new_attention_order: bool = False,
                            noise_schedule: str = 'linear',
                            diffusion_steps: int = 1000) -> ml_collections.ConfigDict:
  """A config for a guided-diffusion ``UNetModel``, from its README's ``MODEL_FLAGS``.

  Fixed as in every released checkpoint: ``--learn_sigma True --use_scale_shift_norm True
  --resblock_updown True --class_cond False`` (class-conditional ones are refused on import);
  ``num_head_channels`` -1 is 0 here. Scored with DiffPath's ddim10 on its TFDS suite, every set
  resized through the coarsest set's size first (``data.resize_via = -1``, docs/method.md).

  Args:
    image_size: 64, 128, 256 or 512.
    num_channels, num_res_blocks, num_head_channels, num_heads, dropout,
      use_new_attention_order, noise_schedule, diffusion_steps: the flags of the same names.
    attention_resolutions: ``--attention_resolutions`` (sizes, e.g. 32,16,8).
    channel_mult: None = guided-diffusion's default for ``image_size`` (`GUIDED_CHANNEL_MULT`).
  """
  config = improved_diffusion_config(image_size, channel_mult or GUIDED_CHANNEL_MULT[image_size],
                                     dropout)
  m = config.model
  m.ch = num_channels
  m.num_res_blocks = num_res_blocks
  m.attn_resolutions = tuple(attention_resolutions)
  m.num_heads = num_heads
  m.num_head_channels = max(int(num_head_channels), 0)
  m.resblock_updown = True
  m.use_new_attention_order = use_new_attention_order
  m.rescale_timesteps = False     # guided-diffusion's default
  m.compute_dtype = 'auto'        # bfloat16 on accelerators; float32 (= the proven one) on CPU
  config.diffusion.schedule = noise_schedule
  config.diffusion.num_timesteps = diffusion_steps
  config.data.resize_via = -1
  config.scorer.batch_size = 16
  return config


__all__ = ['load', 'improved_diffusion_config', 'guided_diffusion_config', 'GUIDED_CHANNEL_MULT']
