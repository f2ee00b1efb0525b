"""guided-diffusion's 256x256 model (552M parameters) in ddm_ood vs its own PyTorch code, one run.

  # GPU (what the lead runs on the device; guided-diffusion's code copied to an ignored folder):
  python benchmarks/family_bench.py --guided_dir=.peers/guided-diffusion
  # CPU, the ddm_ood scorer only (no torch needed), a small batch:
  python benchmarks/family_bench.py --skip_torch --batch=1 --num_steps=10
  # CPU smoke test of the whole script at a reduced width (seconds):
  python benchmarks/family_bench.py --guided_dir=... --num_channels=32 --batch=2 --num_steps=2

One JSON line. The network is ``configs/guided_256_uncond.py`` (``--num_channels`` reduces the
width for smoke tests), with random non-zero weights: drawn in numpy (``--skip_torch``), or drawn
on the device in guided-diffusion's own ``UNetModel`` (``--guided_dir``, imported, never copied;
torch needed, diffusers not) and converted with ddm_ood's importer, so both sides compute the
same function (``max_abs_eps_diff`` at t = 500; float32 on
CPU, each side's 16-bit type on an accelerator, so there it is a precision figure, not a bug).

Timed, interleaved for ``--rounds`` rounds after a warm-up (medians reported):

* ``ddm_ood_scorer``: ``jax.jit(make_trajectory_scorer(..., ('diffpath_6d', 'diffpath_1d')))``,
  DiffPath's ddim inversion with K = ``--num_steps`` (``config.model.compute_dtype`` 'auto':
  bfloat16 on accelerators, float32 on CPU);
* ``ddm_ood_forward``: the network alone, one call on ``--batch`` images;
* ``torch_forward``: guided-diffusion's ``UNetModel`` forward, ``convert_to_fp16`` on CUDA (as its
  samplers run it) and float32 on CPU, under ``torch.no_grad``;
* ``torch_diffpath``: the same K-step inversion with guided-diffusion's own
  ``SpacedDiffusion('ddimK').ddim_reverse_sample`` (clip_denoised), as DiffPath scores.

Also: the network's GFLOP per image (`ddm_ood.flops.count_flops`, the one FLOP count), the
measured matmul peak of the same device (`benchmarks/peak.py`: bfloat16 8192^3 on accelerators,
float32 2048^2 on CPU) and each side's achieved fraction of it, compile times, the peak RSS of this process and the
device's peak memory. Not a test: compare only figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import peak as peak_lib  # noqa: E402
from ddm_ood import flops as flops_lib  # noqa: E402


def images(n: int, size: int) -> np.ndarray:
  """Smooth gradients and noise, float32 [n, size, size, 3] in [-1, 1]."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  out = []
  for i in range(n):
    a = rng.uniform(-1, 1, (3, 3))
    smooth = np.stack([a[c, 0] + a[c, 1] * xx + a[c, 2] * yy for c in range(3)], -1) / 2
    out.append(smooth if i % 2 == 0 else rng.uniform(-1, 1, (size, size, 3)))
  return np.clip(np.stack(out), -1, 1).astype(np.float32)


