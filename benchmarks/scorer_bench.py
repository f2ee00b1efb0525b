"""Throughput of the compiled trajectory scorer vs a peer-style per-timestep loop (prints one JSON).

  python benchmarks/scorer_bench.py [--config=configs/fashion_mnist.py] [--batches=64,256]
      [--chunks=8] [--skip_flags]

* ``scorer``: ``jax.jit(make_trajectory_scorer(...))``, forward mode, 'stein_ssim', K = 10: all K
  timesteps in one network call, SSIM and power sums on device, only [B, 6] + [B, K, 3] returned.
* ``scorer_chunk_images_per_s``: the same scorer with ``config.scorer.chunk`` = each of
  ``--chunks`` (images per ``lax.map`` step; checked to give the same features).
* ``peer_loop``: one jitted network call per timestep, ``np.asarray`` after each (host round trip),
  SSIM (skimage, per image) and power sums in numpy.
* achieved FLOP/s of the scorer (XLA cost analysis / wall time) vs the measured float32 matmul
  FLOP/s (jitted 2048 x 2048 and numpy), and the UNet forward (64 x 28 x 28 x 1) under several
  XLA CPU flags, each run in a fresh subprocess, checked for equal outputs.

``--compare_devices``: instead of the above, the scorer sharded over the ('data',) mesh in the
four set-ups of `core_modes` (pinned to one core; one device on every core; one device per core,
`ddm_ood.cpu_devices`; the same on glibc malloc instead of tcmalloc), each in a fresh subprocess
of this one run: images/s, core usage ((user + sys CPU time) / wall), achieved GFLOP/s and the
speed-ups, features checked equal.

``--throughput``: only the compiled scorer (no peer, no flag variants), for accelerators: for
each of ``--variants`` (';'-separated ``model`` overrides, e.g.
``compute_dtype=float32,precision=highest;compute_dtype=bfloat16``) images/s at ``--batches``
(first value) with ``--mode`` and ``--kinds``, FLOPs per image and the fraction of the backend's
matmul peak (`peak.py`: bfloat16 on accelerators), and the features' largest difference from
the first variant (column-scaled).

FLOPs: `ddm_ood.flops` (every network call of the K-step trajectory and the ``lax.map`` chunks
counted; XLA's cost analysis counts a loop body once). Compilation goes through the persistent
cache (`ddm_ood.compile_cache`). Not a test: timings depend on the machine and its load
(reported as ``loadavg``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import core_modes  # noqa: E402
import peak  # noqa: E402
from ddm_ood import compile_cache  # noqa: E402
from ddm_ood import flops as flops_lib  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def forward_scorer_setup(config_path, num_steps):
  """Config, UNet, random non-zero params, schedule and a forward K-step scorer config."""
  from ddm_ood.schedule import schedule_for
  from ddm_ood.unet import build_model
  from tests.train_helpers import random_params
  cfg = load_config(config_path)
  model = build_model(cfg)
  params = random_params(model, cfg.data.image_size)
  schedule = schedule_for(cfg.diffusion)
  scfg = cfg.scorer
  scfg.mode, scfg.num_steps, scfg.num_draws, scfg.chunk = 'forward', num_steps, 1, 0
  scfg.t_min = 0   # the whole grid: K network evaluations per image
  return cfg, model, params, schedule, scfg


def real_images(n, size, channels):
  import skimage.data
  cam = skimage.data.camera().astype(np.float32) / 127.5 - 1
  g = 512 // size
  tiles = cam[:g * size, :g * size].reshape(g, size, g, size).swapaxes(1, 2).reshape(-1, size, size)
  tiles = np.concatenate([tiles, -tiles, tiles[:, ::-1]])[:n]
  return np.repeat(tiles[..., None], channels, axis=-1)


def timed(fn, reps):
  fn()  # warm
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  return (time.perf_counter() - t) / reps, out


def xla_flops_of(compiled):
  """XLA's cost-analysis FLOPs (a loop body counted once; for comparison with `ddm_ood.flops`)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float((ca or {}).get('flops', float('nan')))


