"""A tiny configuration for tests: a few-thousand-parameter UNet on 16x16 gray images.

  python -m ddm_ood.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from ddm_ood import default_config


def get_config():
  """Returns the tiny test configuration."""
  config = default_config.get_config()
  config.data.dataset = 'fashion_mnist'
  config.data.image_size = 16
  config.data.channels = 1
  config.data.max_train_examples = 64
  config.data.texture_crops = 32
  config.data.synthetic_examples = 32

  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_heads = 2
  config.model.dropout = 0.1
  config.model.num_groups = 4

  config.diffusion.num_timesteps = 100

  tc = config.train
  tc.batch_size = 8
  tc.num_steps = 4
  tc.learning_rate = 1e-3
  tc.warmup_steps = 2
  tc.log_every = 1
  tc.checkpoint_every = 2
  tc.keep_checkpoints = 3
  tc.sample_every = 0
  tc.num_samples = 4
  tc.sample_steps = 3

  config.scorer.batch_size = 16
  config.scorer.num_steps = 4

  config.detector.n_components = (1, 2)
  config.detector.covariance_types = ('diag', 'full')
  config.detector.cv_folds = 2
  config.detector.max_iter = 50

  config.eval.id_datasets = ('fashion_mnist',)
  config.eval.ood_datasets = ('mnist', 'noise_gaussian')
  # Every registered kind and a fused one, so the end-to-end tests run each through the scorer,
  # the protocol, the report, the memory plan and the API; one near-OOD class split.
  config.eval.feature_kinds = ('stein_ssim', 'stein', 'eps_ssim', 'stein_ssim_ddim',
                               'stein_ddim', 'stein+stein_ddim', 'diffpath_6d', 'diffpath_1d')
  config.eval.near_ood_pairs = (('mnist[0-4]', 'mnist[5-9]'),)
  config.eval.num_fit = 64
  config.eval.num_test = 32
  config.eval.num_examples_plot = 2
  config.select.num_val = 24
  config.select.t_min_fractions = (0.0, 0.5)
  return config