def torch_model(args, config, dev):
  """guided-diffusion's UNetModel with the config's flags on ``dev``, random non-zero weights.

  Built on the meta device and initialised on ``dev`` (seconds for 552M parameters on a GPU):
  weights N(0, 1 / fan_in) (the residual branches' zero-initialised output convs at half that),
  GroupNorm scales 1 + N(0, 0.2^2), biases N(0, 0.1^2).
  """
  import torch as th  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.guided_dir))
  from guided_diffusion import unet as guided_unet  # pylint: disable=g-import-not-at-top
  m, size = config.model, config.data.image_size
  with th.device('meta'):
    model = guided_unet.UNetModel(
        image_size=size, in_channels=3, model_channels=m.ch, out_channels=6,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(size // r for r in m.attn_resolutions), dropout=0.0,
        channel_mult=tuple(m.ch_mult), num_heads=m.num_heads,
        num_head_channels=m.num_head_channels or -1, use_scale_shift_norm=True,
        resblock_updown=m.resblock_updown, use_new_attention_order=m.use_new_attention_order)
  model = model.to_empty(device=dev)
  gen = th.Generator(device=dev).manual_seed(0)
  with th.no_grad():
    for name, p in model.named_parameters():
      z = th.randn(p.shape, generator=gen, device=dev)
      is_norm = 'norm' in name.split('.')[-2] or name.startswith('out.0') or name.endswith(
          ('in_layers.0.weight', 'out_layers.0.weight'))
      if is_norm and name.endswith('weight'):
        p.copy_(1 + 0.2 * z)
      elif p.ndim > 1:
        half = name.endswith(('out_layers.3.weight', 'proj_out.weight'))
        p.copy_(z * (0.5 if half else 1.0) / float(np.prod(p.shape[1:])) ** 0.5)
      else:
        p.copy_(0.1 * z)
  return model.eval()


def time_rounds(fns: dict, rounds: int) -> dict:
  """{name: median seconds}: each fn run once per round, the names interleaved."""
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--guided_dir', default='', help='copy of openai/guided-diffusion')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'guided_256_uncond.py'))
  parser.add_argument('--num_channels', type=int, default=0, help='0 = the config\'s (256)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--num_steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=2)
  args = parser.parse_args(argv)
  if not args.skip_torch and not args.guided_dir:
    parser.error('--guided_dir is needed for the PyTorch side (or pass --skip_torch)')

  import importlib.util  # pylint: disable=g-import-not-at-top
  from ddm_ood import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  from ddm_ood import schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  from ddm_ood import unet  # pylint: disable=g-import-not-at-top
  from ddm_ood import adm_params  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.num_channels:
    config.model.ch = args.num_channels
  config.scorer.mode, config.scorer.num_steps = 'ddim', args.num_steps
  backend = jax.default_backend()
  model = unet.build_model(config)
  size = config.data.image_size
  report = dict(config=os.path.relpath(args.config, ROOT), backend=backend,
                device=str(jax.devices()[0]), jax=jax.__version__, batch=args.batch,
                num_steps=args.num_steps, compute_dtype=jnp.dtype(model.dtype).name,
                loadavg=os.getloadavg())

  t0 = time.perf_counter()
  if args.skip_torch:
    from tests.train_helpers import random_params  # pylint: disable=g-import-not-at-top
    params = random_params(model, size)
    tmodel = None
  else:
    import torch as th  # pylint: disable=g-import-not-at-top
    dev = th.device('cuda' if th.cuda.is_available() else 'cpu')
    tmodel = torch_model(args, config, dev)
    state_dict = {k: v.cpu().numpy() for k, v in tmodel.state_dict().items()}
    params = adm_params.convert_state_dict(state_dict, model, size,
                                           bool(config.model.use_new_attention_order))
    del state_dict
    report['torch'] = th.__version__
  params = jax.device_put(params)
  report['params'] = unet.param_count(params)
  report['setup_s'] = round(time.perf_counter() - t0, 1)

  x = images(args.batch, size)
  xj = jnp.asarray(x)
  ids = jnp.arange(args.batch, dtype=jnp.int32)
  sched = schedule_lib.schedule_for(config.diffusion)
  t_mid = jnp.full((args.batch,), config.diffusion.num_timesteps // 2, jnp.int32)
  forward = jax.jit(model.apply)
  flop_per_image = flops_lib.count_flops(model.apply, params, xj[:1], t_mid[:1])
  report['network_gflop_per_image'] = round(flop_per_image / 1e9, 1)
  t0 = time.perf_counter()
  jax.block_until_ready(forward(params, xj, t_mid))
  report['forward_compile_s'] = round(time.perf_counter() - t0, 1)
  score = jax.jit(scorer_lib.make_trajectory_scorer(model.apply, sched, config.scorer,
                                                    ('diffpath_6d', 'diffpath_1d')))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  feats = jax.block_until_ready(score(params, xj, ids, key))['features']
  report['scorer_compile_s'] = round(time.perf_counter() - t0, 1)

  fns = {'ddm_ood_scorer': lambda: jax.block_until_ready(score(params, xj, ids, key)),
         'ddm_ood_forward': lambda: jax.block_until_ready(forward(params, xj, t_mid))}
  if tmodel is not None:
    fns.update(torch_side(args, config, tmodel, x, report, forward(params, xj, t_mid)))
  secs = time_rounds(fns, args.rounds)
  peak = peak_lib.matmul_peak()
  report.update(peak)
  for name, sec in secs.items():
    evals = args.num_steps if name.endswith(('scorer', 'diffpath')) else 1
    report[f'{name}_images_per_s'] = round(args.batch / sec, 3)
    report[f'{name}_fraction_of_peak'] = round(
        peak_lib.rates(evals * args.batch * flop_per_image, sec, peak)['fraction_of_peak'], 3)
  if 'torch_diffpath' in secs:
    report['scorer_speedup_vs_torch'] = round(secs['torch_diffpath'] / secs['ddm_ood_scorer'], 2)
    report['forward_speedup_vs_torch'] = round(secs['torch_forward'] / secs['ddm_ood_forward'], 2)
  report['features_finite'] = bool(all(np.isfinite(np.asarray(v)).all() for v in feats.values()))
  report['max_rss_gb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    report['device_peak_gb'] = round(stats['peak_bytes_in_use'] / 2 ** 30, 2)
  print(json.dumps(report))


def torch_side(args, config, tmodel, x, report, eps_jax) -> dict:
  """The PyTorch timing closures (and the eps agreement of both sides at t = T / 2)."""
  import torch as th  # pylint: disable=g-import-not-at-top
  from guided_diffusion import gaussian_diffusion as gd  # pylint: disable=g-import-not-at-top
  from guided_diffusion import respace  # pylint: disable=g-import-not-at-top
  dev = next(tmodel.parameters()).device
  cuda = dev.type == 'cuda'
  if not cuda:
    th.set_num_threads(os.cpu_count() or 1)
  if cuda:
    tmodel.convert_to_fp16()   # guided-diffusion's use_fp16: the torso in float16
  xt = th.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
  t_mid = th.full((x.shape[0],), config.diffusion.num_timesteps // 2, device=dev)
  sync = th.cuda.synchronize if cuda else (lambda: None)

  def forward():
    with th.no_grad():
      out = tmodel(xt, t_mid)
    sync()
    return out

  eps_torch = forward()[:, :3].float().cpu().numpy().transpose(0, 2, 3, 1)
  report['max_abs_eps_diff'] = float(np.abs(eps_torch - np.asarray(eps_jax)).max())
  t = config.diffusion.num_timesteps
  diffusion = respace.SpacedDiffusion(
      use_timesteps=respace.space_timesteps(t, f'ddim{args.num_steps}'),
      betas=gd.get_named_beta_schedule(config.diffusion.schedule, t),
      model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
      loss_type=gd.LossType.MSE)

  def diffpath():
    h = xt
    with th.no_grad():
      for k in range(args.num_steps):
        h = diffusion.ddim_reverse_sample(tmodel, h, th.full((x.shape[0],), k, device=dev),
                                          clip_denoised=True)['sample']
    sync()
    return h

  t0 = time.perf_counter()
  diffpath()
  report['torch_warmup_s'] = round(time.perf_counter() - t0, 1)
  return {'torch_diffpath': diffpath, 'torch_forward': forward}


if __name__ == '__main__':
  main()
