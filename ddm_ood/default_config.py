"""Every configuration field of ddm_ood, with its default (the schema of all configs).

Variant configs import this file and override a few fields. Any field can be overridden on the
command line, e.g. ``--config.train.num_steps=10``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (a small model on the installable Fashion-MNIST)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'fashion_mnist'   # Source the base DDM is trained on (see ddm_ood/data/).
  data.image_size = 28             # Model resolution; every source is resized to it.
  data.channels = 1                # 1 = gray, 3 = RGB; sources are converted.
  data.data_dir = ''               # TFDS data_dir for 'tfds:*' sources ('' = TFDS default).
  data.max_train_examples = 0      # 0 = all training images of the source.
  data.texture_crops = 2000        # Crops per split for the GIMP 'textures' source.
  data.synthetic_examples = 1000   # Images per split for noise / constant controls.
  data.resize_via = 0              # >0: resize every image to this size first, then to
                                   # image_size (DiffPath's "correct resizing"; 0 = off).

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.ch = 32
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (7,)
  model.num_heads = 4
  model.dropout = 0.1
  model.num_groups = 8             # GroupNorm groups (32 in ADM; must divide every width).
  # improved-diffusion (ADM) compatibility, for converted PyTorch checkpoints (ddm_ood/convert.py):
  model.norm_eps = 1e-6            # GroupNorm epsilon (PyTorch / ADM: 1e-5).
  model.learn_sigma = False        # 2 x channels outputs (eps, variance); only eps is used.
  model.downsample_padding = 'same'  # 'same' (flax, pads (0, 1)) or 'symmetric' (PyTorch, (1, 1)).
  model.rescale_timesteps = False  # The network sees t * 1000 / diffusion.num_timesteps.
  model.compute_dtype = 'auto'     # Activations: 'auto' (bfloat16 on TPU/GPU, float32 on CPU),
                                   # 'float32' or 'bfloat16'; parameters always float32.
  model.precision = 'default'      # Matmul / conv precision of the network (ddm_ood/network.py):
                                   # 'default' (GPU TF32, TPU bf16 passes), 'high' or 'highest'
                                   # (full float32: ~5x the float32 scoring time on an H200).
  model.attention = 'auto'         # 'auto' (cuDNN fused attention on a GPU in bf16 / fp16 where
                                   # it runs, else XLA's), 'xla' or 'cudnn'.

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'cosine'    # 'cosine' (Nichol & Dhariwal) or 'linear' (Ho et al.).
  diffusion.num_timesteps = 1000

  # ---------------------------------------------------------------- training
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64            # Global batch over all devices and hosts.
  train.num_steps = 1000
  train.learning_rate = 1e-3
  train.warmup_steps = 100
  train.lr_schedule = 'constant'   # after warmup: 'constant' or 'cosine' (decay to 0 at num_steps)
  train.weight_decay = 0.0
  train.grad_clip = 1.0
  train.ema_decay = 0.999
  train.log_every = 50
  train.checkpoint_every = 250
  train.keep_checkpoints = 3
  train.sample_every = 0           # 0 = only at the end of training.
  train.num_samples = 64           # Images in the EMA sample grid.
  train.sample_steps = 50          # DDIM steps for the sample grid.

  # ---------------------------------------------------------------- trajectory scorer
  config.scorer = scorer = ml_collections.ConfigDict()
  scorer.mode = 'forward'          # 'forward' (all timesteps at once) or 'ddim' (DDIM inversion scan).
  scorer.num_steps = 10            # K timesteps t_k = k * T / K, k = 0..K-1.
  scorer.t_min = 0                 # Seed kinds use only the grid points t_k >= t_min (baselines all).
  scorer.noise = 'shared'          # 'shared' (one eps per image and draw) or 'independent' (per t_k).
  scorer.num_draws = 1             # R noise draws, averaged (forward mode).
  scorer.ssim_pair = 'x0'          # 'x0': SSIM(x0, x0hat_k); 'eps': SSIM(eps_theta, eps).
  scorer.ssim_weight = 'one_minus' # 'one_minus': w = 1 - SSIM; 'two_minus': w = 2 - SSIM.
  scorer.scale_by_sigma = False    # Divide eps-space errors by sigma_t (true score units).
  scorer.ssim_filter_size = 11
  scorer.ssim_filter_sigma = 1.5
  scorer.ssim_k1 = 0.01
  scorer.ssim_k2 = 0.03
  scorer.chunk = 0                 # >0: evaluate images in chunks of this size (bounds memory).
  scorer.batch_size = 128          # Images per compiled call during feature extraction.
  scorer.memory_budget_gb = 0.0    # Per-device memory the scorer may use; batch and chunk are
                                   # lowered to fit (0 = auto: 75% of an accelerator, CPU no limit).

  # ---------------------------------------------------------------- detector
  config.detector = detector = ml_collections.ConfigDict()
  detector.n_components = (50, 100)
  detector.covariance_types = ('full', 'tied', 'diag', 'spherical')
  detector.cv_folds = 3
  detector.kde_bandwidth = 5.0     # Gaussian KDE bandwidth for 1-D features (DiffPath-1D).
  detector.max_iter = 200
  detector.reg_covar = 1e-6
  detector.kde_standardize = False # Fit the KDE on the standardised statistic (bandwidth in std units).
  detector.sklearn_threads = 1     # BLAS/OpenMP threads of the GMM fits (0 = library default).

  # ---------------------------------------------------------------- evaluation suite
  config.eval = ev = ml_collections.ConfigDict()
  ev.id_datasets = ('fashion_mnist', 'mnist', 'textures')
  ev.ood_datasets = ('fashion_mnist', 'mnist', 'textures', 'digits', 'lfw_faces',
                     'noise_gaussian', 'noise_uniform')
  ev.feature_kinds = ('stein_ssim', 'stein', 'diffpath_6d', 'diffpath_1d')
  ev.num_fit = 2000                # ID-train images the detector is fitted on (0 = all).
  ev.num_test = 1000               # Test images per set (0 = all).
  ev.num_examples_plot = 4

  # ---------------------------------------------------------------- zero-shot selection
  # The seed-family kinds' window and aggregation are chosen per ID set from ID images only:
  # detectors fitted on the num_fit ID-train images are judged on the next num_val ID-train
  # images vs synthetic anomalies made from them (ddm_ood/synthetic.py). docs/method.md.
  config.select = select = ml_collections.ConfigDict()
  select.num_val = 250             # Held-out ID-train images (after the fit images).
  # Candidate windows t_k >= f * diffusion.num_timesteps (snapped to the grid).
  select.t_min_fractions = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
  select.aggregations = ('zsum',)  # Candidates from 'sum' (as published), 'zsum', 'concat'.
  select.corruptions = ('patch_shuffle', 'cutpaste', 'blend', 'blur', 'noise', 'invert')
  select.oracle = False            # Also the OOD-train oracle + leave-one-out (OOD exposure).
  select.localisation_images = 0   # >0: measure the anomaly map on pasted OOD patches.
  return config
