"""Makes the reference fixtures of the guided-diffusion (ADM) and diffusers network families.

Like ``scripts/make_reference_fixture.py`` (improved-diffusion / DiffPath), each official model is
built at a reduced width FROM ITS OWN CODE, every parameter is re-initialised to seeded, non-zero
values on a coarse power-of-two grid (exact in float16 and float32), and the official outputs are
recorded. The tests (``tests/test_families.py``) need neither torch nor diffusers: they read the
files written here.

Needs torch (CPU is enough) and, for ``--family=guided`` and the DiffPath statistics of both,
a copy of github openai/guided-diffusion (``--guided_dir``, imported, never copied here); for
``--family=diffusers`` the ``diffusers`` package.

    python3 scripts/make_family_fixtures.py --family=guided --guided_dir=/tmp/guided-diffusion
    python3 scripts/make_family_fixtures.py --family=diffusers --guided_dir=/tmp/guided-diffusion

Files written to ``--out_dir`` (default tests/fixtures):

``guided_adm_ch64_state_dict.npz``: guided-diffusion ``UNetModel`` (image 32, num_channels 64,
channel_mult (0.5, 1, 1), 1 res block, attention at 32, 16 and 8 with num_head_channels 16,
resblock_updown, scale-shift norm, learn_sigma, linear schedule T = 1000) with ``use_fp16``: its
state dict as ``convert_to_fp16`` leaves it (convs and linears of the torso in float16).
``guided_adm_ch64_reference.npz``: ``images`` [B, 32, 32, 3]; ``timesteps`` (0, 500, 999); ``x_t``
and ``eps`` [3, B, 32, 32, 3] of the legacy-attention-order model (first 3 output channels, the
model run in float32 on the same float16-exact weights), ``eps_new_order`` of the same weights in a
``use_new_attention_order=True`` model; ``ddim_timesteps`` (0, 100, ..., 900);
``stats_6d`` [B, 6] / ``stats_1d`` [B]: DiffPath's statistics of the eps' path of
guided-diffusion's own ``SpacedDiffusion('ddim10').ddim_reverse_sample`` (clip_denoised, eps'
re-derived from the clipped x0 exactly as DiffPath's ``ddim_reverse_sample_loop`` does);
``alphas_cumprod`` [1000]; ``meta`` (JSON: commit, flags, torch version, seed).

``diffusers_ddpm_tiny/``: a diffusers pipeline folder written by ``DDPMPipeline.save_pretrained``
(``model_index.json``, ``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors``,
``scheduler/scheduler_config.json``): ``google/ddpm-cifar10-32``'s config at widths
(32, 64, 64) and 1 layer per block. ``diffusers_ddpm_tiny_reference.npz``: as above (eps of
``UNet2DModel.forward``), the DiffPath statistics of the same ddim10 inversion run by
guided-diffusion's ``GaussianDiffusion`` on the official scheduler's betas, ``alphas_cumprod`` of
the scheduler, and ``alphas_cumprod_<schedule>`` of ``DDPMScheduler`` for 'linear' (1e-4, 0.02),
'scaled_linear' (0.00085, 0.012) and 'squaredcos_cap_v2'.

``diffusers_options_tiny/``: a flat model folder (``UNet2DModel.save_pretrained`` plus the
scheduler's ``scheduler_config.json``) whose every option differs from the DDPM family's:
scale-shift time modulation, resnet down/upsamplers, ``attention_head_dim`` 8, ``mish``,
``learned`` time embedding of dimension 48, ``flip_sin_to_cos``, ``freq_shift`` 0,
``center_input_sample``, ``mid_block_scale_factor`` 1.5, a mid attention without GroupNorm,
``out_channels`` 6, a ``DDIMScheduler`` with 'scaled_linear' betas and ``v_prediction``.
``diffusers_options_tiny_reference.npz``: ``x_t``, ``v`` (the raw official output, first 3
channels) and ``eps`` = sqrt(abar) v + sqrt(1 - abar) x_t with the scheduler's alphas_cumprod,
as its ``step`` converts v.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EPS_TIMESTEPS = (0, 500, 999)
NUM_IMAGES = 4
DDIM_STEPS = 10
GUIDED_COMMIT = '22e0df8183507e13a7813f8d38d51b072ca1e67c'
GUIDED_FLAGS = dict(image_size=32, in_channels=3, model_channels=64, out_channels=6,
                    num_res_blocks=1, attention_resolutions=(1, 2, 4), dropout=0.0,
                    channel_mult=(0.5, 1, 1), num_classes=None, use_fp16=False, num_heads=4,
                    num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True,
                    resblock_updown=True, use_new_attention_order=False)
DDPM_UNET = dict(sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
                 time_embedding_type='positional', freq_shift=1, flip_sin_to_cos=False,
                 down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                 block_out_channels=(32, 64, 64), layers_per_block=1, mid_block_scale_factor=1,
                 downsample_padding=0, act_fn='silu', attention_head_dim=None,
                 norm_num_groups=32, norm_eps=1e-6)
OPTIONS_UNET = dict(sample_size=16, in_channels=3, out_channels=6, center_input_sample=True,
                    time_embedding_type='learned', num_train_timesteps=1000,
                    time_embedding_dim=48, freq_shift=0, flip_sin_to_cos=True,
                    down_block_types=('AttnDownBlock2D', 'AttnDownBlock2D'),
                    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D'),
                    block_out_channels=(16, 32), layers_per_block=1, mid_block_scale_factor=1.5,
                    downsample_padding=1, downsample_type='resnet', upsample_type='resnet',
                    dropout=0.1, act_fn='mish', attention_head_dim=8, norm_num_groups=8,
                    attn_norm_num_groups=None, norm_eps=1e-5,
                    resnet_time_scale_shift='scale_shift', add_attention=True)
OPTIONS_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule='scaled_linear', prediction_type='v_prediction',
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def reinit_(model, seed: int, halve=('out_layers.3.weight', 'proj_out.weight')) -> None:
  """Every parameter seeded, non-zero, on a grid of ~5 significant bits (exact in float16).

  Weights ~ N(0, 1 / fan_in) (``halve``: the residual-branch outputs, at half scale so that the
  random network stays tame), GroupNorm scales 1 + N(0, 0.2^2), biases and embeddings
  N(0, 0.1^2).
  """
  import torch as th
  gen = th.Generator().manual_seed(seed)
  with th.no_grad():
    for name, p in model.named_parameters():
      z = th.randn(tuple(p.shape), generator=gen, dtype=th.float64)
      is_norm = 'norm' in name.split('.')[-2] or name.startswith('out.0') or name.endswith(
          ('in_layers.0.weight', 'out_layers.0.weight'))
      if is_norm:
        w = 1.0 + 0.2 * z if name.endswith('weight') else 0.1 * z
      elif p.ndim > 1 and not name.startswith('time_proj'):
        w = z / np.sqrt(np.prod(p.shape[1:])) * (0.5 if name.endswith(halve) else 1.0)
      else:
        w = 0.1 * z
      w = w.numpy()
      step = 2.0 ** (np.ceil(np.log2(np.abs(w).max())) - 5)
      w = np.round(w / step) * step
      w[w == 0] = step
      p.copy_(th.from_numpy(w.astype(np.float32)))


def images_and_noise(seed: int, size: int) -> tuple[np.ndarray, list[str], np.random.RandomState]:
  """The first NUM_IMAGES real images of make_reference_fixture.py, resized to ``size``."""
  sys.path.insert(0, HERE)
  import make_reference_fixture as ref  # pylint: disable=g-import-not-at-top
  images, sources = ref.make_images(seed)
  images, sources = images[[0, 3, 6, 7]], [sources[i] for i in (0, 3, 6, 7)]
  if size != images.shape[1]:
    f = images.shape[1] // size
    images = images.reshape(NUM_IMAGES, size, f, size, f, 3).mean((2, 4))
    images = np.round((images + 1) * 127.5) / 127.5 - 1
  return images.astype(np.float32), sources, np.random.RandomState(seed)


def eps_at_timesteps(forward, images, alphas_cumprod, rng):
  """(x_t, outputs) [len(EPS_TIMESTEPS), B, H, W, C] of ``forward(x_t NHWC, t) -> NHWC``."""
  x_ts, outs = [], []
  for t in EPS_TIMESTEPS:
    abar = float(alphas_cumprod[t])
    z = rng.standard_normal(images.shape)
    x_t = (np.sqrt(abar) * images + np.sqrt(1 - abar) * z).astype(np.float32)
    x_ts.append(x_t)
    outs.append(forward(x_t, t))
  return np.stack(x_ts), np.stack(outs)


def diffpath_statistics(model_fn, betas, images, guided_dir, learn_sigma=False):
  """DiffPath's statistics of the ddim10 inversion by guided-diffusion's own GaussianDiffusion.

  ``model_fn(x NCHW, t) -> NCHW`` (eps, then the variance channels when ``learn_sigma``).
  Returns (stats_6d [B, 6], stats_1d [B], ddim timesteps [K]) in float64, eps' re-derived from
  the clipped x0 with the diffusion's float32-extracted coefficients as DiffPath's
  ``ddim_reverse_sample_loop`` does.
  """
  import torch as th
  sys.path.insert(0, os.path.abspath(guided_dir))
  from guided_diffusion import gaussian_diffusion as gd  # pylint: disable=g-import-not-at-top
  from guided_diffusion import respace  # pylint: disable=g-import-not-at-top
  extract = gd._extract_into_tensor  # pylint: disable=protected-access
  diffusion = respace.SpacedDiffusion(
      use_timesteps=respace.space_timesteps(len(betas), f'ddim{DDIM_STEPS}'),
      betas=np.asarray(betas, np.float64), model_mean_type=gd.ModelMeanType.EPSILON,
      model_var_type=(gd.ModelVarType.LEARNED_RANGE if learn_sigma
                      else gd.ModelVarType.FIXED_SMALL),
      loss_type=gd.LossType.MSE)
  x = th.from_numpy(images.transpose(0, 3, 1, 2).copy())
  b = x.shape[0]
  path = []
  with th.no_grad():
    for k in range(DDIM_STEPS):
      t = th.tensor([k] * b)
      out = diffusion.ddim_reverse_sample(model_fn, x, t, clip_denoised=True)
      eps = (extract(diffusion.sqrt_recip_alphas_cumprod, t, x.shape) * x
             - out['pred_xstart']) / extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x.shape)
      path.append(eps.numpy().astype(np.float64))
      x = out['sample']
  e = np.stack(path, 1)                            # [B, K, C, H, W]
  d = np.diff(e, axis=1) * len(diffusion.betas)
  stats = np.stack([(v ** p).sum((1, 2, 3, 4)) for v in (e, d) for p in (1, 2, 3)], 1)
  return stats, np.sqrt(stats[:, 4]), np.asarray(sorted(diffusion.timestep_map), np.int64)


def _nchw(fn):
  """NHWC numpy in, NHWC numpy out, around ``fn(x NCHW torch, t) -> NCHW torch``."""
  import torch as th

  def call(x_t, t):
    with th.no_grad():
      out = fn(th.from_numpy(x_t.transpose(0, 3, 1, 2).copy()), th.tensor([t] * x_t.shape[0]))
    return out[:, :3].numpy().transpose(0, 2, 3, 1)
  return call


def _commit(path: str, default: str) -> str:
  try:
    return subprocess.run(['git', '-C', path, 'rev-parse', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return default


def make_guided(args) -> dict:
  import torch as th
  sys.path.insert(0, os.path.abspath(args.guided_dir))
  from guided_diffusion import gaussian_diffusion  # pylint: disable=g-import-not-at-top
  from guided_diffusion import unet as guided_unet  # pylint: disable=g-import-not-at-top
  UNetModel = guided_unet.UNetModel  # pylint: disable=invalid-name
  th.manual_seed(args.seed)
  model = UNetModel(**GUIDED_FLAGS)
  reinit_(model, args.seed)
  model.eval()
  new_order = UNetModel(**{**GUIDED_FLAGS, 'use_new_attention_order': True})
  new_order.load_state_dict(model.state_dict())
  new_order.eval()
  fp16 = UNetModel(**{**GUIDED_FLAGS, 'use_fp16': True})
  fp16.load_state_dict(model.state_dict())
  fp16.convert_to_fp16()
  state_dict = {k: v.numpy() for k, v in fp16.state_dict().items()}
  assert any(v.dtype == np.float16 for v in state_dict.values())
  assert all(np.array_equal(v.astype(np.float32), model.state_dict()[k].numpy())
             for k, v in state_dict.items()), 'weights not exact in float16'
  betas = gaussian_diffusion.get_named_beta_schedule('linear', 1000)
  alphas_cumprod = np.cumprod(1.0 - betas)
  images, sources, rng = images_and_noise(args.seed, GUIDED_FLAGS['image_size'])
  x_t, eps = eps_at_timesteps(_nchw(model), images, alphas_cumprod, rng)
  eps_new = np.stack([_nchw(new_order)(x, t) for x, t in zip(x_t, EPS_TIMESTEPS)])
  assert np.abs(eps_new - eps).max() > 1e-3, 'the attention order should matter'
  stats_6d, stats_1d, ddim_ts = diffpath_statistics(model, betas, images, args.guided_dir,
                                                    learn_sigma=True)
  meta = dict(guided_commit=_commit(args.guided_dir, GUIDED_COMMIT), flags=GUIDED_FLAGS,
              torch_version=th.__version__, seed=args.seed, image_sources=sources,
              script='scripts/make_family_fixtures.py')
  out = os.path.join(args.out_dir, 'guided_adm_ch64')
  np.savez_compressed(out + '_state_dict.npz', **state_dict)
  np.savez_compressed(out + '_reference.npz', images=images, timesteps=np.asarray(EPS_TIMESTEPS),
                      x_t=x_t, eps=eps, eps_new_order=eps_new, ddim_timesteps=ddim_ts,
                      stats_6d=stats_6d, stats_1d=stats_1d, alphas_cumprod=alphas_cumprod,
                      meta=np.asarray(json.dumps(meta)))
  return dict(params=int(sum(v.size for v in state_dict.values())),
              files={p: os.path.getsize(out + p) for p in ('_state_dict.npz', '_reference.npz')})


def make_diffusers(args) -> dict:
  import diffusers
  import torch as th
  from diffusers import DDIMScheduler, DDPMPipeline  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMScheduler, UNet2DModel  # pylint: disable=g-import-not-at-top
  th.manual_seed(args.seed)
  report = {}
  # 1. The DDPM family's layout as a pipeline folder.
  unet = UNet2DModel(**DDPM_UNET)
  reinit_(unet, args.seed, halve=('conv2.weight', 'to_out.0.weight'))
  unet.eval()
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                            beta_schedule='linear', variance_type='fixed_large',
                            clip_sample=True)
  folder = os.path.join(args.out_dir, 'diffusers_ddpm_tiny')
  DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
  abar = scheduler.alphas_cumprod.numpy()
  images, sources, rng = images_and_noise(args.seed, DDPM_UNET['sample_size'])
  forward = lambda x, t: unet(x, t).sample  # noqa: E731
  x_t, eps = eps_at_timesteps(_nchw(forward), images, abar, rng)
  stats_6d, stats_1d, ddim_ts = diffpath_statistics(forward, scheduler.betas.numpy(), images,
                                                    args.guided_dir)
  schedules = {}
  for name, kw in (('linear', dict(beta_start=1e-4, beta_end=0.02)),
                   ('scaled_linear', dict(beta_start=0.00085, beta_end=0.012)),
                   ('squaredcos_cap_v2', {})):
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw)
    schedules[f'alphas_cumprod_{name}'] = s.alphas_cumprod.numpy()
  meta = dict(diffusers_version=diffusers.__version__, torch_version=th.__version__,
              seed=args.seed, unet=DDPM_UNET, image_sources=sources,
              guided_commit=_commit(args.guided_dir, GUIDED_COMMIT),
              script='scripts/make_family_fixtures.py')
  np.savez_compressed(folder + '_reference.npz', images=images,
                      timesteps=np.asarray(EPS_TIMESTEPS), x_t=x_t, eps=eps,
                      ddim_timesteps=ddim_ts, stats_6d=stats_6d, stats_1d=stats_1d,
                      alphas_cumprod=abar, **schedules, meta=np.asarray(json.dumps(meta)))
  report['ddpm'] = int(sum(p.numel() for p in unet.parameters()))
  # 2. Every other option, as a flat model folder.
  unet = UNet2DModel(**OPTIONS_UNET)
  reinit_(unet, args.seed + 1, halve=('conv2.weight', 'to_out.0.weight'))
  unet.eval()
  scheduler = DDIMScheduler(**OPTIONS_SCHEDULER)
  folder = os.path.join(args.out_dir, 'diffusers_options_tiny')
  unet.save_pretrained(folder)
  scheduler.save_config(folder)
  abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
  images, _, rng = images_and_noise(args.seed, OPTIONS_UNET['sample_size'])
  x_t, v = eps_at_timesteps(_nchw(lambda x, t: unet(x, t).sample), images, abar, rng)
  a = np.sqrt(abar[list(EPS_TIMESTEPS)])[:, None, None, None, None]
  eps = (a * v + np.sqrt(1 - a ** 2) * x_t).astype(np.float32)
  meta = dict(diffusers_version=diffusers.__version__, torch_version=th.__version__,
              seed=args.seed + 1, unet=OPTIONS_UNET, scheduler=OPTIONS_SCHEDULER,
              script='scripts/make_family_fixtures.py')
  np.savez_compressed(folder + '_reference.npz', timesteps=np.asarray(EPS_TIMESTEPS), x_t=x_t,
                      v=v, eps=eps, alphas_cumprod=abar, meta=np.asarray(json.dumps(meta)))
  report['options'] = int(sum(p.numel() for p in unet.parameters()))
  return report


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--family', choices=('guided', 'diffusers'), required=True)
  parser.add_argument('--guided_dir', required=True, help='a copy of openai/guided-diffusion')
  parser.add_argument('--out_dir', default=os.path.join(os.path.dirname(HERE), 'tests',
                                                        'fixtures'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  report = make_guided(args) if args.family == 'guided' else make_diffusers(args)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
