"""Where the time of the train step or the scorer goes: a `jax.profiler` trace, summarised (JSON).

  python benchmarks/op_profile.py --what=train_step [--config=configs/fashion_mnist.py]
      [--calls=10] [--trace_dir=/tmp/ddm_ood_trace] [--batch=64]
  python benchmarks/op_profile.py --what=scorer --config=configs/fashion_mnist.py --batch=64

Traces ``--calls`` compiled calls (after a warm-up) into ``--trace_dir`` (open it in TensorBoard's
profile plugin, XProf or Perfetto for the timeline) and prints, from the trace's host plane, the
XLA op time per call summed over threads, grouped

* by fusion kind (the instruction name without its number: ``ynn_fusion`` = a convolution or dot
  run by XNNPACK/YNNPACK with its fused epilogue, ``transpose_copy_fusion`` = a layout copy, ...);
* by the JAX primitive and the UNet layer that the instruction came from (its HLO ``op_name``
  metadata, e.g. ``transpose(jvp(UNet))/down_1_res_0/conv2/conv_general_dilated``).

The device set-up follows ``main`` (`ddm_ood.cpu_devices`; ``DDM_OOD_CPU_DEVICES=1`` for one
device). Also printed: the FLOPs of one call (`ddm_ood.flops`) and the achieved fraction of the
backend's matmul peak (`peak.py`). Reading the trace needs TensorFlow's ``xplane_pb2``
(installed with the ``tfds`` extra). Not a test.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddm_ood import cpu_devices  # pylint: disable=g-import-not-at-top
from ddm_ood import host_malloc  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUMBER = re.compile(r'\.\d+$')
_METADATA = re.compile(r'op_name="([^"]*)"')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OPCODE = re.compile(r' = \S+ ([\w\-]+)\(')
_COMPUTATION = re.compile(r'^%?([\w.\-]+) .*\{\s*$')


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its ``op_name`` metadata, from a compiled module's text.

  A fusion without metadata of its own takes the metadata of the root, else of the last annotated
  instruction, of the computation that it calls. Where XLA made the whole computation (e.g. the
  weight-gradient convolutions, which carry no metadata) the result is ``'XLA:<root opcode>'``.
  """
  own, calls, roots, last, computation = {}, {}, {}, {}, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and ' = ' not in line:
      computation = head.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    meta, called = _METADATA.search(line), _CALLS.search(line)
    if meta:
      own[m.group(1)] = meta.group(1)
      if computation:
        (roots if line.lstrip().startswith('ROOT') else last)[computation] = meta.group(1)
    elif computation and line.lstrip().startswith('ROOT') and _OPCODE.search(line):
      roots.setdefault(computation, 'XLA:' + _OPCODE.search(line).group(1))
    if called:
      calls[m.group(1)] = called.group(1)
  out, inside = dict(own), {**last, **roots}
  for name, comp in calls.items():
    if name not in out and comp in inside:
      out[name] = inside[comp]
  return out


def _layer(op_name: str) -> str:
  """'jit(f)/transpose(jvp(UNet))/down_1_res_0/conv2/conv_general_dilated' -> 'res/conv2'."""
  if op_name.startswith('XLA:'):
    return '(made by XLA)'
  if op_name.count('/') > 8:  # the combined gradient all-reduce names every layer
    return '(every layer)'
  parts = [p for p in op_name.split('/')[1:-1] if '(' not in p]
  if not parts:
    return '(outside the UNet)'
  return '/'.join([re.sub(r'^(down|up|mid)_\d+_|_\d+$', '', parts[0]), *parts[1:]])


def _self_times(line, metadata):
  """(name, self time in ps) of each op event on one thread: a ``while`` or ``call`` minus the
  ops nested in it, so that nothing is counted twice; the executor's own events are skipped."""
  events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
  stack, out = [], []  # stack of [end_ps, index into out]
  for ev in events:
    name = metadata[ev.metadata_id].name
    if name.startswith('ThunkExecutor'):
      continue
    while stack and stack[-1][0] <= ev.offset_ps:
      stack.pop()
    if stack:
      out[stack[-1][1]][1] -= ev.duration_ps
    out.append([name, ev.duration_ps])
    stack.append([ev.offset_ps + ev.duration_ps, len(out) - 1])
  return out


