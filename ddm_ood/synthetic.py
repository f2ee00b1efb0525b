"""Synthetic anomalies made from in-distribution images, for choosing settings without OOD data.

``make_anomalies(images, seed, corruptions, per_image)`` corrupts each ID image ``per_image``
times (anomaly ``j`` of the ``N * per_image`` is image ``j % N`` under
``corruptions[j % len(corruptions)]``; its randomness comes from ``(seed, j)`` only), so a
zero-shot selection protocol can compare held-out ID images with anomalies of the same images
(`ddm_ood.selection`). Everything here sees ID images only. numpy, on the host; deterministic.

Every corruption is registered once (`register`, `REGISTRY`); ``config.select.corruptions``
takes its default and its allowed values from the registry. Each belongs to a family, so the
selection can report (and be judged on) what kind of anomaly a candidate misses:

* 'broken': more broken than ID images (the obvious anomalies);
* 'simpler': simpler than ID images: less ink, thinner or cleaner strokes, flatter texture. An
  error-energy score calls these *more* in-distribution than ID images unless it sees both tails
  (docs/method.md, "Near-OOD");
* 'shifted': ID-like parts in a new arrangement or shape (semantic / geometric shift).

=================  =========  =====================================================================
corruption         family     what changes
=================  =========  =====================================================================
'patch_shuffle'    broken     the 4 x 4 grid of patches permuted: local texture kept, layout broken
'cutpaste'         broken     a rectangle (30-60% of the side) of another ID image pasted somewhere
'noise'            broken     additive Gaussian noise, std 0.2 (in [-1, 1] units), clipped
'invert'           broken     -x (contrast polarity flipped)
'blur'             simpler    Gaussian blur, sigma 1.5 pixels (fine structure removed)
'erode'            simpler    3 x 3 grey-level erosion (minimum): bright strokes thinner
'low_contrast'     simpler    the image pulled towards its background, to 35-60% of its contrast
'quantise'         simpler    two grey levels (threshold halfway between min and max): clean strokes
'erase'            simpler    a rectangle (30-50% of the side) on the content filled with the
                              background
'blend'            shifted    the mean of the image and another ID image
'dilate'           shifted    3 x 3 grey-level dilation (maximum): bright strokes thicker
'rescale'          shifted    content scaled about the centre by 0.55-0.75 or 1.3-1.6
'shift'            shifted    content moved by 20-30% of the side (wrapping off, background fill)
'mix_halves'       shifted    one half (top/bottom or left/right) replaced by another ID image's
=================  =========  =====================================================================

The background of an image is the median of its one-pixel border (per channel).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

FAMILIES = ('broken', 'simpler', 'shifted')
VERSION = 2             # part of the feature-cache key: bump when a corruption changes
GRID = 4                 # patch_shuffle: GRID x GRID patches
BLUR_SIGMA = 1.5
NOISE_STD = 0.2
_RNG_TAG = 0x5EED       # keeps these streams apart from other numpy streams of the same seed

CorruptFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Corruption:
  """One registered corruption: ``fn(x [H, W, C], donor [H, W, C], rng) -> [H, W, C]``."""
  name: str
  family: str
  fn: CorruptFn


REGISTRY: dict[str, Corruption] = {}


def register(name: str, family: str) -> Callable[[CorruptFn], CorruptFn]:
  """Decorator: registers ``fn`` as the corruption ``name`` of ``family`` (one of `FAMILIES`)."""
  if family not in FAMILIES:
    raise ValueError(f'Unknown corruption family {family!r}; choose from {FAMILIES}.')

  def deco(fn: CorruptFn) -> CorruptFn:
    if name in REGISTRY:
      raise ValueError(f'Corruption {name!r} is registered twice.')
    REGISTRY[name] = Corruption(name, family, fn)
    return fn
  return deco


def _background(x: np.ndarray) -> np.ndarray:
  """Per-channel median of the one-pixel border [1, 1, C]."""
  border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]], axis=0)
  return np.median(border, axis=0)[None, None, :]


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of one image [H, W, C] with reflect padding."""
  r = max(1, int(round(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode='reflect')
  rows = sum(k[j] * pad[j:j + x.shape[0]] for j in range(2 * r + 1))
  return sum(k[j] * rows[:, j:j + x.shape[1]] for j in range(2 * r + 1))


def _grey_morphology(x: np.ndarray, op: Callable) -> np.ndarray:
  """3 x 3 grey-level erosion (``op=np.min``) or dilation (``np.max``) with edge padding."""
  h, w = x.shape[:2]
  pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode='edge')
  return op(np.stack([pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]), axis=0)


def _rect(h: int, w: int, lo: float, hi: float, rng: np.random.Generator):
  """A random rectangle (y, x, height, width) with sides in [lo, hi] of the image's."""
  ph = int(rng.integers(max(1, int(lo * h)), max(2, int(hi * h)) + 1))
  pw = int(rng.integers(max(1, int(lo * w)), max(2, int(hi * w)) + 1))
  return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)), ph, pw


