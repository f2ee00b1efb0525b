"""ddm_ood: zero-shot out-of-distribution detection with one pretrained diffusion model."""

__version__ = '0.1.0'
