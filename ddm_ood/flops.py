"""FLOPs of any JAX function, counted from its jaxpr: the one count every benchmark reports.

`count_flops(fn, *args)` traces ``fn`` once and adds up the multiply-adds of its matrix products
and convolutions (``dot_general``, ``conv_general_dilated`` and cuDNN's fused attention), 2 FLOPs
each, wherever they sit: inside ``jit``, ``custom_jvp`` / ``custom_vjp``, ``remat``, and inside a
``lax.scan`` / ``lax.map`` body times its length. It works for any network family and for whole
programs (a train step with its backward pass, a scorer with its DDIM scan and chunks), on any
backend, without compiling.

Why not XLA's ``cost_analysis()``: it counts a while-loop body once (the DDIM ``lax.scan``, the
scorer's ``lax.map`` chunks) and does not count convolutions that an accelerator runs as library
calls (cuDNN), so its figures were 12x low for a train step on a GPU. The per-primitive formula
here is XLA's own (a convolution counts only the kernel taps that land inside the padded input;
tested equal to XLA's count of each primitive on the CPU); elementwise work (normalisation,
activations, the optimizer) is not counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
from jax.extend import core as jex_core

MATMUL_PRIMITIVES = ('dot_general', 'conv_general_dilated')


def _conv_valid_taps(in_size: int, k: int, out_size: int, stride: int, pad_lo: int,
                     lhs_dil: int, rhs_dil: int) -> int:
  """(output position, kernel tap) pairs of one spatial axis that read a real input element."""
  dilated_in = (in_size - 1) * lhs_dil + 1
  count = 0
  for tap in range(k):
    offset = tap * rhs_dil - pad_lo
    for o in range(out_size):
      p = o * stride + offset
      if 0 <= p < dilated_in and p % lhs_dil == 0:
        count += 1
  return count


def conv_flops(lhs_shape, rhs_shape, params: dict) -> float:
  """FLOPs of one ``conv_general_dilated`` (XLA's rule: padding and dilation holes excluded)."""
  dn = params['dimension_numbers']
  lhs_spec, rhs_spec, _ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  batch = lhs_shape[lhs_spec[0]] // params['batch_group_count']
  out_features = rhs_shape[rhs_spec[0]]
  in_features_per_group = rhs_shape[rhs_spec[1]]
  lhs_dil = params['lhs_dilation'] or (1,) * (len(lhs_spec) - 2)
  rhs_dil = params['rhs_dilation'] or (1,) * (len(lhs_spec) - 2)
  taps = 1
  for i in range(len(lhs_spec) - 2):
    in_size, k = lhs_shape[lhs_spec[i + 2]], rhs_shape[rhs_spec[i + 2]]
    pad_lo, pad_hi = params['padding'][i]
    stride = params['window_strides'][i]
    dilated_in = (in_size - 1) * lhs_dil[i] + 1 + pad_lo + pad_hi
    out_size = max(0, (dilated_in - ((k - 1) * rhs_dil[i] + 1)) // stride + 1)
    taps *= _conv_valid_taps(in_size, k, out_size, stride, pad_lo, lhs_dil[i], rhs_dil[i])
  return 2.0 * batch * out_features * in_features_per_group * taps


def eqn_flops(eqn) -> float:
  """FLOPs of one jaxpr equation: its matmul work, 0 for any other primitive."""
  name = eqn.primitive.name
  shapes = [getattr(v.aval, 'shape', ()) for v in eqn.invars]
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(shapes[0][d] for d in lhs_contract)
  if name == 'conv_general_dilated':
    return conv_flops(shapes[0], shapes[1], eqn.params)
  if name.startswith('dot_product_attention_') and 'fp8' not in name:
    # cuDNN's fused attention, q [B, T, N, H], k [B, S, K, H]: Q K^T and P V in the forward,
    # four such products in the backward (the recomputed Q K^T not counted).
    b, t, n, h = shapes[0]
    s = shapes[1][1]
    per_product = 2.0 * b * t * n * s * h
    if '_fwd' in name:
      return 2 * per_product
    if '_bwd' in name:
      return 4 * per_product
  return 0.0


def _walk(jaxpr, multiplier: float) -> Iterator[tuple[Any, float]]:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in MATMUL_PRIMITIVES or name.startswith('dot_product_attention_'):
      yield eqn, multiplier
    if name == 'scan':
      yield from _walk(eqn.params['jaxpr'].jaxpr, multiplier * eqn.params['length'])
    elif name == 'while':
      sub = list(_walk(eqn.params['body_jaxpr'].jaxpr, multiplier))
      if any(eqn_flops(e) for e, _ in sub):
        raise ValueError('count_flops: a while loop with matmuls has no static trip count; use '
                         'lax.scan (or lax.fori_loop with static bounds).')
    elif name == 'cond':  # the most expensive branch
      branches = [list(_walk(b.jaxpr, multiplier)) for b in eqn.params['branches']]
      yield from max(branches, key=lambda br: sum(eqn_flops(e) * m for e, m in br))
    else:
      for sub in jex_core.jaxprs_in_params(eqn.params):
        yield from _walk(getattr(sub, 'jaxpr', sub), multiplier)


def matmul_eqns(fn: Callable, *args, **kwargs) -> list[tuple[Any, float]]:
  """The matmul / convolution / fused-attention equations of ``fn(*args, **kwargs)``.

  Args:
    fn: any JAX-traceable function (jitted or not).
    *args: its arguments: arrays or `jax.ShapeDtypeStruct`s (nothing is computed).
    **kwargs: keyword arguments, passed through.

  Returns:
    ``[(equation, how many times it runs per call)]``, scan bodies times their length.
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return list(_walk(closed.jaxpr, 1.0))


def count_flops(fn: Callable, *args, **kwargs) -> float:
  """Matmul and convolution FLOPs of one call ``fn(*args, **kwargs)`` (see the module doc).

  Returns:
    A float: 2 x multiply-adds of every ``dot_general``, ``conv_general_dilated`` and fused
    attention it runs, summed over all devices for a sharded function (global shapes).
  """
  return float(sum(eqn_flops(e) * m for e, m in matmul_eqns(fn, *args, **kwargs)))


__all__ = ['MATMUL_PRIMITIVES', 'conv_flops', 'eqn_flops', 'matmul_eqns', 'count_flops']