def _resample(x: np.ndarray, scale: float, dy: float, dx: float) -> np.ndarray:
  """x sampled at ``(p - c - d) / scale + c`` (bilinear), background outside: content scaled by
  ``scale`` about the centre ``c`` and moved by ``(dy, dx)`` pixels."""
  h, w = x.shape[:2]
  bg = _background(x)
  ys = (np.arange(h) - (h - 1) / 2 - dy) / scale + (h - 1) / 2
  xs = (np.arange(w) - (w - 1) / 2 - dx) / scale + (w - 1) / 2
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  pad = np.concatenate([np.broadcast_to(bg, (1, w, x.shape[2])), x,
                        np.broadcast_to(bg, (1, w, x.shape[2]))], axis=0)
  pad = np.concatenate([np.broadcast_to(bg, (h + 2, 1, x.shape[2])), pad,
                        np.broadcast_to(bg, (h + 2, 1, x.shape[2]))], axis=1)
  yi = np.clip(y0 + 1, 0, h + 1)
  yj = np.clip(y0 + 2, 0, h + 1)
  xi = np.clip(x0 + 1, 0, w + 1)
  xj = np.clip(x0 + 2, 0, w + 1)
  out = ((1 - fy) * (1 - fx) * pad[yi][:, xi] + (1 - fy) * fx * pad[yi][:, xj]
         + fy * (1 - fx) * pad[yj][:, xi] + fy * fx * pad[yj][:, xj])
  return out


# ------------------------------------------------------------------------------ broken


