"""Memory of the trajectory scorer, and the largest batch / chunk that fits a memory budget.

The scorer runs ``R * K`` network evaluations ("states") per image; with ``config.scorer.chunk``
= c (> 0) a device holds the activations of ``c / D * R * K`` states at a time (D devices),
otherwise those of its whole batch share. `unet_state_bytes` estimates one state's peak
activations from the architecture (the skip tensors the decoder keeps, the largest residual
block's working set and the attention logits); `plan_scorer_batch` turns a budget into a chunk.
``benchmarks/memory_bench.py`` compares the estimate with XLA's buffer assignment
(``compiled.memory_analysis()``) for several networks, batches and chunks.

Pure functions of ints, except `resolve_budget_bytes` (asks the device how much memory it has).
"""

from __future__ import annotations

import math
from typing import Sequence

# Bytes per pixel of one image kept by the scorer per state besides the network: x_t, eps,
# eps_theta, x0hat, the SSIM map and its 5 filtered moments, the weighted map and the power terms,
# all float32; measured in benchmarks/memory_bench.py.
_SCORER_FLOATS_PER_PIXEL = 16
# XLA keeps more than the analytic live set (layout copies, fusion temporaries, the f32 GroupNorm
# statistics): the ratio measured/estimate of benchmarks/memory_bench.py stays below this.
SAFETY_FACTOR = 2.0
# Part of the device memory the automatic budget uses (the rest: runtime, fragmentation).
AUTO_BUDGET_FRACTION = 0.75


