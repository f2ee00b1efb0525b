"""Per-pixel anomaly maps of a fitted run: the localisation study and the report's heat maps.

`localisation_study` pastes OOD patches into ID-test images (`ddm_ood.localisation`) and measures
the pixel-level AUROC of the SSIM-weighted map against the map without SSIM;
`example_maps_fn` gives the report its per-example maps. Both use the zero-shot detectors'
per-timestep weights (`features.timestep_weights`). ``extractor`` is an
`evaluate.FeatureExtractor` (model, schedule, params, key).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ddm_ood import features as features_lib
from ddm_ood import localisation
from ddm_ood import pixel_maps
from ddm_ood import protocol
from ddm_ood import scorer
from ddm_ood import sharding


def _apply_fn(extractor):
  """The extractor's eval-mode network ``(params, x_t, t) -> eps_theta``."""
  return lambda p, x, t: extractor.model.apply(p, x, t)


def localisation_study(config, extractor, id_name: str, reducer,
                       baseline_reducer=None) -> dict:
  """Pixel AUROC of finding OOD patches pasted into ID-test images, anomaly map vs baseline map.

  The patches come from the test split of 'textures' (else the first other OOD set). The map is
  the seed method's SSIM-weighted Stein error with its zero-shot detector's per-timestep weights
  (`features.timestep_weights`); the baseline is the squared Stein error without SSIM, weighted
  by the 'stein' kind's own zero-shot detector when there is one (each map standardised by its
  own ID statistics), else by the same weights.
  """
  ev, n = config.eval, int(config.select.localisation_images)
  others = [o for o in ev.ood_datasets if o != id_name]
  donor = 'textures' if 'textures' in others else others[0]
  images = extractor.images(id_name, 'test', n)
  pasted, masks = localisation.paste_patches(
      images, extractor.images(donor, 'test', len(images)), config.seed)
  k = int(config.scorer.num_steps)
  weights = features_lib.timestep_weights(reducer, k)
  base_weights = (weights if baseline_reducer is None else
                  features_lib.timestep_weights(baseline_reducer, k))

  def maps_of(kind, w):
    map_fn = jax.jit(pixel_maps.make_anomaly_map_fn(_apply_fn(extractor), extractor.schedule,
                                                    config.scorer, kind))
    ids, bs, outs = np.asarray(scorer.content_ids(pasted)), 50, []
    for i in range(0, len(pasted), bs):
      x, mask = sharding.pad_to_multiple(pasted[i:i + bs], bs)
      d, _ = sharding.pad_to_multiple(ids[i:i + bs], bs)
      out = map_fn(extractor.params, jnp.asarray(x), jnp.asarray(d), extractor.key,
                   jnp.asarray(w))
      outs.append({name: np.asarray(v)[mask] for name, v in out.items()})
    return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

  maps = maps_of(protocol.SEED_KIND, weights)
  if baseline_reducer is not None:   # 'stein' maps are e_k^2: its 'map' is the baseline
    maps['baseline'] = maps_of('stein', base_weights)['map']
  aurocs = localisation.localisation_auroc(maps, masks)
  logging.info('localisation (%s + %s patches): map %.4f, baseline %.4f', id_name, donor,
               aurocs['map'], aurocs['baseline'])
  return dict(id=id_name, donor=donor, num_images=len(images), auroc_map=aurocs['map'],
              auroc_baseline=aurocs['baseline'], timestep_weights=weights.tolist(),
              baseline_timestep_weights=base_weights.tolist(),
              examples=dict(images=pasted[:4].tolist(), masks=masks[:4].astype(int).tolist(),
                            map=maps['map'][:4].tolist(), baseline=maps['baseline'][:4].tolist()))


def example_maps_fn(config, extractor, fitted: dict):
  """``(images, ids) -> maps`` for the report: `pixel_maps.trajectory_maps` plus the anomaly map of
  the first ID set's zero-shot detector (its per-timestep weights)."""
  apply_fn = _apply_fn(extractor)
  seed = fitted.get(protocol.SEED_KIND)
  k = int(config.scorer.num_steps)
  weights = (features_lib.timestep_weights(seed.detector.reducer, k)
             if seed is not None and seed.detector.reducer is not None else np.ones(k, np.float32))
  map_fn = jax.jit(pixel_maps.make_anomaly_map_fn(apply_fn, extractor.schedule, config.scorer))

  def example_maps(images, ids):
    out = pixel_maps.trajectory_maps(apply_fn, extractor.schedule, config.scorer,
                                     extractor.params, images, ids, extractor.key)
    out['anomaly_map'] = np.asarray(map_fn(extractor.params, jnp.asarray(images, jnp.float32),
                                           jnp.asarray(ids, jnp.int32), extractor.key,
                                           jnp.asarray(weights))['map'])
    return out
  return example_maps


__all__ = ['localisation_study', 'example_maps_fn']
