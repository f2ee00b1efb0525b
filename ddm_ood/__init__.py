"""ddm_ood: zero-shot out-of-distribution detection with one pretrained diffusion model.

The public surface (see README.md and docs/design.md):

* `make_schedule`, `UNet` / `build_model`: the diffusion model.
* `make_trajectory_scorer`: pure ``(params, images, image_ids, key) -> features``.
* `fit_detector` (scikit-learn, fit time) and `anomaly_score` (pure JAX; higher = more OOD).
* `ood_metrics`: AUROC, FPR95, AUPR-In / AUPR-Out.
* `load_anomaly_scorer` / `make_anomaly_fn`: a trained workdir as one jittable function.
* `load_denoiser` / `load_feature_fn`: a workdir's network / features as jittable functions.
"""

from ddm_ood.api import load_anomaly_scorer
from ddm_ood.api import load_denoiser
from ddm_ood.api import load_feature_fn
from ddm_ood.api import make_anomaly_fn
from ddm_ood.detector import anomaly_score
from ddm_ood.detector import fit_detector
from ddm_ood.metrics import ood_metrics
from ddm_ood.schedule import make_schedule
from ddm_ood.schedule import Schedule
from ddm_ood.scorer import FEATURE_KINDS
from ddm_ood.scorer import make_trajectory_scorer
from ddm_ood.unet import build_model
from ddm_ood.unet import UNet

__version__ = '0.1.0'

__all__ = ['FEATURE_KINDS', 'Schedule', 'UNet', 'anomaly_score', 'build_model', 'fit_detector',
           'load_anomaly_scorer', 'load_denoiser', 'load_feature_fn', 'make_anomaly_fn',
           'make_schedule', 'make_trajectory_scorer', 'ood_metrics']
