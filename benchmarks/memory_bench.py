"""Peak memory of the compiled trajectory scorer vs batch size and chunk (prints one JSON).

  python benchmarks/memory_bench.py [--configs=tiny,fashion_mnist,celeba] [--batches=16,64]
      [--chunks=0,4] [--num_steps=10] [--compute_dtype=float32] [--budget_gb=16]

For each config, batch and chunk the scorer ('stein_ssim', forward mode, K = ``--num_steps``) is
compiled for abstract inputs (nothing runs, parameters are never materialised) and XLA's buffer
assignment is read from ``compiled.memory_analysis()``: ``temp`` (activations), ``argument``
(parameters and images), ``output`` and their sum ``peak``. Beside it, `ddm_ood.memory`'s estimate
of the same quantity and their ratio (the estimate is meant to stay above the measurement), and
the (batch, chunk) that `ddm_ood.memory.plan_for_config` picks for ``--budget_gb`` on one device,
and the FLOPs of each call (`ddm_ood.flops`).

Buffer assignment on the CPU backend: an accelerator's differs somewhat (other fusions, no
layout copies for convolutions), so these are a guide for the rule, not a guarantee.
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
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def load_config(name):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--configs', default='tiny,fashion_mnist,celeba')
  parser.add_argument('--batches', default='16,64')
  parser.add_argument('--chunks', default='0,4')
  parser.add_argument('--num_steps', type=int, default=10)
  parser.add_argument('--compute_dtype', default='float32')
  parser.add_argument('--budget_gb', type=float, default=16.0)
  args = parser.parse_args()

  from ddm_ood import compile_cache
  from ddm_ood import flops as flops_lib
  from ddm_ood import memory
  from ddm_ood import scorer as scorer_lib
  compile_cache.configure()
  from ddm_ood.schedule import schedule_for
  from ddm_ood.unet import build_model, init_params, param_count
  report = {'backend': jax.default_backend(), 'jax': jax.__version__, 'K': args.num_steps,
            'compute_dtype': args.compute_dtype, 'safety_factor': memory.SAFETY_FACTOR,
            'configs': {}}
  for name in args.configs.split(','):
    cfg = load_config(name)
    cfg.model.compute_dtype = args.compute_dtype
    cfg.model.dropout = 0.0
    sc = cfg.scorer
    sc.mode, sc.num_steps, sc.num_draws, sc.t_min = 'forward', args.num_steps, 1, 0
    cfg.eval.feature_kinds = ('stein_ssim',)
    model = build_model(cfg)
    size, ch = cfg.data.image_size, cfg.data.channels
    params = jax.eval_shape(lambda k: init_params(model, k, size), jax.random.key(0))
    n_params = param_count(params)
    schedule = schedule_for(cfg.diffusion)
    dtype_bytes = jnp.dtype(model.dtype).itemsize
    state = memory.unet_state_bytes(size, ch, cfg.model.ch, tuple(cfg.model.ch_mult),
                                    cfg.model.num_res_blocks, tuple(cfg.model.attn_resolutions),
                                    cfg.model.num_heads, dtype_bytes)
    per_image = args.num_steps * state + memory.scorer_image_bytes(size, ch, args.num_steps)
    fixed = n_params * (4 + dtype_bytes)
    rows = []
    for b in [int(v) for v in args.batches.split(',')]:
      for c in [int(v) for v in args.chunks.split(',')]:
        if c >= b:
          continue
        sc.chunk = c
        fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t),
                                                       schedule, sc, ('stein_ssim',)))
        t0 = time.perf_counter()
        abstract = (params, jax.ShapeDtypeStruct((b, size, size, ch), jnp.float32),
                    jax.ShapeDtypeStruct((b,), jnp.int32), jax.random.key(0))
        compiled = fn.lower(*abstract).compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        temp, arg, out = (int(ma.temp_size_in_bytes), int(ma.argument_size_in_bytes),
                          int(ma.output_size_in_bytes))
        images_per_step = c if c else b
        estimate = fixed + images_per_step * per_image
        rows.append({'batch': b, 'chunk': c, 'states_per_step': images_per_step * args.num_steps,
                     'temp_mib': temp / 2 ** 20, 'argument_mib': arg / 2 ** 20,
                     'output_mib': out / 2 ** 20, 'peak_mib': (temp + arg + out) / 2 ** 20,
                     'estimate_mib': estimate / 2 ** 20,
                     'estimate_over_peak': estimate / (temp + arg + out),
                     'gflop_per_call': flops_lib.count_flops(fn, *abstract) / 1e9,
                     'compile_s': compile_s})
        print(json.dumps({'config': name, **rows[-1]}), file=sys.stderr, flush=True)
    # Per-state growth measured between the largest and smallest step size of this config.
    by_states = sorted(rows, key=lambda r: r['states_per_step'])
    growth = None
    if len(by_states) >= 2 and by_states[-1]['states_per_step'] > by_states[0]['states_per_step']:
      growth = ((by_states[-1]['temp_mib'] - by_states[0]['temp_mib']) * 2 ** 20 /
                (by_states[-1]['states_per_step'] - by_states[0]['states_per_step']))
    sc.chunk, sc.batch_size, sc.memory_budget_gb = 0, 256, args.budget_gb
    plan = memory.plan_for_config(cfg, n_params, 1, None)
    report['configs'][name] = {
        'params': n_params, 'image_size': size, 'channels': ch,
        'estimated_state_mib': state / 2 ** 20,
        'measured_temp_mib_per_state': None if growth is None else growth / 2 ** 20,
        'plan_for_budget': {'budget_gb': args.budget_gb, 'batch_size': plan[0], 'chunk': plan[1]},
        'rows': rows}
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
