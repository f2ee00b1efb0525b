"""Throughput of the training step: prints one JSON line.

  python benchmarks/train_bench.py [--config=configs/fashion_mnist.py] [--steps=20]
      [--config.model.ch=16 ...]

Reports steps/s after compilation over ``--steps`` steps on synthetic data, the compile time,
the parameter count, peak memory (device memory stats if the backend has them, else the
process's max RSS) and the global batch size. Not a test.
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

from ddm_ood import schedule as schedule_lib
from ddm_ood import sharding
from ddm_ood import train
from ddm_ood import unet

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_ROOT, 'configs', 'fashion_mnist.py'), 'Config file.',
    lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps after compilation.')


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


def main(argv):
  del argv
  config = _CONFIG.value
  tc = config.train
  mesh = sharding.data_mesh()
  model = unet.build_model(config)
  sched = schedule_lib.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
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
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = step_fn(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  print(json.dumps({
      'steps_per_sec': _STEPS.value / elapsed,
      'sec_per_step': elapsed / _STEPS.value,
      'compile_plus_first_step_s': compile_s,
      'param_count': unet.param_count(state.params),
      'batch_size': int(tc.batch_size),
      'image_size': size, 'channels': ch,
      'devices': jax.device_count(), 'backend': jax.default_backend(),
      **_peak_memory()}))


if __name__ == '__main__':
  app.run(main)
