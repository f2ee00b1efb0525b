"""DiffPath's CelebA base model at paper scale (32x32 RGB, 52.5M-parameter ADM UNet, cosine
T = 4000, AdamW 1e-4, batch 128, 500k steps, EMA 0.9999) and the standard OOD suite.

Needs TFDS-prepared data (see ddm_ood/data/tfds_source.py) and an accelerator:

  python -m ddm_ood.main --config=configs/celeba.py --workdir=gs://.../celeba --mode=train
"""

from ddm_ood import default_config


def get_config():
  """Returns the CelebA (paper-scale) configuration."""
  config = default_config.get_config()
  config.data.dataset = 'tfds:celeb_a'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.max_train_examples = 0

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.dropout = 0.3
  config.model.num_groups = 32

  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 4000

  tc = config.train
  tc.batch_size = 128
  tc.num_steps = 500_000
  tc.learning_rate = 1e-4
  tc.warmup_steps = 5000
  tc.weight_decay = 0.0
  tc.grad_clip = 1.0
  tc.ema_decay = 0.9999
  tc.log_every = 100
  tc.checkpoint_every = 5000
  tc.keep_checkpoints = 3
  tc.sample_every = 50_000
  tc.num_samples = 64
  tc.sample_steps = 100

  config.scorer.num_steps = 10          # t = 0, 400, ..., 3600 of T = 4000 (DiffPath).
  config.scorer.batch_size = 256

  config.detector.n_components = (50, 100)
  config.detector.covariance_types = ('full', 'tied', 'diag', 'spherical')
  config.detector.cv_folds = 3

  ev = config.eval
  ev.id_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a')
  ev.ood_datasets = ('tfds:cifar10', 'tfds:svhn_cropped', 'tfds:celeb_a', 'tfds:cifar100',
                     'tfds:dtd')
  ev.num_fit = 50_000
  ev.num_test = 10_000
  return config