def peer_loop(apply_jit, params, schedule, scfg, images, ids, key):
  """Peer style: a jitted network call per timestep, host round trip, numpy SSIM/features."""
  from skimage.metrics import structural_similarity
  from ddm_ood.schedule import scorer_timesteps
  ts = scorer_timesteps(schedule.num_timesteps, scfg.num_steps)
  sa, sg = np.asarray(schedule.sqrt_alphas_cumprod), np.asarray(schedule.sigmas)
  eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0),
                                               images.shape[1:])) for i in ids])
  maps = []
  for t in ts:
    x_t = sa[t] * images + sg[t] * eps
    eps_th = np.asarray(apply_jit(params, x_t, np.full(len(images), t, np.int32)))
    x0hat = np.clip((x_t - sg[t] * eps_th) / sa[t], -1, 1)
    ssim = np.stack([structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=2.0,
                                           full=True, channel_axis=-1)[1]
                     for a, b in zip(images, x0hat)])
    maps.append((1 - ssim) * (eps_th - eps))
  v = np.stack(maps, 1)
  ps = lambda u: np.stack([(u ** p).sum((-3, -2, -1)) for p in (1, 2, 3)], -1)  # noqa: E731
  return np.concatenate([ps(v).sum(1), ps(len(ts) * np.diff(v, axis=1)).sum(1)], -1)


def unet_child(config_path, out_npy):
  """Times the UNet forward at 64 x S x S x C in this process's XLA flags; saves the output."""
  from ddm_ood.unet import build_model
  from tests.train_helpers import random_params
  cfg = load_config(config_path)
  model = build_model(cfg)
  params = random_params(model, cfg.data.image_size)
  x = real_images(64, cfg.data.image_size, cfg.data.channels)
  t = (np.arange(64) * 15).astype(np.int32)
  f = jax.jit(lambda p, x, t: model.apply(p, x, t))
  t0 = time.perf_counter()
  compiled = f.lower(params, x, t).compile()
  compile_s = time.perf_counter() - t0
  sec, out = timed(lambda: jax.block_until_ready(compiled(params, x, t)), 5)
  np.save(out_npy, np.asarray(out))
  flops = flops_lib.count_flops(f, params, x, t)
  print(json.dumps({'sec': sec, 'compile_s': compile_s, 'gflop': flops / 1e9,
                    'gflops_per_s': flops / sec / 1e9}))