@register('patch_shuffle', 'broken')
def _patch_shuffle(x, donor, rng):
  del donor
  h, w = x.shape[:2]
  ph, pw = h // GRID, w // GRID
  out = x.copy()
  patches = [x[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] for i in range(GRID) for j in range(GRID)]
  perm = rng.permutation(len(patches))
  if np.all(perm == np.arange(len(perm))):
    perm = np.roll(perm, 1)
  for n, p in enumerate(perm):
    i, j = divmod(n, GRID)
    out[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = patches[p]
  return out


@register('cutpaste', 'broken')
def _cutpaste(x, donor, rng):
  h, w = x.shape[:2]
  sy, sx, ph, pw = _rect(h, w, 0.3, 0.6, rng)
  dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
  out = x.copy()
  out[dy:dy + ph, dx:dx + pw] = donor[sy:sy + ph, sx:sx + pw]
  return out


@register('noise', 'broken')
def _noise(x, donor, rng):
  del donor
  return x + NOISE_STD * rng.standard_normal(x.shape)


@register('invert', 'broken')
def _invert(x, donor, rng):
  del donor, rng
  return -x


# ------------------------------------------------------------------------------ simpler


@register('blur', 'simpler')
def _blur(x, donor, rng):
  del donor, rng
  return _gaussian_blur(x, BLUR_SIGMA)


@register('erode', 'simpler')
def _erode(x, donor, rng):
  del donor, rng
  return _grey_morphology(x, np.min)


@register('low_contrast', 'simpler')
def _low_contrast(x, donor, rng):
  del donor
  bg = _background(x)
  return bg + rng.uniform(0.35, 0.6) * (x - bg)


@register('quantise', 'simpler')
def _quantise(x, donor, rng):
  del donor, rng
  lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
  return np.where(x > 0.5 * (lo + hi), hi, lo)


@register('erase', 'simpler')
def _erase(x, donor, rng):
  del donor
  h, w = x.shape[:2]
  bg = _background(x)
  _, _, ph, pw = _rect(h, w, 0.3, 0.5, rng)
  # Centred on a content pixel (drawn with weight |x - background|), so content is erased.
  weight = np.abs(x - bg).sum(-1).ravel()
  p = weight / weight.sum() if weight.sum() > 0 else None
  cy, cx = divmod(int(rng.choice(h * w, p=p)), w)
  y0 = int(np.clip(cy - ph // 2, 0, h - ph))
  x0 = int(np.clip(cx - pw // 2, 0, w - pw))
  out = x.copy()
  out[y0:y0 + ph, x0:x0 + pw] = bg
  return out


# ------------------------------------------------------------------------------ shifted


@register('blend', 'shifted')
def _blend(x, donor, rng):
  del rng
  return 0.5 * (x + donor)


@register('dilate', 'shifted')
def _dilate(x, donor, rng):
  del donor, rng
  return _grey_morphology(x, np.max)


@register('rescale', 'shifted')
def _rescale(x, donor, rng):
  del donor
  scale = rng.uniform(0.55, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.6)
  return _resample(x, scale, 0.0, 0.0)


@register('shift', 'shifted')
def _shift(x, donor, rng):
  del donor
  h, w = x.shape[:2]
  angle = rng.uniform(0, 2 * np.pi)
  dist = rng.uniform(0.2, 0.3)
  return _resample(x, 1.0, dist * h * np.sin(angle), dist * w * np.cos(angle))


@register('mix_halves', 'shifted')
def _mix_halves(x, donor, rng):
  out = x.copy()
  h, w = x.shape[:2]
  which = int(rng.integers(0, 4))    # replace the top, bottom, left or right half
  if which == 0:
    out[:h // 2] = donor[:h // 2]
  elif which == 1:
    out[h // 2:] = donor[h // 2:]
  elif which == 2:
    out[:, :w // 2] = donor[:, :w // 2]
  else:
    out[:, w // 2:] = donor[:, w // 2:]
  return out


CORRUPTIONS = tuple(REGISTRY)


def family_of(name: str) -> str:
  """The family ('broken' | 'simpler' | 'shifted') of a registered corruption."""
  return get(name).family


def get(name: str) -> Corruption:
  """The registered corruption ``name``; ValueError naming the choices for an unknown one."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown corruption {name!r}; choose from {CORRUPTIONS}.') from None


def corrupt(x: np.ndarray, donor: np.ndarray, corruption: str,
            rng: np.random.Generator) -> np.ndarray:
  """One corrupted image [H, W, C] (float32 in [-1, 1]) from ``x`` and a donor ID image."""
  y = get(corruption).fn(x, donor, rng)
  return np.clip(y, -1.0, 1.0).astype(np.float32)


def make_anomalies(images: np.ndarray, seed: int, corruptions: Sequence[str] = CORRUPTIONS,
                   per_image: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic anomalies of ID images, ``per_image`` per image.

  Args:
    images: ID images [N, H, W, C] float in [-1, 1], N >= 2, H, W >= 4.
    seed: integer seed; anomaly j's randomness is ``default_rng([seed, _RNG_TAG, j])``.
    corruptions: names from `CORRUPTIONS`; anomaly j is image ``j % N`` under
      ``corruptions[j % len(corruptions)]``, with donor image ``(j % N + N // 2) % N`` (pick a
      ``per_image`` coprime to ``len(corruptions)`` to give every image several corruptions).
    per_image: anomalies per ID image (>= 1).

  Returns:
    (anomalies [N * per_image, H, W, C] float32, corruption index [N * per_image] int32 into
    ``corruptions``). The first N rows are the same for any ``per_image``.

  Raises:
    ValueError: an unknown corruption, an empty list, fewer than 2 images, a bad shape or
      ``per_image`` < 1.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or min(x.shape[1:3]) < 4:
    raise ValueError(f'images must have shape [N, H, W, C] with H, W >= 4, got {x.shape}.')
  if len(x) < 2:
    raise ValueError(f'make_anomalies needs at least 2 ID images (donors), got {len(x)}.')
  corruptions = tuple(corruptions)
  if not corruptions:
    raise ValueError(f'corruptions is empty; choose from {CORRUPTIONS}.')
  for c in corruptions:
    get(c)
  if int(per_image) < 1:
    raise ValueError(f'per_image must be >= 1, got {per_image}.')
  n = len(x)
  total = n * int(per_image)
  out = np.empty((total,) + x.shape[1:], np.float32)
  which = np.arange(total, dtype=np.int32) % len(corruptions)
  for j in range(total):
    i = j % n
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _RNG_TAG, j])
    out[j] = corrupt(x[i], x[(i + n // 2) % n], corruptions[which[j]], rng)
  return out, which


__all__ = ['FAMILIES', 'VERSION', 'Corruption', 'REGISTRY', 'CORRUPTIONS', 'register', 'get', 'family_of',
           'corrupt', 'make_anomalies']