def summarise(trace_dir: str, calls: int, hlo_text: str, top: int = 15) -> dict:
  """Sums the XLA op events of a trace per call, by fusion kind, primitive and layer."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise FileNotFoundError(f'No *.xplane.pb under {trace_dir}: the trace was not written.')
  space = xplane_pb2.XSpace()
  with open(max(files, key=os.path.getmtime), 'rb') as f:
    space.ParseFromString(f.read())
  names = op_names(hlo_text)
  kind, prim, layer, count = (collections.Counter() for _ in range(4))
  for plane in space.planes:
    for line in plane.lines:
      if 'XLA' not in line.name:
        continue
      for name, ps in _self_times(line, plane.event_metadata):
        ms = ps / 1e9 / calls
        k = _NUMBER.sub('', name)
        kind[k] += ms
        count[k] += 1 / calls
        op = names.get(name, '')
        prim[op.rsplit('/', 1)[-1].strip('()') or '(no metadata)'] += ms
        layer[_layer(op) if op else '(no metadata)'] += ms
  total = sum(kind.values())

  def table(c):
    return [{'name': n, 'ms': round(v, 3), 'percent': round(100 * v / total, 1)}
            for n, v in c.most_common(top)]

  return {'op_ms_per_call_summed_over_threads': total,
          'by_fusion_kind': [dict(r, per_call=round(count[r['name']])) for r in table(kind)],
          'by_primitive': table(prim), 'by_layer': table(layer)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--what', choices=('train_step', 'scorer'), default='train_step')
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'fashion_mnist.py'))
  parser.add_argument('--batch', type=int, default=64,
                      help='training batch (train_step) or images per scorer call (scorer)')
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--trace_dir', default='/tmp/ddm_ood_trace')
  args = parser.parse_args()
  cpu_devices.configure(divides=(args.batch,))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import peak  # pylint: disable=g-import-not-at-top
  import scorer_bench  # pylint: disable=g-import-not-at-top
  from ddm_ood import compile_cache  # pylint: disable=g-import-not-at-top
  from ddm_ood import flops as flops_lib  # pylint: disable=g-import-not-at-top
  compile_cache.configure()

  if args.what == 'train_step':
    import train_bench  # pylint: disable=g-import-not-at-top
    config = scorer_bench.load_config(args.config)
    config.train.batch_size = args.batch
    step_fn, state, batches = train_bench.train_setup(config)
    flops = flops_lib.count_flops(step_fn, state, batches[0])
    compiled = step_fn.lower(state, batches[0]).compile()
    hlo = compiled.as_text()
    carry = [state]

    def call():
      carry[0], metrics = compiled(carry[0], batches[0])
      return metrics
  else:
    from ddm_ood import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    from ddm_ood import sharding  # pylint: disable=g-import-not-at-top
    cfg, model, params, schedule, scfg = scorer_bench.forward_scorer_setup(args.config, 10)
    mesh = sharding.data_mesh()
    x = sharding.global_batch_from_local(
        scorer_bench.real_images(args.batch, cfg.data.image_size, cfg.data.channels), mesh)
    ids = sharding.global_batch_from_local(np.arange(args.batch, dtype=np.int32), mesh)
    params = sharding.replicate(params, mesh)
    fn = jax.jit(scorer_lib.make_trajectory_scorer(lambda p, x, t: model.apply(p, x, t),
                                                   schedule, scfg, ('stein_ssim',)))
    flops = flops_lib.count_flops(fn, params, x, ids, jax.random.key(0))
    compiled = fn.lower(params, x, ids, jax.random.key(0)).compile()
    hlo = compiled.as_text()
    call = lambda: compiled(params, x, ids, jax.random.key(0))  # noqa: E731

  jax.block_until_ready(call())
  t0 = time.perf_counter()
  for _ in range(args.calls):
    out = call()
  jax.block_until_ready(out)
  ms = (time.perf_counter() - t0) / args.calls * 1e3
  measured = peak.matmul_peak()
  with jax.profiler.trace(args.trace_dir):
    for _ in range(args.calls):
      out = call()
    jax.block_until_ready(out)
  print(json.dumps({'what': args.what, 'config': os.path.relpath(args.config, ROOT),
                    'batch': args.batch, 'devices': jax.device_count(),
                    'malloc': host_malloc.active() or 'system',
                    'ms_per_call_untraced': ms, 'trace_dir': args.trace_dir,
                    'gflop_per_call': flops / 1e9, **peak.rates(flops, ms / 1e3, measured),
                    **measured,
                    **summarise(args.trace_dir, args.calls, hlo)}, indent=1))


if __name__ == '__main__':
  host_malloc.maybe_reexec()
  main()
