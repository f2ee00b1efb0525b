"""What every network family shares: its flax module run at ``config.model.precision``.

`unet.build_model` (and any other family's builder) returns ``Network(module, precision)``.
``Network.apply`` / ``Network.init`` trace the module under `jax.default_matmul_precision`, so
every matmul and convolution of the network, in any family and in its gradient (autodiff keeps
each primitive's precision), gets the same `jax.lax.Precision`; no layer needs to know. Every
other attribute is the module's (``net.channels``, ``net.dtype``, ...).

On the CPU the setting changes nothing (XLA:CPU computes float32 matmuls in float32 either way;
tested bit-identical). On GPUs and TPUs float32 matmuls and convolutions run at reduced precision
by default (TF32 / bfloat16 passes), so results that must equal a float32 reference (the converted
DiffPath configs) pin 'highest'. With ``compute_dtype = 'bfloat16'`` the setting has no effect.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax

# config.model.precision -> the jax.default_matmul_precision value (None: leave JAX's own setting,
# i.e. the backend default or JAX_DEFAULT_MATMUL_PRECISION, alone).
PRECISIONS = {
    'default': None,       # the backend's default: GPU TF32 (A100 / H100 / H200), TPU one bf16 pass
    'high': 'high',        # GPU TF32, TPU three bf16 passes (bf16_3x)
    'highest': 'highest',  # full float32 everywhere
}


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


__all__ = ['PRECISIONS', 'check_precision', 'Network']
