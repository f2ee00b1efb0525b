"""Input complexity: how much structure an image holds, for scores that see both tails.

An error-energy score shares the weakness of likelihoods (Nalisnick et al. 2019; Serra et al.,
ICLR 2020): an image simpler than the ID data (less ink, thinner or cleaner strokes, flatter
texture) gets less error than ID images and looks *more* in-distribution. Serra et al. correct the
likelihood by the input's complexity (its compressed length). Here the complexity statistics join
the detector's feature vector (`ddm_ood.selection.Setting.complexity`), so the density model
learns the error energy ID images show *at a given complexity*, and an image whose energy is far
below (or above) that is out of its density on either side. docs/method.md, "Near-OOD".

Pure JAX (jittable; works on numpy input too), computed from the image alone:

=============  ======================================================================
statistic      definition (x in [-1, 1], over pixels and channels)
=============  ======================================================================
total var.     log(mean(|x[i+1, j] - x[i, j]|) + mean(|x[i, j+1] - x[i, j]|) + 1e-3)
spread         log(std(x) + 1e-3)
=============  ======================================================================

Total variation grows with edge length, the spread with the amount of ink / contrast; together
they tell thin from thick strokes and flat from busy textures, the way a compressor would.
"""

from __future__ import annotations

import jax.numpy as jnp

NAMES = ('total_variation', 'spread')
DIM = len(NAMES)
_EPS = 1e-3


def image_complexity(images) -> jnp.ndarray:
  """Complexity statistics [B, 2] (float32) of images [B, H, W, C] in [-1, 1] (see module doc)."""
  x = jnp.asarray(images, jnp.float32)
  dy = jnp.abs(x[:, 1:] - x[:, :-1]).mean(axis=(1, 2, 3))
  dx = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean(axis=(1, 2, 3))
  spread = x.reshape(x.shape[0], -1).std(axis=1)
  return jnp.stack([jnp.log(dy + dx + _EPS), jnp.log(spread + _EPS)], axis=-1)


__all__ = ['NAMES', 'DIM', 'image_complexity']
