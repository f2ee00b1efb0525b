"""The embedded default: a small UNet on Fashion-MNIST (28x28 gray) that trains on a 2-core CPU
in about 8-10 minutes (Debian's installed idx files; no download).

  python -m ddm_ood.main --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
"""

import importlib.util
import os


def _default_config():
  """configs/default.py's get_config(), loaded by path so any cwd works (config_flags too)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py')
  spec = importlib.util.spec_from_file_location('ddm_ood_configs_default', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  """Returns the Fashion-MNIST configuration."""
  config = _default_config()
  config.data.dataset = 'fashion_mnist'
  config.data.image_size = 28
  config.data.channels = 1

  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.num_heads = 4
  config.model.dropout = 0.1
  config.model.num_groups = 8

  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000

  tc = config.train
  tc.batch_size = 64
  tc.num_steps = 500
  tc.learning_rate = 1e-3
  tc.warmup_steps = 50
  tc.weight_decay = 0.0
  tc.grad_clip = 1.0
  tc.ema_decay = 0.999
  tc.log_every = 25
  tc.checkpoint_every = 100
  tc.sample_every = 0
  tc.num_samples = 64
  tc.sample_steps = 50
  return config
