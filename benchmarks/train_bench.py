"""Throughput of the training step: prints one JSON line.

  python benchmarks/train_bench.py [--config=configs/fashion_mnist.py] [--steps=20]
      [--config.model.ch=16 ...] [--compare_devices [--rounds=3]]

Reports steps/s after compilation over ``--steps`` steps on synthetic data, the compile time,
the parameter count, peak memory (device memory stats if the backend has them, else the
process's max RSS), the global batch size, the core usage of the timed loop ((user + sys CPU
time) / wall time), the step's FLOPs (`ddm_ood.flops`, all devices; the forward's per image and
XLA's own count beside them) and the achieved TFLOP/s as a fraction of the backend's matmul peak
measured in the same process (`peak.py`: float32 on the CPU, bfloat16 on accelerators).
Compilation goes through the persistent cache (`ddm_ood.compile_cache`) unless
``DDM_OOD_COMPILATION_CACHE=off``: ``compile_plus_first_step_s`` is then a second start's.

Like ``main``, it exposes every core as a CPU device unless told otherwise (`ddm_ood.cpu_devices`:
``DDM_OOD_CPU_DEVICES=N``, 1 = off, or an explicit ``XLA_FLAGS`` device count) and runs on tcmalloc
where installed (`ddm_ood.host_malloc`; ``DDM_OOD_MALLOC=system`` = glibc).
``--compare_devices`` runs itself four times in fresh subprocesses (`core_modes`: pinned to one
core, one device on every core, one device per core, the same on glibc malloc) and prints the
results and the speed-ups measured in this one run. Not a test.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

import core_modes  # pylint: disable=g-bad-import-order
import peak  # pylint: disable=g-bad-import-order
from ddm_ood import compile_cache
from ddm_ood import cpu_devices
from ddm_ood import flops as flops_lib
from ddm_ood import host_malloc
from ddm_ood import schedule as schedule_lib
from ddm_ood import sharding
from ddm_ood import train
from ddm_ood import unet

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_ROOT, 'configs', 'fashion_mnist.py'), 'Config file.',
    lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps after compilation.')
_COMPARE = flags.DEFINE_bool(
    'compare_devices', False,
    'Run one core, one device and all cores in subprocesses; print the ratios.')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'With --compare_devices: interleaved runs per set-up '
                               '(the median is compared).')


def _peak_memory() -> dict:
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and 'peak_bytes_in_use' in stats:
    return {'peak_memory_bytes': int(stats['peak_bytes_in_use']), 'memory_source': 'device'}
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {'peak_memory_bytes': int(rss_kib) * 1024, 'memory_source': 'process_max_rss'}


def xla_flops(compiled, num_devices: int) -> float:
  """XLA's cost-analysis FLOPs of a compiled (SPMD, per-device) executable, summed over devices
  (for comparison only: it misses library convolutions and counts loop bodies once)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float((ca or {}).get('flops', float('nan'))) * num_devices


def compare_devices(argv) -> None:
  """Runs this benchmark on one core, one device and all cores; prints all three and ratios."""
  del argv  # absl keeps only positional arguments there; the flags are in sys.argv
  args = [a for a in sys.argv[1:] if not a.startswith(('--compare_devices', '--rounds'))]
  print(json.dumps(core_modes.run_modes(
      [sys.executable, os.path.abspath(__file__), *args],
      lambda out: json.loads(out.strip().splitlines()[-1]), 'steps_per_sec', 'train_bench',
      _ROUNDS.value)))


def train_setup(config):
  """The jitted train step of ``config`` on the ('data',) mesh of every device.

  Returns:
    ``(step_fn, state, batches)``: the step (donates its state), the initial replicated state and
    two sharded synthetic batches [batch_size, H, W, C] to alternate between.
  """
  tc = config.train
  mesh = sharding.data_mesh()
  model = unet.build_model(config)
  sched = schedule_lib.schedule_for(config.diffusion)
  optimizer = train.make_optimizer(tc)
  state = jax.jit(lambda: train.create_train_state(model, optimizer, config.data.image_size,
                                                   config.seed),
                  out_shardings=sharding.replicated_sharding(mesh))()
  step_fn = train.make_train_step(model, sched, tc, mesh)
  size, ch = config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch_from_local(
      rng.uniform(-1, 1, (train.check_batch_size(tc.batch_size), size, size, ch)).astype(
          np.float32), mesh) for _ in range(2)]
  return step_fn, state, batches


def main(argv):
  if _COMPARE.value:
    return compare_devices(argv)
  cpu_devices.configure(divides=(_CONFIG.value.train.batch_size,))
  cache = compile_cache.configure()
  config = _CONFIG.value
  tc = config.train
  size, ch = config.data.image_size, config.data.channels
  step_fn, state, batches = train_setup(config)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0   # tracing included: FLOPs are counted after it
  model = unet.build_model(config)
  flops = flops_lib.count_flops(step_fn, state, batches[0])
  forward = flops_lib.count_flops(
      model.apply, state.params, jax.ShapeDtypeStruct((1, size, size, ch), np.float32),
      jax.ShapeDtypeStruct((1,), np.int32))
  xla = xla_flops(step_fn.lower(state, batches[0]).compile(), jax.device_count())
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = step_fn(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  measured = peak.matmul_peak()
  print(json.dumps({
      'steps_per_sec': _STEPS.value / elapsed,
      'sec_per_step': elapsed / _STEPS.value,
      'compile_plus_first_step_s': compile_s, 'compilation_cache': cache,
      'param_count': unet.param_count(state.params),
      'batch_size': int(tc.batch_size),
      'image_size': size, 'channels': ch,
      'devices': jax.device_count(), 'backend': jax.default_backend(),
      'compute_dtype': np.dtype(model.dtype).name, 'precision': model.precision,
      'attention': model.attention,
      'core_usage': cpu_s / elapsed, 'gflop_per_step': flops / 1e9,
      'gflop_forward_per_image': forward / 1e9, 'step_over_batch_forwards': flops / (
          forward * int(tc.batch_size)), 'xla_gflop_per_step': xla / 1e9,
      **peak.rates(flops, elapsed / _STEPS.value, measured), **measured,
      'malloc': host_malloc.active() or 'system', **_peak_memory()}))


if __name__ == '__main__':
  host_malloc.maybe_reexec()
  app.run(main)
