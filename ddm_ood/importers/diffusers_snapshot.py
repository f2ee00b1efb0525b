"""Importer of Hugging Face diffusers ``UNet2DModel`` snapshots (family 'diffusers_unet2d').

``python -m ddm_ood.convert --diffusers=DIR`` reads, without torch or diffusers:

* a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``; e.g. a download of
  ``google/ddpm-cifar10-32``) or a flat model folder (``config.json`` and
  ``scheduler_config.json`` side by side);
* ``config.json``: every field of ``UNet2DModel`` maps to ``config.model.diffusers_unet2d``
  (same names); a key this module does not know, a non-null class embedding, or a value the flax
  network does not compute (`diffusers_unet2d.unsupported_options`) is one ValueError naming them;
* ``scheduler_config.json``: ``num_train_timesteps``, ``beta_schedule`` ('linear',
  'scaled_linear', 'squaredcos_cap_v2' -> ``config.diffusion.schedule`` 'diffusers_<name>'),
  ``beta_start`` / ``beta_end`` and ``prediction_type`` (-> ``config.model.prediction_type``;
  v and x0 predictions are converted to eps). Sampler-only fields (`SAMPLER_ONLY_KEYS`) do not
  change the network or the forward process and are ignored; anything else is refused;
* the weights, ``diffusion_pytorch_model.safetensors`` (or ``.bin``, which needs torch), with
  diffusers' pre-0.14 attention names (``query`` / ``key`` / ``value`` / ``proj_attn``) accepted.

Everything is read and checked before the workdir is touched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ddm_ood import default_config
from ddm_ood import diffusers_unet2d
from ddm_ood import schedule as schedule_lib
from ddm_ood import unet as unet_lib
from ddm_ood.importers.state_dict import load_state_dict

WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
# UNet2DModel fields that must be null: ddm_ood scores without class labels.
NULL_ONLY_KEYS = ('class_embed_type', 'num_class_embeds')
# Scheduler classes whose betas / alphas_cumprod come from the same code (diffusers 0.42).
SCHEDULER_CLASSES = ('DDPMScheduler', 'DDIMScheduler', 'PNDMScheduler')
SCHEDULE_KEYS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
                 'trained_betas', 'prediction_type', 'rescale_betas_zero_snr')
# Fields of those schedulers that only change how they sample, not the forward process.
SAMPLER_ONLY_KEYS = ('variance_type', 'clip_sample', 'clip_sample_range', 'thresholding',
                     'dynamic_thresholding_ratio', 'sample_max_value', 'timestep_spacing',
                     'steps_offset', 'set_alpha_to_one', 'skip_prk_steps')
_SHOW = 6


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from e


def snapshot_files(snapshot_dir: str) -> tuple[str, str, str]:
  """(UNet config.json, scheduler config, weight file) of a pipeline or flat model folder.

  Raises:
    FileNotFoundError: the folder or one of the three files is missing (the message lists what
      was looked for).
    ValueError: a pipeline whose ``unet`` is not a ``UNet2DModel``.
  """
  root = os.path.abspath(os.path.expanduser(snapshot_dir))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--diffusers={snapshot_dir}: no such folder (pass the snapshot '
                            'folder: config.json + weights, or a pipeline with model_index.json).')
  index = os.path.join(root, 'model_index.json')
  if os.path.exists(index):
    info = _read_json(index)
    unet_entry = info.get('unet')
    if not (isinstance(unet_entry, list) and unet_entry[-1] == 'UNet2DModel'):
      raise ValueError(f'{index}: the pipeline\'s unet is {unet_entry!r}; ddm_ood reads '
                       "UNet2DModel pipelines (family 'diffusers_unet2d') only.")
    model_dir = os.path.join(root, 'unet')
    scheduler = os.path.join(root, 'scheduler', 'scheduler_config.json')
  else:
    model_dir = root
    scheduler = os.path.join(root, 'scheduler_config.json')
  config = os.path.join(model_dir, 'config.json')
  weights = [os.path.join(model_dir, w) for w in WEIGHT_FILES]
  found = [w for w in weights if os.path.exists(w)]
  missing = [p for p in (config, scheduler) if not os.path.exists(p)] + ([] if found else weights)
  if missing:
    raise FileNotFoundError(f'--diffusers={snapshot_dir}: missing {", ".join(missing)} (a '
                            'diffusers snapshot has the model config, its weights and the '
                            "scheduler's config; flat folders keep scheduler_config.json next to "
                            'config.json).')
  return config, scheduler, found[0]


def model_fields(unet_dict: dict, where: str) -> dict[str, Any]:
  """``config.model.diffusers_unet2d`` from a ``UNet2DModel`` config.json (null -> 0 / '')."""
  schema = default_config.get_config().model.diffusers_unet2d.to_dict()
  cls = unet_dict.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    raise ValueError(f"{where}: _class_name is {cls!r}; ddm_ood reads UNet2DModel (family "
                     "'diffusers_unet2d') only (a latent or text-conditional UNet is not a "
                     'pixel-space eps network).')
  unknown = [k for k in unet_dict if not k.startswith('_') and k not in schema
             and k not in NULL_ONLY_KEYS]
  set_labels = [f'{k}={unet_dict[k]!r}' for k in NULL_ONLY_KEYS if unet_dict.get(k)
                is not None]
  problems = []
  if unknown:
    problems.append(f'unknown option(s) {", ".join(sorted(unknown))}')
  if set_labels:
    problems.append(f'class conditioning ({", ".join(set_labels)}; ddm_ood scores without '
                    'labels)')
  fields = {}
  for k, default in schema.items():
    v = unet_dict.get(k, default)
    if v is None:
      v = '' if isinstance(default, str) else 0
    if k == 'sample_size' and isinstance(v, (list, tuple)):
      if len(set(v)) != 1:
        problems.append(f'sample_size={v} (square images only)')
      v = v[0] if v else 0
    fields[k] = tuple(v) if isinstance(v, list) else v
  net = diffusers_unet2d.DiffusersUNet2D(
      channels=int(fields['in_channels']),
      **{k: v for k, v in fields.items() if k not in ('sample_size', 'in_channels')})
  problems += diffusers_unet2d.unsupported_options(net)
  if problems:
    raise ValueError(f'{where}: not supported: ' + '; '.join(problems) + '. Nothing was written.')
  return fields


def diffusion_fields(scheduler_dict: dict, where: str) -> tuple[dict[str, Any], str]:
  """(``config.diffusion`` fields, prediction type) from a scheduler config."""
  cls = scheduler_dict.get('_class_name', 'DDPMScheduler')
  problems = []
  if cls not in SCHEDULER_CLASSES:
    problems.append(f'scheduler {cls!r} (supported: {", ".join(SCHEDULER_CLASSES)}; they share '
                    'the beta schedules)')
  unknown = sorted(k for k in scheduler_dict if not k.startswith('_')
                   and k not in SCHEDULE_KEYS + SAMPLER_ONLY_KEYS)
  if unknown:
    problems.append(f'unknown option(s) {", ".join(unknown)}')
  get = lambda k, d: d if scheduler_dict.get(k) is None else scheduler_dict[k]  # noqa: E731
  name = f"diffusers_{get('beta_schedule', 'linear')}"
  if name not in schedule_lib.SCHEDULE_REGISTRY:
    supported = [n[len('diffusers_'):] for n in schedule_lib.SCHEDULES if
                 n.startswith('diffusers_')]
    problems.append(f"beta_schedule={get('beta_schedule', 'linear')!r} (supported: "
                    f'{", ".join(supported)})')
  if scheduler_dict.get('trained_betas') is not None:
    problems.append('trained_betas (an explicit beta list)')
  if get('rescale_betas_zero_snr', False):
    problems.append('rescale_betas_zero_snr=True (alphas_cumprod[T-1] = 0: eps is undefined '
                    'there)')
  prediction = get('prediction_type', 'epsilon')
  if prediction not in schedule_lib.PREDICTION_TYPES:
    problems.append(f'prediction_type={prediction!r} (supported: '
                    f'{", ".join(schedule_lib.PREDICTION_TYPES)})')
  if problems:
    raise ValueError(f'{where}: not supported: ' + '; '.join(problems) + '. Nothing was written.')
  fields = dict(schedule=name, num_timesteps=int(get('num_train_timesteps', 1000)),
                beta_start=float(get('beta_start', 1e-4)), beta_end=float(get('beta_end', 0.02)))
  return fields, prediction


def snapshot_config(snapshot_dir: str,
                    base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The ddm_ood config of a snapshot: its network and schedule over ``base``'s other settings.

  Args:
    snapshot_dir: pipeline or flat model folder.
    base: a config whose evaluation settings (data sets, scorer, detector, ...) are kept
      (default: `default_config`); its ``model`` (but ``compute_dtype``) and ``diffusion`` are
      replaced by the snapshot's.
  """
  unet_json, scheduler_json, _ = snapshot_files(snapshot_dir)
  fields = model_fields(_read_json(unet_json), unet_json)
  diffusion, prediction = diffusion_fields(_read_json(scheduler_json), scheduler_json)
  config = (base or default_config.get_config()).copy_and_resolve_references()
  size = int(fields['sample_size']) or int(config.data.image_size)
  if not fields['sample_size'] and base is None:
    raise ValueError(f'{unet_json} has no sample_size; pass --config with data.image_size.')
  channels = int(fields['in_channels'])
  if channels not in (1, 3):
    raise ValueError(f'{unet_json}: in_channels={channels}; ddm_ood scores gray (1) or RGB (3) '
                     'images. Nothing was written.')
  compute_dtype = config.model.compute_dtype
  with config.unlocked():
    config.model = default_config.get_config().model
    config.model.compute_dtype = compute_dtype
    config.model.family = diffusers_unet2d.FAMILY.name
    config.model.prediction_type = prediction
    for k, v in fields.items():
      config.model.diffusers_unet2d[k] = v
    for k, v in diffusion.items():
      config.diffusion[k] = v
    config.data.image_size = size
    config.data.channels = channels
    name = os.path.basename(os.path.normpath(os.path.abspath(snapshot_dir)))
    config.data.dataset = f'diffusers {name} (converted, not trainable here)'
  return config


