"""JAX's persistent compilation cache, on by default for ``main``, the API and the benchmarks.

A second process that compiles the same program (the same network, shapes, shardings, flags and
JAX version) loads the executable from disk instead of compiling it again (10-70 s per program
on a GPU, a few seconds on a CPU: docs/benchmarks.md). Results are the same bit for bit (the
cached executable is the one a compile would produce; tested).

Where (the first that is set):

1. ``main --compilation_cache=DIR`` (or ``=off``), or ``configure(DIR | 'off')``;
2. the environment variable ``DDM_OOD_COMPILATION_CACHE`` (a folder, or ``off``);
3. JAX's own setting (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``), left as is;
4. ``$XDG_CACHE_HOME/ddm_ood/jax/<host>`` (``~/.cache/ddm_ood/jax/<host>`` without XDG), where
   ``<host>`` names the CPU architecture and model, so that a home folder shared by different
   machines never hands one CPU's code to another.

Entries are kept for programs that took at least `MIN_COMPILE_TIME_S` to compile; the folder is
capped at `MAX_SIZE_BYTES` (least recently used entries go first).
"""

from __future__ import annotations

import hashlib
import os
import platform

from absl import logging

ENV_VAR = 'DDM_OOD_COMPILATION_CACHE'
OFF = 'off'
MIN_COMPILE_TIME_S = 0.2
MAX_SIZE_BYTES = 4 * 2 ** 30
_configured: list[str | None] = []   # this process's choice, once made


def host_tag() -> str:
  """'<arch>-<hash of the CPU model and feature flags>': executables compiled for one CPU may use
  instructions another lacks."""
  info = ''
  try:
    with open('/proc/cpuinfo') as f:
      lines = f.read().splitlines()
    info = '\n'.join(sorted({l for l in lines if l.startswith(('model name', 'flags'))}))
  except OSError:
    info = platform.processor()
  return f'{platform.machine()}-{hashlib.sha1(info.encode()).hexdigest()[:10]}'


def default_dir() -> str:
  """``$XDG_CACHE_HOME/ddm_ood/jax/<host_tag>`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ddm_ood', 'jax', host_tag())


def resolve(setting: str | None = None) -> str | None:
  """The cache folder for ``setting`` (see the module doc for the order); None = off."""
  import jax  # pylint: disable=g-import-not-at-top
  for value in (setting, os.environ.get(ENV_VAR)):
    if value:
      return None if value.strip().lower() == OFF else os.path.abspath(os.path.expanduser(value))
  return jax.config.jax_compilation_cache_dir or default_dir()


def configure(setting: str | None = None) -> str | None:
  """Turns the persistent compilation cache on (or off) for this process; call before compiling.

  Args:
    setting: a folder, 'off', or None (``DDM_OOD_COMPILATION_CACHE``, JAX's own setting, then
      the default folder).

  Returns:
    The folder in use, or None when off.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = resolve(setting)
  _configured[:] = [path]
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('Persistent compilation cache: off.')
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning('Persistent compilation cache off: cannot create %s (%s).', path, e)
    jax.config.update('jax_enable_compilation_cache', False)
    _configured[:] = [None]
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
    jax.config.update('jax_compilation_cache_max_size', MAX_SIZE_BYTES)
  logging.info('Persistent compilation cache: %s (%s=off turns it off).', path, ENV_VAR)
  return path


def ensure() -> str | None:
  """`configure` () unless this process has already chosen (e.g. ``main --compilation_cache``);
  returns the folder in use or None. For the API's entry points."""
  return _configured[0] if _configured else configure()


__all__ = ['ENV_VAR', 'OFF', 'host_tag', 'default_dir', 'resolve', 'configure', 'ensure']
