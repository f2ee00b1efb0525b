"""What every network family shares: its matmul precision and its attention kernel.

`unet.build_model` (and any other family's builder) returns ``Network(module, precision)``.
``Network.apply`` / ``Network.init`` trace the module under `jax.default_matmul_precision`, so
every matmul and convolution of the network, in any family and in its gradient (autodiff keeps
each primitive's precision), gets the same `jax.lax.Precision`; no layer needs to know. Every
other attribute is the module's (``net.channels``, ``net.dtype``, ...).

Attention layers of any family call `dot_product_attention` with the implementation that
`resolve_attention` chose from ``config.model.attention``: 'xla' (the default), 'cudnn', or
'auto' = cuDNN's fused (flash) attention on a GPU in bfloat16 / float16 where it compiles and runs
there, else XLA's.

On the CPU the precision setting changes nothing (XLA:CPU computes float32 matmuls in float32
either way; tested bit-identical). On GPUs and TPUs float32 matmuls and convolutions run at
reduced precision by default (TF32 / bfloat16 passes), so results that must equal a float32
reference (the converted DiffPath configs) pin 'highest'. With ``compute_dtype = 'bfloat16'`` the
setting has no effect.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

# config.model.precision -> the jax.default_matmul_precision value (None: leave JAX's own setting,
# i.e. the backend default or JAX_DEFAULT_MATMUL_PRECISION, alone).
PRECISIONS = {
    'default': None,       # the backend's default: GPU TF32 (A100 / H100 / H200), TPU one bf16 pass
    'high': 'high',        # GPU TF32, TPU three bf16 passes (bf16_3x)
    'highest': 'highest',  # full float32 everywhere
}


ATTENTION = ('auto', 'xla', 'cudnn')
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_precision(name: str) -> str:
  """Returns ``name`` if it is one of `PRECISIONS`, else raises ValueError naming the field."""
  if name not in PRECISIONS:
    raise ValueError(f'config.model.precision={name!r} is not one of {tuple(PRECISIONS)}.')
  return name


class Network:
  """A network family's flax module whose ``init`` and ``apply`` run at one matmul precision.

  Attributes:
    module: the flax module (e.g. `unet.UNet`); its parameters are unchanged by the wrapper.
    precision: a key of `PRECISIONS`.
  """

  def __init__(self, module: Any, precision: str = 'default'):
    self.module = module
    self.precision = check_precision(precision)

  def _scope(self):
    value = PRECISIONS[self.precision]
    return jax.default_matmul_precision(value) if value else contextlib.nullcontext()

  def apply(self, *args, **kwargs):
    """``module.apply(...)`` with every matmul / conv at ``precision``."""
    with self._scope():
      return self.module.apply(*args, **kwargs)

  def init(self, *args, **kwargs):
    """``module.init(...)`` at ``precision`` (initial values do not depend on it)."""
    with self._scope():
      return self.module.init(*args, **kwargs)

  def __getattr__(self, name: str):
    if name in ('module', 'precision'):  # not yet set (copy / unpickle): no recursion
      raise AttributeError(name)
    return getattr(self.module, name)

  def __repr__(self) -> str:
    return f'Network({self.module!r}, precision={self.precision!r})'


@functools.cache
def _cudnn_attention_error(dtype) -> str | None:
  """None if cuDNN's fused attention compiles and runs (forward and gradient) on the default
  device in ``dtype``, else why not (checked once per process and dtype)."""
  try:
    q = jnp.ones((2, 64, 2, 64), dtype)
    f = lambda q: jax.nn.dot_product_attention(q, q, q, implementation='cudnn')  # noqa: E731
    jax.block_until_ready(jax.jit(jax.value_and_grad(
        lambda q: f(q).astype(jnp.float32).sum()))(q))
    return None
  except Exception as e:  # pylint: disable=broad-except  # any failure: use XLA's attention
    return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'


def check_attention(name: str) -> str:
  """Returns ``name`` if it is one of `ATTENTION`, else raises ValueError naming the field."""
  if name not in ATTENTION:
    raise ValueError(f'config.model.attention={name!r} is not one of {ATTENTION}.')
  return name


def resolve_attention(name: str, backend: str, dtype: Any) -> str:
  """``config.model.attention`` -> 'xla' or 'cudnn' for this backend and compute dtype.

  Raises:
    ValueError: an unknown name, or 'cudnn' where cuDNN's fused attention cannot run (not a GPU,
      float32, or the probe failed).
  """
  if check_attention(name) == 'xla':
    return name
  usable = backend == 'gpu' and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
  why = _cudnn_attention_error(jnp.dtype(dtype)) if usable else (
      f'it needs a GPU and compute_dtype bfloat16 / float16 (here {backend}, '
      f'{jnp.dtype(dtype).name})')
  if why is None:
    return 'cudnn'
  if name == 'cudnn':
    raise ValueError(f"config.model.attention='cudnn': cuDNN's fused attention cannot run: {why}. "
                     "Use 'auto' or 'xla'.")
  if usable:
    logging.warning("cuDNN's fused attention failed a test run (%s); using XLA's.", why)
  return 'xla'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: str = 'xla') -> jax.Array:
  """Softmax attention of q [B, T, N, H] over k, v [B, S, N, H] -> [B, T, N, H].

  ``implementation`` from `resolve_attention`; a layer whose shape cuDNN refuses (e.g. a head
  width that is not a multiple of 8) uses XLA's attention instead.
  """
  if implementation == 'cudnn':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except (NotImplementedError, ValueError) as e:
      logging.log_first_n(logging.WARNING, "cuDNN attention refused %s: %s; XLA's used.", 4,
                          q.shape, e)
  return jax.nn.dot_product_attention(q, k, v)


__all__ = ['PRECISIONS', 'ATTENTION', 'check_precision', 'resolve_attention',
           'dot_product_attention', 'Network']