def _rename_deprecated(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers < 0.14 attention names -> today's (as diffusers' own loader renames them)."""
  renames = (('.query.', '.to_q.'), ('.key.', '.to_k.'), ('.value.', '.to_v.'),
             ('.proj_attn.', '.to_out.0.'))
  out = {}
  for k, v in state_dict.items():
    for old, new in renames:
      if '.attentions.' in k and old in k:
        k = k.replace(old, new)
    out[k] = v
  return out


def convert_state_dict(state_dict: dict[str, np.ndarray], model: Any, image_size: int) -> dict:
  """A ``UNet2DModel`` state dict -> flax variables ``{'params': ...}`` of ``model``.

  ``model`` is ``unet.build_model(config)`` of the snapshot's config (a `DiffusersUNet2D`,
  possibly wrapped for v / x0 predictions: the parameter tree is the same).
  Conv ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``; Linear ``[O, I]`` -> ``[I, O]``; GroupNorm weight
  -> scale; Embedding weight -> embedding; names by `diffusers_unet2d.torch_name`.

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors, named (config.json and the weights
      disagree).
  """
  state_dict = _rename_deprecated(state_dict)
  shapes = jax.eval_shape(lambda k: unet_lib.init_params(model, k, image_size),
                          jax.random.key(0))['params']
  flat = traverse_util.flatten_dict(shapes)
  expected = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if path[-1] == 'kernel':
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    expected[diffusers_unet2d.torch_name(path)] = (path, shape)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  misshaped = [f'{k} {list(state_dict[k].shape)} vs expected {list(expected[k][1])}'
               for k in sorted(set(expected) & set(state_dict))
               if tuple(state_dict[k].shape) != expected[k][1]]
  if missing or unexpected or misshaped:
    parts = [f'{len(v)} {what}: {", ".join(v[:_SHOW])}' + (
        f' ... and {len(v) - _SHOW} more' if len(v) > _SHOW else '')
             for what, v in (('missing', missing), ('unexpected', unexpected),
                             ('mis-shaped', misshaped)) if v]
    raise ValueError('The weights do not match the network of config.json (' + '; '.join(parts)
                     + '): the snapshot\'s config.json and weight file disagree, or the file is '
                     'not a UNet2DModel state dict.')
  params = {}
  for name, (path, _) in expected.items():
    w = np.asarray(state_dict[name], np.float32)
    if path[-1] == 'kernel':
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    params[path] = np.ascontiguousarray(w)
  return {'params': traverse_util.unflatten_dict(params)}


def load(snapshot_dir: str, base: ml_collections.ConfigDict | None):
  """(config, flax variables) of a diffusers snapshot; ``base`` keeps its evaluation settings."""
  config = snapshot_config(snapshot_dir, base)
  _, _, weights = snapshot_files(snapshot_dir)
  model = unet_lib.build_model(config)
  variables = convert_state_dict(load_state_dict(weights), model, int(config.data.image_size))
  return config, variables


__all__ = ['snapshot_files', 'model_fields', 'diffusion_fields', 'snapshot_config',
           'convert_state_dict', 'load', 'SCHEDULER_CLASSES', 'SAMPLER_ONLY_KEYS']
