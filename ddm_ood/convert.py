"""Import published diffusion models into a ddm_ood workdir: ``python -m ddm_ood.convert``.

One flag per source kind (`ddm_ood.importers.IMPORTERS`):

  # improved-diffusion / guided-diffusion (ADM) UNetModel state dicts, with a config naming the
  # flags they were trained with (configs/diffpath_celeba.py, configs/guided_256_uncond.py, ...)
  python -m ddm_ood.convert --checkpoint=celeba_ema_0.9999_499999.pt \
      --config=configs/diffpath_celeba.py --workdir=runs/diffpath_celeba
  # a Hugging Face diffusers UNet2DModel snapshot (network and schedule from its own json files;
  # --config optional, for the evaluation settings)
  python -m ddm_ood.convert --diffusers=ddpm-cifar10-32 --workdir=runs/ddpm_cifar10

writes an Orbax checkpoint (the converted weights as the EMA parameters, step 0) and
``config.json`` into the workdir, so ``python -m ddm_ood.main --mode=evaluate``
(``--config=configs/workdir.py:WORKDIR`` reuses the workdir's config),
`ddm_ood.api.load_anomaly_scorer`, `ddm_ood.api.load_denoiser` and the report work on it
unchanged. Reading ``.pt`` / ``.bin`` files
needs PyTorch (``pip install -e '.[convert]'``); ``.safetensors`` needs the ``safetensors``
package; ``.npz`` needs nothing. Everything is read and checked before anything is written: an
unsupported option or a mismatching tensor is one error naming it, and the workdir stays as it was.
"""

from __future__ import annotations

import json
import os

import ml_collections

from ddm_ood import unet as unet_lib
from ddm_ood.adm_params import convert_state_dict, infer_flags, tensor_map  # noqa: F401
from ddm_ood.importers import IMPORTERS
from ddm_ood.importers import load_state_dict  # noqa: F401  (public here too)
from ddm_ood.importers import SUFFIXES  # noqa: F401
from ddm_ood.importers.adm import guided_diffusion_config  # noqa: F401
from ddm_ood.importers.adm import improved_diffusion_config  # noqa: F401


# ------------------------------------------------------------------------------ workdir


def convert(source: str, path: str, config: ml_collections.ConfigDict | None,
            workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Imports ``path`` with the importer ``source`` and writes a ddm_ood workdir.

  Everything is read and converted before anything is written: on any error the workdir is
  left as it was.

  Args:
    source: a key of `ddm_ood.importers.IMPORTERS` ('checkpoint', 'diffusers').
    path: the checkpoint file or snapshot folder.
    config: the config (required by 'checkpoint'; evaluation settings for 'diffusers').
    workdir: output directory; must not hold a checkpoint yet.

  Returns:
    ``(config, variables)``: the config written to ``config.json`` and the converted flax
    variables ``{'params': ...}``.

  Raises:
    FileExistsError: ``workdir`` already holds a checkpoint.
    FileNotFoundError: no such checkpoint / snapshot file.
    ValueError: an unsupported option or a checkpoint that does not fit the network, named.
  """
  from ddm_ood import checkpoint  # pylint: disable=g-import-not-at-top
  from ddm_ood import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f'--workdir={workdir} exists and is not a directory.')
  step = checkpoint.latest_step(workdir)
  if step is not None:
    raise FileExistsError(f'{workdir} already holds a checkpoint (step {step}); convert into a '
                          'new or empty workdir.')
  if source not in IMPORTERS:
    raise ValueError(f'Unknown import source {source!r}; choose one of {tuple(IMPORTERS)}.')
  config, variables = IMPORTERS[source].load(path, config)

  meta = {'step': 0, 'epoch': 0, 'index': 0, 'config': json.loads(config.to_json_best_effort()),
          'converted_from': os.path.abspath(path)}
  workdir_lib.save_config(config, workdir)
  manager = checkpoint.make_manager(workdir, keep=1)
  try:
    checkpoint.save(manager, 0, {'ema_params': variables}, meta)
    manager.wait_until_finished()
  finally:
    manager.close()
  return config, variables


def convert_checkpoint(checkpoint_path: str, config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """`convert` of an improved/guided-diffusion state dict; returns the flax variables."""
  return convert('checkpoint', checkpoint_path, config, workdir)[1]


def _cli() -> None:
  """``python -m ddm_ood.convert --<source>=PATH [--config=...] --workdir=...``.

  One flag per importer of `IMPORTERS`, exactly one given. The flags are defined here, not at
  import, so that importing this module next to `ddm_ood.main` (which defines --config /
  --workdir too) never clashes.
  """
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file (required with --checkpoint).', lock_config=True)
  source_flags = {name: flags.DEFINE_string(name, None, imp.help)
                  for name, imp in IMPORTERS.items()}
  workdir_flag = flags.DEFINE_string('workdir', None, 'Output workdir (new or empty).')
  flags.mark_flags_as_required(['workdir'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    given = [name for name, f in source_flags.items() if f.value]
    try:
      if len(given) != 1:
        raise ValueError('give exactly one of ' + ', '.join(f'--{n}' for n in IMPORTERS)
                         + (f' (got {", ".join("--" + g for g in given)})' if given else ''))
      config = config_flag.value if flags.FLAGS['config'].present else None
      path = source_flags[given[0]].value
      config, variables = convert(given[0], path, config, workdir_flag.value)
    except (OSError, ImportError, ValueError) as e:  # OSError: also a missing --config file
      print(f'ddm_ood.convert: error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
    n = unet_lib.param_count(variables)
    print(f'Converted {path} ({config.model.family}, {n:,} parameters) into '
          f'{os.path.abspath(workdir_flag.value)}', flush=True)

  app.run(main)


__all__ = ['SUFFIXES', 'load_state_dict', 'tensor_map', 'infer_flags', 'convert_state_dict',
           'improved_diffusion_config', 'guided_diffusion_config', 'convert', 'convert_checkpoint']


if __name__ == '__main__':
  _cli()
