"""Makes the DiffPath reference fixture: the official code's outputs for small, known weights.

Needs torch (``pip install torch``; CPU is enough) and a checkout of DiffPath's public code
(github clear-nus/diffpath, commit 6f92000), which is imported from ``--diffpath_dir`` and never
copied into this repository. The tests (``tests/test_diffpath_reference.py``) need neither: they
read the two files this script writes.

    python3 scripts/make_reference_fixture.py --diffpath_dir=/tmp/diffpath --out_dir=tests/fixtures

What it does:

1. Builds the official ``UNetModel`` and ``SpacedDiffusion`` with DiffPath's own
   ``create_model_and_diffusion`` and the flags of ``configs/celeba_model_config.yaml`` plus the
   defaults of ``save_test_statistics.py`` (image 32, 3 res blocks, channel_mult (1, 2, 2, 2),
   attention at 16 and 8, 4 heads, learn_sigma, scale-shift norm, dropout 0.3 (eval mode: off),
   cosine schedule, T = 4000, ``timestep_respacing='ddim10'``, rescale_timesteps, clip_denoised),
   except ``num_channels = 32`` (the least GroupNorm32 allows), so that the fixture stays small.
2. Re-initialises EVERY parameter from a seeded ``torch.Generator`` to non-zero values (the
   zero-initialised output convs included): weights ~ N(0, 1 / fan_in) (the residual-branch
   output convs that ADM zero-initialises, ``out_layers.3`` and ``proj_out``, at half that scale,
   which keeps the DDIM path of the random network from amplifying float32 rounding), biases
   ~ N(0, 0.1^2), GroupNorm scales ~ 1 + N(0, 0.2^2). Each tensor is then put on a power-of-two grid with about
   5 significant bits (``round(w / 2^e) * 2^e``), which keeps the compressed file small and the
   values exact in float32.
3. Builds a batch of 8 real 32x32 RGB images in [-1, 1] from data installable here (Fashion-MNIST
   from Debian's ``dataset-fashion-mnist``, padded 28 -> 32 with -1; GIMP texture crops;
   scikit-image LFW faces, one of them contrast-stretched into saturation), all on the uint8 grid
   ``k / 127.5 - 1``, with many exact -1 / +1 pixels so that DiffPath's clipping of x0hat is active.
4. Records the official network's eps (its first 3 output channels, called exactly as
   ``SpacedDiffusion``'s ``_WrappedModel`` calls it: the timestep as a float ``t * 1000 / T``) at the
   original timesteps t = 0, 2000 and 3999 on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z (seeded z);
   the eps path of ``ddim_reverse_sample_loop(..., clip_denoised=True, return_eps=True)`` (the eps
   re-derived from the clipped x0hat); and the statistics computed by DiffPath's OWN
   ``save_test_statistics.main()`` (run as is, with its data loader and checkpoint loader replaced
   by this batch and these weights, and mpi4py / blobfile / torchvision stubbed as they are unused
   on one CPU process), turned into the 6-D and 1-D features by ``eval_6d.load_statistics`` and
   ``eval_1d.load_statistics``.

Files written to ``--out_dir``:

``diffpath_celeba_ch32_state_dict.npz``: the torch state dict, one float32 array per key, with
torch's key names and layouts (conv OIHW, linear [out, in], attention qkv as a conv1d
[3C, C, 1] in the legacy per-head q/k/v order).

``diffpath_celeba_ch32_reference.npz``:

* ``images``: float32 [B, 32, 32, 3] NHWC in [-1, 1] (B = 8).
* ``timesteps``: int64 [3], original timesteps (0, 2000, 3999) of the eps checks.
* ``x_t``: float32 [3, B, 32, 32, 3], the network inputs at those timesteps.
* ``eps``: float32 [3, B, 32, 32, 3], the official eps (first 3 output channels) at them.
* ``ddim_timesteps``: int64 [K] (K = 10), the original timesteps of the respaced ddim10 grid.
* ``eps_path``: float32 [B, K, 32, 32, 3], ``ddim_reverse_sample_loop``'s eps per step.
* ``stats_6d``: float64 [B, 6], ``eval_6d.load_statistics`` of DiffPath's statistics file
  (eps_sum, eps_sum_sq, eps_sum_cb, deps_dt, deps_dt_sq, deps_dt_cb).
* ``stats_1d``: float64 [B], ``eval_1d.load_statistics`` (deps_dt_sq_sqrt).
* ``stat_<name>``: float64 [B], each of the 12 arrays of DiffPath's statistics file.
* ``meta``: a JSON string: DiffPath commit, every flag, torch version, seed, the image sources.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

STATE_DICT_NAME = 'diffpath_celeba_ch32_state_dict.npz'
REFERENCE_NAME = 'diffpath_celeba_ch32_reference.npz'
EPS_TIMESTEPS = (0, 2000, 3999)
NUM_CHANNELS = 32
DIFFPATH_COMMIT = '6f920001044397469849d4bced8fdd9be7afdfd1'
# configs/celeba_model_config.yaml of DiffPath, with the width reduced.
CELEBA_YAML = {
    'image_size': 32, 'num_channels': NUM_CHANNELS, 'num_res_blocks': 3, 'learn_sigma': True,
    'diffusion_steps': 4000, 'noise_schedule': 'cosine', 'class_cond': False, 'dropout': 0.3,
    'use_zero_module': True, 'clip_denoised': True,
}
FASHION_MNIST = '/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'
GIMP_PATTERNS = ('/usr/share/gimp/2.0/patterns/Stone/granite1.pat',
                 '/usr/share/gimp/2.0/patterns/Fabric/burlap.pat',
                 '/usr/share/gimp/2.0/patterns/Legacy/bluesquares.pat')


def _stub_unused_modules():
  """mpi4py, blobfile and torchvision are imported by DiffPath but unused on one CPU process."""
  mpi = types.ModuleType('mpi4py')
  comm = types.SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 1, rank=0, size=1,
                               bcast=lambda x, root=0: x)
  mpi.MPI = types.SimpleNamespace(COMM_WORLD=comm)
  sys.modules.setdefault('mpi4py', mpi)
  sys.modules.setdefault('blobfile', types.ModuleType('blobfile'))
  tv = types.ModuleType('torchvision')
  tv_ds = types.ModuleType('torchvision.datasets')
  for name in ('CelebA', 'CIFAR10', 'SVHN', 'DTD', 'CIFAR100'):
    setattr(tv_ds, name, None)
  tv.datasets = tv_ds
  tv.transforms = types.ModuleType('torchvision.transforms')
  sys.modules.setdefault('torchvision', tv)
  sys.modules.setdefault('torchvision.datasets', tv_ds)
  sys.modules.setdefault('torchvision.transforms', tv.transforms)


def _read_gimp_pattern(path: str) -> np.ndarray:
  """uint8 [H, W, 3] of a GIMP .pat file (gray repeated to RGB, alpha dropped)."""
  with open(path, 'rb') as f:
    raw = f.read()
  header_size, _, width, height, bpp = np.frombuffer(raw[:20], '>u4')
  pix = np.frombuffer(raw[header_size:header_size + width * height * bpp], np.uint8)
  pix = pix.reshape(height, width, bpp)
  if bpp in (1, 2):
    return np.repeat(pix[..., :1], 3, axis=-1)
  return pix[..., :3]


def make_images(seed: int) -> tuple[np.ndarray, list[str]]:
  """8 real images, float32 [8, 32, 32, 3] NHWC on the grid k / 127.5 - 1, and their sources."""
  from skimage.data import lfw_subset
  from skimage.transform import resize
  rng = np.random.RandomState(seed)
  out, sources = [], []
  with gzip.open(FASHION_MNIST, 'rb') as f:
    fm = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  for i in (0, 1, 2):
    img = np.pad(fm[i], 2)                       # 28 -> 32 with black (-1) borders
    out.append(np.repeat(img[..., None], 3, axis=-1))
    sources.append(f'fashion_mnist t10k[{i}] padded to 32')
  for path in GIMP_PATTERNS:
    pat = _read_gimp_pattern(path)
    y = rng.randint(0, pat.shape[0] - 32 + 1)
    x = rng.randint(0, pat.shape[1] - 32 + 1)
    out.append(pat[y:y + 32, x:x + 32])
    sources.append(f'gimp {os.path.basename(path)} crop ({y}, {x})')
  faces = lfw_subset()
  for i, gain in ((0, 1.0), (1, 2.5)):
    face = resize(faces[i], (32, 32), order=1, anti_aliasing=True)   # float in [0, 1]
    face = np.clip((face - face.mean()) * gain + face.mean(), 0, 1)  # gain 2.5 saturates
    out.append(np.repeat(np.round(face * 255).astype(np.uint8)[..., None], 3, axis=-1))
    sources.append(f'skimage lfw_subset[{i}] resized to 32, contrast x{gain}')
  images = np.stack(out).astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32), sources


def reinit_(model, seed: int) -> None:
  """Overwrites every parameter with seeded, non-zero, grid-quantised values (in place)."""
  import torch as th
  gen = th.Generator().manual_seed(seed)
  with th.no_grad():
    for name, p in model.named_parameters():
      shape = tuple(p.shape)
      z = th.randn(shape, generator=gen, dtype=th.float64)
      if p.ndim > 1:                                    # conv / linear weight
        w = z / np.sqrt(np.prod(shape[1:]))
        if name.endswith(('out_layers.3.weight', 'proj_out.weight')):
          # ADM zero-initialises these residual-branch outputs; at full scale the random
          # network's DDIM path is chaotic (float32 rounding grows ~2x per step), at half scale
          # it is not, so the fixture tests the computation rather than the rounding.
          w = 0.5 * w
      elif 'norm' in name.split('.')[-2] or name.startswith('out.0') or (
          name.endswith('in_layers.0.weight') or name.endswith('out_layers.0.weight')):
        w = 1.0 + 0.2 * z if name.endswith('weight') else 0.1 * z
      else:
        w = 0.1 * z
      w = w.numpy()
      step = 2.0 ** (np.ceil(np.log2(np.abs(w).max())) - 5)
      w = np.round(w / step) * step
      w[w == 0] = step                                  # every entry non-zero
      p.copy_(th.from_numpy(w.astype(np.float32)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--diffpath_dir', required=True, help='checkout of clear-nus/diffpath')
  parser.add_argument('--out_dir', default='tests/fixtures')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--diffpath_commit', default=DIFFPATH_COMMIT,
                      help='commit of --diffpath_dir, recorded when it has no git metadata')
  args = parser.parse_args(argv)

  import torch as th
  th.manual_seed(args.seed)
  diffpath_dir = os.path.abspath(args.diffpath_dir)
  sys.path.insert(0, diffpath_dir)
  _stub_unused_modules()
  import eval_1d
  import eval_6d
  import save_test_statistics as sts
  from improved_diffusion import dist_util
  from improved_diffusion.respace import _WrappedModel
  from improved_diffusion.script_util import (args_to_dict, create_model_and_diffusion,
                                              model_and_diffusion_defaults)
  try:
    commit = subprocess.run(['git', '-C', diffpath_dir, 'rev-parse', 'HEAD'], check=True,
                            capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = args.diffpath_commit

  # Flags exactly as save_test_statistics.py assembles them: its parser defaults, the yaml on top.
  flags = vars(sts.create_argparser().parse_args([
      '--model', 'celeba', '--batch_size', '8', '--n_ddim_steps', '10', '--dataset', 'fixture',
      '--model_path', 'fixture.pt']))
  flags.update(CELEBA_YAML)
  flags['timestep_respacing'] = f"ddim{flags['n_ddim_steps']}"
  model, diffusion = create_model_and_diffusion(
      **args_to_dict(argparse.Namespace(**flags), model_and_diffusion_defaults().keys()))
  reinit_(model, args.seed)
  model.eval()
  state_dict = {k: v.detach().cpu().numpy().astype(np.float32)
                for k, v in model.state_dict().items()}
  assert all(np.all(v != 0) for k, v in state_dict.items() if v.ndim > 1), 'zero weights left'

  images, sources = make_images(args.seed)
  x0 = th.from_numpy(images.transpose(0, 3, 1, 2).copy())       # NCHW
  b = x0.shape[0]
  t_total = flags['diffusion_steps']

  # eps at original timesteps, called as SpacedDiffusion's wrapper calls the network.
  from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
  alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule(flags['noise_schedule'], t_total))
  wrapped = _WrappedModel(model, list(range(t_total)), flags['rescale_timesteps'], t_total)
  rng = np.random.RandomState(args.seed)
  x_ts, epss = [], []
  for t in EPS_TIMESTEPS:
    z = rng.standard_normal(images.shape)
    abar = alphas_cumprod[t]
    x_t = (np.sqrt(abar) * images + np.sqrt(1 - abar) * z).astype(np.float32)
    with th.no_grad():
      out = wrapped(th.from_numpy(x_t.transpose(0, 3, 1, 2).copy()), th.tensor([t] * b))
    assert out.shape[1] == 6, out.shape
    x_ts.append(x_t)
    epss.append(out[:, :3].numpy().transpose(0, 2, 3, 1))

  # The eps path of DiffPath's DDIM inversion.
  _, eps_path = diffusion.ddim_reverse_sample_loop(
      model, x0.shape, x0, clip_denoised=True, model_kwargs=None, return_eps=True)
  eps_path = np.stack([e.numpy() for e in eps_path], 1).transpose(0, 1, 3, 4, 2)

  # DiffPath's own statistics script, run unchanged on this batch and these weights.
  sd_torch = {k: th.from_numpy(v) for k, v in state_dict.items()}
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, 'config.yaml'), 'w') as f:
      json.dump(CELEBA_YAML, f)                 # JSON is YAML
    cwd = os.getcwd()
    argv_saved = sys.argv
    sts.load_data = lambda *a, **k: [(x0.clone(), th.zeros(b))]
    sts.dist_util.setup_dist = lambda *a, **k: None
    sts.dist_util.load_state_dict = lambda *a, **k: sd_torch
    sts.dist_util.dev = lambda: th.device('cpu')
    try:
      os.chdir(tmp)
      sys.argv = ['save_test_statistics.py', '--model', 'celeba', '--config', 'config.yaml',
                  '--batch_size', str(b), '--n_ddim_steps', '10', '--dataset', 'fixture',
                  '--model_path', 'fixture.pt']
      sts.main()
      stats = dict(np.load(os.path.join(tmp, 'test_statistics_celeba_model', 'ddim10',
                                        'fixture.npz')))
    finally:
      os.chdir(cwd)
      sys.argv = argv_saved
  assert dist_util is sts.dist_util
  stats_6d = eval_6d.load_statistics(stats)
  stats_1d = eval_1d.load_statistics(stats)
  # Sanity: the same statistics from the recorded eps path.
  e = eps_path.astype(np.float64)
  d = np.diff(e, axis=1) * len(diffusion.betas)
  np.testing.assert_allclose(stats_1d, np.sqrt((d ** 2).sum((1, 2, 3, 4))), rtol=1e-5)

  meta = dict(diffpath_commit=commit, flags=flags, torch_version=th.__version__,
              seed=args.seed, eps_timesteps=list(EPS_TIMESTEPS),
              ddim_timesteps=[int(t) for t in diffusion.timestep_map], image_sources=sources,
              script='scripts/make_reference_fixture.py')
  os.makedirs(args.out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(args.out_dir, STATE_DICT_NAME), **state_dict)
  np.savez_compressed(
      os.path.join(args.out_dir, REFERENCE_NAME), images=images,
      timesteps=np.asarray(EPS_TIMESTEPS, np.int64), x_t=np.stack(x_ts), eps=np.stack(epss),
      ddim_timesteps=np.asarray(diffusion.timestep_map, np.int64), eps_path=eps_path,
      stats_6d=stats_6d, stats_1d=stats_1d,
      **{f'stat_{k}': v for k, v in stats.items()}, meta=np.asarray(json.dumps(meta)))
  sizes = {n: os.path.getsize(os.path.join(args.out_dir, n)) for n in (STATE_DICT_NAME,
                                                                        REFERENCE_NAME)}
  print(json.dumps(dict(files=sizes, params=int(sum(v.size for v in state_dict.values())),
                        ddim_timesteps=meta['ddim_timesteps'],
                        eps_abs_max=[float(np.abs(x).max()) for x in epss],
                        clipped_fraction=float(np.mean(np.abs(images) == 1)),
                        stats_1d=stats_1d.tolist()), indent=1))


if __name__ == '__main__':
  main()
