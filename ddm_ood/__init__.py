"""ddm_ood: zero-shot out-of-distribution detection with one pretrained diffusion model.

The public surface (see README.md and docs/design.md):

* `make_schedule`, `UNet` / `build_model`: the diffusion model.
* `make_trajectory_scorer`: pure ``(params, images, image_ids, key) -> features``.
* `fit_detector` (scikit-learn, fit time) and `anomaly_score` (pure JAX; higher = more OOD).
* `ood_metrics`: AUROC, FPR95, AUPR-In / AUPR-Out.
* `load_anomaly_scorer` / `make_anomaly_fn`: a trained workdir as one jittable function.
* `load_denoiser` / `load_feature_fn`: a workdir's network / features as jittable functions.
"""

import importlib

__version__ = '0.1.0'

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# `import ddm_ood.kinds` or the tcmalloc check of `python -m ddm_ood.main` (ddm_ood/host_malloc.py)
# does not load JAX, Orbax and scikit-learn first.
_EXPORTS = {
    'load_anomaly_scorer': 'api', 'load_denoiser': 'api', 'load_feature_fn': 'api',
    'make_anomaly_fn': 'api', 'anomaly_score': 'detector', 'fit_detector': 'detector',
    'ood_metrics': 'metrics', 'make_schedule': 'schedule', 'Schedule': 'schedule',
    'FEATURE_KINDS': 'scorer', 'make_trajectory_scorer': 'scorer', 'build_model': 'unet',
    'UNet': 'unet',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f'ddm_ood.{_EXPORTS[name]}'), name)
  else:
    try:  # a submodule: `import ddm_ood; ddm_ood.api` as before
      value = importlib.import_module(f'ddm_ood.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'ddm_ood.{name}':
        raise
      raise AttributeError(f"module 'ddm_ood' has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
