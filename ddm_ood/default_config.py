"""Every configuration field of ddm_ood, with its default (the schema of all configs).

Variant configs import this file and override a few fields. Any field can be overridden on the
command line, e.g. ``--config.train.num_steps=10``.
"""

import ml_collections

from ddm_ood import synthetic


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
  # Network family (ddm_ood/nets: 'adm' = ddm_ood's own UNet, improved/guided-diffusion's
  # UNetModel; 'diffusers_unet2d' = Hugging Face diffusers' UNet2DModel, read from
  # model.diffusers_unet2d). The fields from ch to use_new_attention_order are the 'adm' family's.
  model.family = 'adm'
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
  # guided-diffusion (ADM, Dhariwal & Nichol 2021) options; ch_mult may then hold 0.5 (512x512).
  model.resblock_updown = False    # Residual blocks (avg-pool / nearest) down/upsample.
  model.num_head_channels = 0      # >0: heads = width // num_head_channels (0 = model.num_heads).
  model.use_new_attention_order = False  # The checkpoint's qkv layout (import only).
  model.prediction_type = 'epsilon'  # What the network outputs: 'epsilon', 'v_prediction' or
                                     # 'sample' (x0); converted to eps with the schedule.
  model.compute_dtype = 'auto'     # Activations: 'auto' (bfloat16 on TPU/GPU, float32 on CPU),
                                   # 'float32' or 'bfloat16'; parameters always float32.
  model.precision = 'default'      # Matmul / conv precision of the network (ddm_ood/network.py):
                                   # 'default' (GPU TF32, TPU bf16 passes), 'high' or 'highest'
                                   # (full float32: ~5x the float32 scoring time on an H200).
  model.attention = 'xla'          # 'xla', 'cudnn' or 'auto' (cuDNN's fused attention on a GPU
                                   # in bf16 / fp16 where it runs, else XLA's). XLA's stays the
                                   # default until cuDNN's is measured faster in one run
                                   # (docs/benchmarks.md).
  # family 'diffusers_unet2d': the fields of diffusers' UNet2DModel config.json, same names, its
  # defaults (written by `python -m ddm_ood.convert --diffusers=...`; any other key is refused).
  model.diffusers_unet2d = ml_collections.ConfigDict(dict(
      sample_size=0, in_channels=3, out_channels=3, center_input_sample=False,
      time_embedding_type='positional', time_embedding_dim=0, freq_shift=0, flip_sin_to_cos=True,
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
      mid_block_type='UNetMidBlock2D',
      up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
      block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0,
      downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0,
      act_fn='silu', attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=0,
      norm_eps=1e-5, resnet_time_scale_shift='default', add_attention=True,
      num_train_timesteps=0))

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'cosine'    # A name of schedule.SCHEDULE_REGISTRY: 'cosine' (Nichol &
                                   # Dhariwal), 'linear' (Ho et al.), 'diffusers_linear',
                                   # 'diffusers_scaled_linear', 'diffusers_squaredcos_cap_v2'.
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4      # Linear schedules: first beta ('linear' scales by 1000 / T).
  diffusion.beta_end = 0.02        # Linear schedules: last beta.

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
  # Every selected kind is a candidate of the zero-shot default ('zero_shot' row): the seed map
  # with and without SSIM, on the forward and the DDIM path, and both paths fused ('a+b').
  ev.feature_kinds = ('stein_ssim', 'stein', 'stein_ssim_ddim', 'stein_ddim',
                      'stein_ssim+stein_ssim_ddim', 'stein+stein_ddim', 'diffpath_6d',
                      'diffpath_1d')
  # Near-OOD: (ID, OOD) pairs evaluated with the same protocol, e.g. class splits of one source
  # (('mnist[0-4]', 'mnist[5-9]'),); reported apart from the ID x OOD suite above.
  ev.near_ood_pairs = ()
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
  # Whether the image's complexity statistics (ddm_ood/complexity.py) join the features: tried in
  # this order after the window, kept where they raise the criterion.
  select.complexity = (False, True)
  select.corruptions = synthetic.CORRUPTIONS   # every registered one (ddm_ood/synthetic.py)
  select.anomalies_per_image = 1   # synthetic anomalies per held-out image
  # The criterion: the mean of the lowest ceil(q * F) per-corruption AUROCs (q = 1: the mean).
  select.criterion_quantile = 1 / 3
  select.oracle = False            # Also the OOD-train oracle + leave-one-out (OOD exposure).
  select.localisation_images = 0   # >0: measure the anomaly map on pasted OOD patches.
  return config
