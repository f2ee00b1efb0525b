"""ddm_ood's ddim10 DiffPath scorer vs DiffPath's own PyTorch scorer, same CPU, one run (one JSON).

  pip install -e '.[convert]'     # torch, for the peer only
  python benchmarks/peer_bench.py --diffpath_dir=/path/to/diffpath [--batch=8] [--repeats=3]

The peer is DiffPath's official code (github clear-nus/diffpath, imported from
``--diffpath_dir``, never copied here): ``create_model_and_diffusion`` with the CelebA flags
(52.5M parameters at ``--num_channels=128``), randomly re-initialised to non-zero values as in
``scripts/make_reference_fixture.py``, scored as ``save_test_statistics.py`` does:
``ddim_reverse_sample_loop(..., clip_denoised=True, return_eps=True)`` under ``torch.no_grad`` with
``torch.set_num_threads(cores)``, then its numpy statistics. ddm_ood converts the same state dict
with `ddm_ood.convert` and runs ``jax.jit(make_trajectory_scorer(..., ('diffpath_6d',
'diffpath_1d')))`` with ``configs/diffpath_celeba.py`` (mode ddim, K = 10), the batch sharded over
every core as host devices (`ddm_ood.cpu_devices`, ``DDM_OOD_CPU_DEVICES`` overrides). Same images
(real ones, from `make_reference_fixture.make_images`, tiled to ``--batch``); the 6-D features
of both are checked to agree (max relative error, column-scaled, reported).

Printed: images/s of both and their ratio (ddm_ood / DiffPath; the target is >= 1.0), the
machine's float32 matmul GFLOP/s (numpy, 2048^2) and the backend's matmul peak (`peak.py`), the
network's GFLOP per forward and the scorer's per image (`ddm_ood.flops`: K forwards) and the
fraction of the peak each scorer achieves, the load average, torch / jax versions. Not a
test; timings move with the machine and its load, so compare only the ratio of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402


def _load_fixture_script():
  path = os.path.join(ROOT, 'scripts', 'make_reference_fixture.py')
  spec = importlib.util.spec_from_file_location('make_reference_fixture', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
  a @ a
  t = time.perf_counter()
  for _ in range(reps):
    a @ a
  return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def diffpath_stats(eps_list) -> np.ndarray:
  """DiffPath's 6-D statistics (save_test_statistics.py's formulas, numpy) [B, 6]."""
  eps = np.array([e.cpu().numpy() for e in eps_list]).transpose(1, 0, 2, 3, 4)
  d = np.diff(eps, axis=1) * len(eps_list)
  ax = (1, 2, 3, 4)
  return np.column_stack([eps.sum(ax), (eps ** 2).sum(ax), (eps ** 3).sum(ax),
                          d.sum(ax), (d ** 2).sum(ax), (d ** 3).sum(ax)])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--diffpath_dir', required=True, help='checkout of clear-nus/diffpath')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num_channels', type=int, default=128,
                      help='UNet width (128 = the published 52.5M-parameter CelebA network)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  from ddm_ood import compile_cache
  from ddm_ood import cpu_devices
  from ddm_ood import flops as flops_lib
  from ddm_ood import host_malloc
  cpu_devices.configure(divides=(args.batch,))
  import jax
  import peak  # pylint: disable=g-import-not-at-top
  compile_cache.configure()
  import torch as th

  from configs import diffpath_celeba
  from ddm_ood import convert
  from ddm_ood import schedule as schedule_lib
  from ddm_ood import scorer as scorer_lib
  from ddm_ood import sharding
  from ddm_ood import unet as unet_lib

  fixture = _load_fixture_script()
  sys.path.insert(0, os.path.abspath(args.diffpath_dir))
  fixture._stub_unused_modules()  # pylint: disable=protected-access
  from improved_diffusion.script_util import create_model_and_diffusion

  cores = cpu_devices.available_cores()
  th.set_num_threads(cores)
  flags = dict(fixture.CELEBA_YAML, num_channels=args.num_channels, num_heads=4,
               num_heads_upsample=-1, attention_resolutions='16,8', sigma_small=False,
               timestep_respacing='ddim10', use_kl=False, predict_xstart=False,
               rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
               use_scale_shift_norm=True)
  flags.pop('clip_denoised')
  model_t, diffusion = create_model_and_diffusion(**flags)
  fixture.reinit_(model_t, args.seed)
  model_t.eval()
  state_dict = {k: v.detach().numpy().astype(np.float32) for k, v in model_t.state_dict().items()}

  images, _ = fixture.make_images(args.seed)
  images = np.resize(images, (args.batch,) + images.shape[1:]).astype(np.float32)
  x0 = th.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def peer():
    with th.no_grad():
      _, eps = diffusion.ddim_reverse_sample_loop(model_t, x0.shape, x0, clip_denoised=True,
                                                  model_kwargs=None, return_eps=True)
    return diffpath_stats(eps)

  config = diffpath_celeba.get_config()
  config.model.ch = args.num_channels
  model = unet_lib.build_model(config)
  variables = convert.convert_state_dict(state_dict, model, int(config.data.image_size))
  sched = schedule_lib.schedule_for(config.diffusion)
  config.scorer.chunk = 0
  mesh = sharding.data_mesh()
  xs = sharding.global_batch_from_local(images, mesh)
  ids = sharding.global_batch_from_local(np.arange(args.batch, dtype=np.int32), mesh)
  params = sharding.replicate(variables, mesh)
  fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t), sched,
                                                 config.scorer, ('diffpath_6d', 'diffpath_1d')))
  key = jax.random.key(0)
  t = time.perf_counter()
  compiled = fn.lower(params, xs, ids, key).compile()
  compile_s = time.perf_counter() - t

  def ours():
    out = jax.block_until_ready(compiled(params, xs, ids, key))
    return np.asarray(out['features']['diffpath_6d'])

  def timed(f):
    f()   # warm
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      out = f()
    return (time.perf_counter() - t0) / args.repeats, out

  ours_s, ours_f = timed(ours)
  peer_s, peer_f = timed(peer)
  # Network FLOPs per forward at batch 1, and of the whole scorer call (K = num_steps forwards
  # per image, the peer the same).
  forward_flops = flops_lib.count_flops(model.apply, variables, images[:1],
                                        np.zeros((1,), np.int32))
  total_flops = flops_lib.count_flops(fn, params, xs, ids, key)
  matmul = matmul_gflops()
  measured = peak.matmul_peak()
  floor = 1e-3 * np.abs(peer_f).max(axis=0)
  rel = float(np.max(np.abs(ours_f - peer_f) / np.maximum(np.abs(peer_f), floor)))
  result = {
      'batch': args.batch, 'repeats': args.repeats, 'num_channels': args.num_channels,
      'params': int(sum(v.size for v in state_dict.values())),
      'ddm_ood_images_per_s': args.batch / ours_s, 'diffpath_images_per_s': args.batch / peer_s,
      'ratio_ddm_ood_over_diffpath': peer_s / ours_s,
      'ddm_ood_compile_s': compile_s, 'jax_devices': jax.device_count(), 'torch_threads': cores,
      'features_max_rel_err': rel, 'matmul_gflops_per_s': matmul,
      'network_gflop_per_forward': forward_flops / 1e9,
      'scorer_gflop_per_image': total_flops / args.batch / 1e9, **measured,
      'ddm_ood_fraction_of_peak': peak.rates(total_flops, ours_s, measured)['fraction_of_peak'],
      'diffpath_fraction_of_peak': peak.rates(total_flops, peer_s, measured)['fraction_of_peak'],
      'loadavg': os.getloadavg(), 'torch_version': th.__version__,
      'jax_version': jax.__version__,
      'malloc': host_malloc.active() or 'system',  # both scorers share it
  }
  print(json.dumps(result, indent=1))
  if rel > 1e-2:
    raise SystemExit(f'ddm_ood and DiffPath features disagree (max rel err {rel:.3g}).')


if __name__ == '__main__':
  from ddm_ood import host_malloc
  host_malloc.maybe_reexec()
  main()