def conv_probe():
  """One 3x3 conv at [64, 28, 28, 16] -> 16 channels: lax.conv vs im2col + matmul."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 28, 28, 16)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 16, 16)), jnp.float32) / 12
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                           dimension_numbers=dn))

  def im2col(x, w):
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), 'SAME', dimension_numbers=dn)
    # patches are ordered (C, kh, kw) on the feature axis
    return p @ w.transpose(2, 0, 1, 3).reshape(-1, w.shape[-1])
  im2col = jax.jit(im2col)
  flop = 2 * 64 * 28 * 28 * 16 * 16 * 9
  s_conv, a = timed(lambda: jax.block_until_ready(conv(x, w)), 20)
  s_col, b = timed(lambda: jax.block_until_ready(im2col(x, w)), 20)
  return {'conv_gflops_per_s': flop / s_conv / 1e9, 'im2col_gflops_per_s': flop / s_col / 1e9,
          'max_abs_diff': float(jnp.abs(a - b).max())}


def devices_child(args, out_npy):
  """Times the scorer sharded over every device of this process (DDM_OOD_CPU_DEVICES decides)."""
  import resource
  from ddm_ood import cpu_devices
  cpu_devices.configure()
  from ddm_ood import scorer as scorer_lib
  from ddm_ood import sharding
  cfg, model, params, schedule, scfg = forward_scorer_setup(args.config, args.num_steps)
  n_dev = jax.device_count()
  chunk = int(args.chunks.split(',')[0] or 0)
  scfg.chunk = -(-chunk // n_dev) * n_dev if chunk else 0
  b = int(args.batches.split(',')[0])
  mesh = sharding.data_mesh()
  x = sharding.global_batch_from_local(real_images(b, cfg.data.image_size, cfg.data.channels),
                                       mesh)
  ids = sharding.global_batch_from_local(np.arange(b, dtype=np.int32), mesh)
  params = sharding.replicate(params, mesh)
  fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t), schedule,
                                                 scfg, ('stein_ssim',)))
  key = jax.random.key(0)
  compiled = fn.lower(params, x, ids, key).compile()
  flops = flops_lib.count_flops(fn, params, x, ids, key)   # global: every device's images
  run = lambda: jax.block_until_ready(compiled(params, x, ids, key))  # noqa: E731
  run()
  measured = peak.matmul_peak()
  reps = 3
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(reps):
    out = run()
  sec = (time.perf_counter() - t0) / reps
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  np.save(out_npy, np.asarray(out['features']['stein_ssim']))
  from ddm_ood import host_malloc
  print(json.dumps({'devices': n_dev, 'batch': b, 'chunk': scfg.chunk,
                    'malloc': host_malloc.active() or 'system',
                    'images_per_s': b / sec, 'core_usage': cpu / (sec * reps),
                    'gflop_per_image': flops / b / 1e9, **peak.rates(flops, sec, measured),
                    **measured}))


def throughput(args):
  """The compiled scorer alone at the first of ``--batches``, once per ``--variants`` entry."""
  from ddm_ood import scorer as scorer_lib
  from ddm_ood.schedule import make_schedule
  from ddm_ood.unet import build_model
  from tests.train_helpers import random_params
  kinds = tuple(k for k in args.kinds.split(',') if k) or (
      ('stein_ssim',) if args.mode == 'forward' else ('diffpath_6d', 'diffpath_1d'))
  b = int(args.batches.split(',')[0])
  chunk = int(args.chunks.split(',')[0] or 0)
  measured = peak.matmul_peak()
  report = {'config': os.path.relpath(args.config, ROOT), 'mode': args.mode, 'kinds': kinds,
            'batch': b, 'chunk': chunk, 'K': args.num_steps, 'devices': str(jax.devices()),
            'jax': jax.__version__, **measured, 'variants': []}
  params, ref = None, None
  for variant in args.variants.split(';'):
    cfg = load_config(args.config)
    for item in (v for v in variant.split(',') if v):
      name, value = item.split('=')
      cfg.model[name] = type(cfg.model[name])(value)
    sc = cfg.scorer
    sc.mode, sc.num_steps, sc.chunk, sc.t_min = args.mode, args.num_steps, chunk, 0
    model = build_model(cfg)
    size, ch = cfg.data.image_size, cfg.data.channels
    if params is None:   # the same weights for every variant
      params = random_params(model, size)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    fn = jax.jit(scorer_lib.make_trajectory_scorer(model.apply, schedule, sc, kinds))
    x, ids, key = real_images(b, size, ch), np.arange(b, dtype=np.int32), jax.random.key(0)
    t0 = time.perf_counter()
    compiled = fn.lower(params, x, ids, key).compile()
    compile_s = time.perf_counter() - t0
    sec, out = timed(lambda: jax.block_until_ready(compiled(params, x, ids, key)), args.reps)
    flops = flops_lib.count_flops(fn, params, x, ids, key)
    feats = np.asarray(out['features'][kinds[0]], np.float64)
    ref = feats if ref is None else ref
    report['variants'].append({
        'model': variant, 'compute_dtype': np.dtype(model.dtype).name,
        'precision': model.precision, 'attention': model.attention, 'images_per_s': b / sec,
        'compile_s': compile_s, 'gflop_per_image': flops / b / 1e9,
        **peak.rates(flops, sec, measured),
        'max_rel_diff_vs_first': float(np.max(np.abs(feats - ref) / np.abs(ref).max(0)))})
    print(json.dumps(report['variants'][-1]), file=sys.stderr, flush=True)
  report['loadavg'] = os.getloadavg()[0]
  print(json.dumps(report, indent=1))


def compare_devices(args):
  """Runs `devices_child` on one core, one device and all cores; prints them and the speed-ups."""
  out_npy = f'/tmp/scorer_bench_devices_{os.getpid()}.npy'
  feats = []

  def parse(stdout):
    feats.append(np.load(out_npy))
    os.remove(out_npy)
    return json.loads(stdout.strip().splitlines()[-1])

  result = core_modes.run_modes(
      [sys.executable, os.path.abspath(__file__), '--config', args.config, '--batches',
       args.batches, '--chunks', args.chunks, '--num_steps', str(args.num_steps),
       '--devices_child', out_npy], parse, 'images_per_s', 'scorer_bench', args.rounds)
  ref = feats[0]
  print(json.dumps({
      'config': os.path.relpath(args.config, ROOT), **result,
      'features_max_rel_diff': max(float(np.max(np.abs(f - ref) / np.abs(ref).max(0)))
                                   for f in feats[1:])}, indent=1))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'fashion_mnist.py'))
  parser.add_argument('--batches', default='64,256')
  parser.add_argument('--num_steps', type=int, default=10)
  parser.add_argument('--skip_flags', action='store_true')
  parser.add_argument('--chunks', default='8',
                      help='also time the scorer with these config.scorer.chunk values')
  parser.add_argument('--unet_child', default='')
  parser.add_argument('--compare_devices', action='store_true',
                      help='one core vs one device vs every core, sharded (uses the first batch '
                      'and chunk)')
  parser.add_argument('--rounds', type=int, default=1,
                      help='with --compare_devices: interleaved runs per set-up (median compared)')
  parser.add_argument('--devices_child', default='')
  parser.add_argument('--throughput', action='store_true',
                      help='only the compiled scorer, per --variants (for accelerators)')
  parser.add_argument('--variants', default='',
                      help="';'-separated config.model overrides, e.g. "
                      "'compute_dtype=float32,precision=highest;compute_dtype=bfloat16'")
  parser.add_argument('--mode', default='forward', choices=('forward', 'ddim'))
  parser.add_argument('--kinds', default='', help='default: stein_ssim (forward) or '
                      'diffpath_6d,diffpath_1d (ddim)')
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  compile_cache.configure()
  if not os.path.exists(args.config):
    args.config = os.path.join(ROOT, 'configs', 'default.py')
  if args.unet_child:
    return unet_child(args.config, args.unet_child)
  if args.compare_devices:
    return compare_devices(args)
  if args.devices_child:
    return devices_child(args, args.devices_child)
  if args.throughput:
    return throughput(args)

  from ddm_ood import host_malloc
  from ddm_ood import scorer as scorer_lib
  from ddm_ood.unet import param_count
  cfg, model, params, schedule, scfg = forward_scorer_setup(args.config, args.num_steps)
  apply_fn = lambda p, x, t: model.apply(p, x, t)  # noqa: E731
  apply_jit = jax.jit(apply_fn)
  score = jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, schedule, scfg, ('stein_ssim',)))
  key = jax.random.key(0)
  report = {'config': os.path.relpath(args.config, ROOT), 'params': param_count(params),
            'K': args.num_steps, 'devices': str(jax.devices()), 'jax': jax.__version__,
            'cpu_count': os.cpu_count(), 'malloc': host_malloc.active() or 'system',
            'loadavg_start': os.getloadavg()[0], 'batches': {}}

  for b in [int(v) for v in args.batches.split(',')]:
    x = real_images(b, cfg.data.image_size, cfg.data.channels)
    ids = np.arange(b, dtype=np.int32)
    t0 = time.perf_counter()
    compiled = score.lower(params, x, ids, key).compile()
    compile_s = time.perf_counter() - t0
    reps = 3 if b <= 64 else 1
    s_scorer, out = timed(lambda: jax.block_until_ready(compiled(params, x, ids, key)), reps)
    s_peer, peer = timed(lambda: peer_loop(apply_jit, params, schedule, scfg, x, ids, key), 1)
    flops = flops_lib.count_flops(score, params, x, ids, key)
    ref = np.asarray(out['features']['stein_ssim'])
    by_chunk = {}
    for c in [int(v) for v in args.chunks.split(',') if v]:
      scfg_c = scfg.copy_and_resolve_references()
      scfg_c.chunk = c
      fn = jax.jit(scorer_lib.make_trajectory_scorer(apply_fn, schedule, scfg_c, ('stein_ssim',)))
      comp_c = fn.lower(params, x, ids, key).compile()
      s_c, out_c = timed(lambda: jax.block_until_ready(comp_c(params, x, ids, key)), reps)
      np.testing.assert_allclose(np.asarray(out_c['features']['stein_ssim']),
                                 np.asarray(out['features']['stein_ssim']), rtol=2e-4,
                                 atol=2e-4 * float(np.abs(out['features']['stein_ssim']).max()))
      by_chunk[c] = {'images_per_s': b / s_c, 'speedup_vs_peer': s_peer / s_c}
    report['batches'][b] = {
        'scorer_chunk_images_per_s': by_chunk,
        'scorer_images_per_s': b / s_scorer, 'peer_loop_images_per_s': b / s_peer,
        'speedup': s_peer / s_scorer, 'scorer_compile_s': compile_s,
        'scorer_gflop_per_call': flops / 1e9, 'scorer_gflops_per_s': flops / s_scorer / 1e9,
        'xla_gflop_per_call': xla_flops_of(compiled) / 1e9,
        'peer_vs_scorer_max_rel_diff': float(np.max(np.abs(peer - ref) /
                                                    np.abs(ref).max(0))),
    }

  n = 2048
  an = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  s_np, _ = timed(lambda: an @ an, 5)
  report['matmul_2048_gflops_per_s'] = {'jax': core_modes.matmul_gflops_per_s(n),
                                        'numpy': 2 * n ** 3 / s_np / 1e9}
  report['peak'] = peak.matmul_peak()
  for r in report['batches'].values():
    r['fraction_of_peak'] = r['scorer_gflops_per_s'] / 1e3 / report['peak']['peak_tflops_per_s']
  report['conv3x3_probe'] = conv_probe()

  if not args.skip_flags:
    variants = {
        'default': '',
        'no_multi_thread_eigen': '--xla_cpu_multi_thread_eigen=false',
        'onednn': '--xla_cpu_use_onednn=true',
        'xnnpack': '--xla_cpu_use_xnnpack=true',
        'xnn_graph_greedy':
            '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
        'no_thunk_runtime': '--xla_cpu_use_thunk_runtime=false',
    }
    base = None
    report['unet_forward_64'] = {}
    for name, flags in variants.items():
      out_npy = f'/tmp/scorer_bench_unet_{os.getpid()}_{name}.npy'
      env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--config', args.config,
                             '--unet_child', out_npy], env=env, capture_output=True, text=True)
      if proc.returncode:
        report['unet_forward_64'][name] = {'error': proc.stderr.strip().splitlines()[-1][:200]}
        continue
      res = json.loads(proc.stdout.strip().splitlines()[-1])
      y = np.load(out_npy)
      os.remove(out_npy)
      base = y if base is None else base
      res['max_abs_diff_vs_default'] = float(np.abs(y - base).max())
      report['unet_forward_64'][name] = res
  report['loadavg_end'] = os.getloadavg()[0]
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  from ddm_ood import host_malloc
  host_malloc.maybe_reexec()
  main()
