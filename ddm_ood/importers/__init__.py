"""Importers of published checkpoints into a ddm_ood workdir, by source kind (`IMPORTERS`).

`python -m ddm_ood.convert` has one flag per importer: ``--checkpoint=FILE`` (improved-diffusion /
guided-diffusion ``UNetModel`` state dicts with a ``--config`` naming the flags, family 'adm') and
``--diffusers=DIR`` (a Hugging Face diffusers ``UNet2DModel`` snapshot, family
'diffusers_unet2d'; ``--config`` optional, for evaluation settings). Adding a source: a module with
``load(source, config) -> (config, variables)`` and a row in `IMPORTERS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from ddm_ood.importers import adm
from ddm_ood.importers import diffusers_snapshot
from ddm_ood.importers.state_dict import load_state_dict
from ddm_ood.importers.state_dict import SUFFIXES


@dataclasses.dataclass(frozen=True)
class Importer:
  """One source kind of `python -m ddm_ood.convert`.

  Attributes:
    flag: the convert flag naming the source (``--<flag>=PATH``).
    family: the ``config.model.family`` it produces.
    help: the flag's help.
    load: ``(path, config or None) -> (config, {'params': ...})``; reads and checks everything,
      writes nothing.
  """
  flag: str
  family: str
  help: str
  load: Callable[[str, ml_collections.ConfigDict | None],
                 tuple[ml_collections.ConfigDict, dict]]


IMPORTERS: dict[str, Importer] = {
    'checkpoint': Importer(
        'checkpoint', 'adm', 'improved-diffusion / guided-diffusion UNetModel state dict (.pt, '
        '.safetensors or .npz; float16 read as float32); needs --config with its flags.',
        adm.load),
    'diffusers': Importer(
        'diffusers', 'diffusers_unet2d', 'Hugging Face diffusers UNet2DModel snapshot folder '
        '(pipeline with model_index.json, or config.json + scheduler_config.json + weights); '
        '--config optional (evaluation settings).', diffusers_snapshot.load),
}

__all__ = ['Importer', 'IMPORTERS', 'SUFFIXES', 'load_state_dict']