def unet_state_bytes(image_size: int, channels: int, ch: int, ch_mult: Sequence[float],
                     num_res_blocks: int, attn_resolutions: Sequence[int], num_heads: int,
                     dtype_bytes: int = 4, num_head_channels: int = 0) -> int:
  """Estimated peak activation bytes of ONE UNet evaluation in inference (no gradients).

  Every network family maps its config to these fields (`unet.FAMILIES`, ``memory_shape``).

  Args:
    image_size: H = W of the input.
    channels: image channels.
    ch, ch_mult, num_res_blocks, attn_resolutions, num_heads: the 'adm' ``config.model`` fields
      (widths ``int(ch * mult)``).
    dtype_bytes: bytes per activation (4 float32, 2 bfloat16).
    num_head_channels: > 0: an attention block of width w has w // num_head_channels heads.

  Returns:
    Bytes, with `SAFETY_FACTOR` applied.
  """
  sizes = [image_size // 2 ** level for level in range(len(ch_mult))]
  widths = [int(ch * m) for m in ch_mult]
  # Skip tensors the decoder consumes: conv_in, every down block, every downsample.
  skips = [(sizes[0], widths[0])]
  for level, (s, w) in enumerate(zip(sizes, widths)):
    skips += [(s, w)] * num_res_blocks
    if level != len(ch_mult) - 1:
      skips.append((sizes[level + 1], w))
  skip_elems = sum(s * s * w for s, w in skips)
  # Largest working set of one residual block: its (concatenated) input, the normalised input and
  # three tensors of its output width (conv1, norm2 / dropout, conv2 + skip).
  work = 0
  prev = widths[-1]
  for level in reversed(range(len(ch_mult))):
    s, w = sizes[level], widths[level]
    for _ in range(num_res_blocks + 1):
      w_in = prev + w  # upper bound of the concatenated skip width
      work = max(work, s * s * (2 * w_in + 3 * w))
      prev = w
  attn_bytes = 0
  for s, w in zip(sizes, widths):
    if s in tuple(attn_resolutions):
      heads = w // num_head_channels if num_head_channels > 0 else num_heads
      # q, k, v and the output, plus logits and probabilities [heads, s^2, s^2] in float32.
      attn_bytes = max(attn_bytes, 4 * s * s * w * dtype_bytes + 2 * heads * s ** 4 * 4)
  io = 2 * image_size * image_size * channels
  total = (skip_elems + work + io) * dtype_bytes + attn_bytes
  return int(math.ceil(SAFETY_FACTOR * total))


def scorer_image_bytes(image_size: int, channels: int, states_per_image: int) -> int:
  """Bytes the scorer keeps per image besides the network (float32 maps of every state)."""
  return _SCORER_FLOATS_PER_PIXEL * 4 * image_size * image_size * channels * states_per_image


def plan_scorer_batch(state_bytes: int, image_bytes: int, fixed_bytes: int, budget_bytes: float,
                      states_per_image: int, batch_size: int, chunk: int,
                      num_devices: int = 1) -> tuple[int, int]:
  """The largest (batch_size, chunk) of feature extraction whose memory fits ``budget_bytes``.

  Memory per device is ``fixed_bytes + images_per_step * (states_per_image * state_bytes +
  image_bytes)`` with ``images_per_step = chunk / num_devices`` (chunk > 0) or
  ``batch_size / num_devices`` (chunk = 0). The user's chunk is only lowered, never raised; a
  chunk that is used is a multiple of ``num_devices`` and divides the returned batch (so every
  device scores its own rows); the batch is ``batch_size`` rounded up to a multiple of the
  devices, then down to a multiple of the chunk. Results of the scorer do not depend on either.

  Args:
    state_bytes: peak bytes of one network evaluation (`unet_state_bytes`).
    image_bytes: the scorer's own bytes per image (`scorer_image_bytes`).
    fixed_bytes: bytes independent of the batch (parameters and their compute-dtype copy).
    budget_bytes: memory per device to stay under; ``<= 0`` or inf = no limit.
    states_per_image: R * K network evaluations per image.
    batch_size: ``config.scorer.batch_size`` (global).
    chunk: ``config.scorer.chunk`` (0 = no chunking).
    num_devices: devices the batch is split over.

  Returns:
    (batch_size, chunk), both global; chunk 0 = the whole batch in one step.

  Raises:
    ValueError: not even one image per device fits the budget.
  """
  d = max(int(num_devices), 1)
  per_image = states_per_image * state_bytes + image_bytes
  batch = -(-int(batch_size) // d) * d
  if budget_bytes is None or budget_bytes <= 0 or math.isinf(budget_bytes):
    fit = None
  else:
    fit = int((budget_bytes - fixed_bytes) // per_image)   # images per device per step
    if fit < 1:
      need = (fixed_bytes + per_image) / 2 ** 30
      raise ValueError(
          f'One image ({states_per_image} network evaluations) needs about {need:.2f} GiB per '
          f'device, more than the memory budget of {budget_bytes / 2 ** 30:.2f} GiB; raise '
          'config.scorer.memory_budget_gb, or lower config.scorer.num_steps / num_draws.')
  steps_images = batch // d if chunk <= 0 else -(-int(chunk) // d)   # per device per step
  if fit is not None:
    steps_images = min(steps_images, fit)
  if chunk <= 0 and steps_images * d >= batch:
    return batch, 0
  c = steps_images * d
  if 2 * c > batch:   # one step of c images: no chunking needed
    return c if c < batch else batch, 0
  return batch // c * c, c


def resolve_budget_bytes(budget_gb: float, device=None) -> float:
  """``config.scorer.memory_budget_gb`` in bytes; 0 = auto.

  Auto: `AUTO_BUDGET_FRACTION` of the accelerator's memory (``memory_stats()['bytes_limit']``);
  no limit on CPU (host memory is large and swaps; chunking there is a speed choice).
  """
  if budget_gb and budget_gb > 0:
    return float(budget_gb) * 2 ** 30
  if budget_gb and budget_gb < 0:
    raise ValueError(f'config.scorer.memory_budget_gb must be >= 0 (0 = auto), got {budget_gb}.')
  if device is None or device.platform == 'cpu':
    return math.inf
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  limit = stats.get('bytes_limit')
  return AUTO_BUDGET_FRACTION * float(limit) if limit else math.inf




def plan_for_config(config, param_count: int, num_devices: int, device=None) -> tuple[int, int]:
  """(batch_size, chunk) of feature extraction for a run's config under its memory budget.

  Args:
    config: the run's config (``model``, ``data``, ``scorer``, ``eval.feature_kinds``).
    param_count: scalars in the network's parameters.
    num_devices: devices the batch is split over.
    device: a device of the mesh (for the automatic budget); None = no limit.

  Returns:
    See `plan_scorer_batch`; with ``config.scorer.memory_budget_gb`` (0 = auto).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddm_ood import kinds  # pylint: disable=g-import-not-at-top
  from ddm_ood import settings  # pylint: disable=g-import-not-at-top
  from ddm_ood import unet  # pylint: disable=g-import-not-at-top
  sc, size, channels = config.scorer, config.data.image_size, config.data.channels
  backend = device.platform if device is not None else 'cpu'
  dtype = unet.resolve_compute_dtype(settings.section(config.model, 'model')['compute_dtype'],
                                     backend)
  k, r = int(sc.num_steps), int(sc.num_draws)
  # The forward trajectory sends R * K states of an image through the network at once; the DDIM
  # scan one. Each trajectory the kinds read keeps its states.
  paths = {p for kind in config.eval.feature_kinds
           for p in kinds.get(kind).trajectories_for(sc.mode)}
  states = r * k if 'forward' in paths else 1
  kept = (r * k if 'forward' in paths else 0) + (k if 'ddim' in paths else 0)
  state = unet_state_bytes(size, channels, dtype_bytes=jnp.dtype(dtype).itemsize,
                           **unet.family(config).memory_shape(config))
  fixed = param_count * (4 + jnp.dtype(dtype).itemsize)
  budget = resolve_budget_bytes(float(settings.section(sc, 'scorer')['memory_budget_gb']), device)
  return plan_scorer_batch(state, scorer_image_bytes(size, channels, kept), fixed, budget, states,
                           int(sc.batch_size), int(sc.chunk), num_devices)


__all__ = ['SAFETY_FACTOR', 'AUTO_BUDGET_FRACTION', 'unet_state_bytes', 'scorer_image_bytes',
           'plan_scorer_batch', 'resolve_budget_bytes', 'plan_for_config']
