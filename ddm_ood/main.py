"""Command-line entry point.

  python -m ddm_ood.main --config=configs/fashion_mnist.py --workdir=/tmp/run            # train + evaluate
  python -m ddm_ood.main --config=configs/celeba.py --workdir=DIR --mode=train
  python -m ddm_ood.main --config=configs/tiny.py --workdir=DIR --mode=evaluate --config.train.num_steps=10
  python -m ddm_ood.main --mode=score --workdir=DIR --images=folder:PATH --out=scores.csv

Every expected failure (a bad flag or config value, an unwritable or full disk, a diverged
training run, a stale detector, ...) ends in ONE line ``ddm_ood: error: <cause and remedy>`` and
exit status 1; ``--verbosity=1`` adds the traceback. Everything that needs no JAX is checked
before JAX starts. In a multi-process job every process joins the job even when its own checks
failed, and then all of them stop with the first error of any (`_start_jax`).
"""

import contextlib
import errno
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, features and reports.')
_MODE = flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate', 'score'],
                          "'train': train (or resume) the base DDM; 'evaluate': run the OOD suite "
                          "on the latest checkpoint; 'all': both, then print the result table; "
                          "'score': anomaly scores of --images as a CSV (after 'evaluate'; uses "
                          "the workdir's config, no --config).")
_IMAGES = flags.DEFINE_string('images', None, "--mode=score: the images to score, 'folder:PATH'.")
_OUT = flags.DEFINE_string('out', None, '--mode=score: the CSV to write (one row per image file).')
_ID_DATASET = flags.DEFINE_string('id_dataset', None, '--mode=score: whose detector and FPR95 '
                                  'threshold (default: the first of config.eval.id_datasets).')
_KIND = flags.DEFINE_string('kind', None, "--mode=score: a method of the results (default: "
                            "'zero_shot', the ID-only protocol's pick).")
_SKIP_BAD_FILES = flags.DEFINE_bool('skip_bad_files', False, '--mode=score: mark unreadable '
                                    'image files skipped in the CSV instead of stopping.')
_REFIT = flags.DEFINE_bool('refit', False, "--mode=score: when the detector or threshold was "
                           "fitted on another checkpoint or scorer settings (e.g. training went "
                           "on after evaluate), first rerun evaluate with the workdir's "
                           'config.json instead of stopping.')
_SCORE_FLAGS = ('images', 'out', 'id_dataset', 'kind', 'skip_bad_files', 'refit')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Multi-process runs without a cluster JAX detects (e.g. several "
    "processes on one machine): 'host:port' of process 0; set with --num_processes and "
    '--process_id on every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, in [0, num_processes) (with --coordinator_address).')
_JOIN_TIMEOUT_DEFAULT_S = 300   # = sharding.DEFAULT_JOIN_TIMEOUT_S (sharding imports JAX)
_JOIN_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout_s', _JOIN_TIMEOUT_DEFAULT_S, 'Multi-process runs: seconds to wait for '
    'every process to join the job before stopping with an error.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, "JAX's persistent compilation cache: a folder, or 'off' (default: "
    '$DDM_OOD_COMPILATION_CACHE, else $XDG_CACHE_HOME/ddm_ood/jax/<host>; see '
    'ddm_ood/compile_cache.py).')
flags.mark_flags_as_required(['workdir'])

_DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id',
                      'distributed_timeout_s')
_WHY_WRITE = {'train': 'training writes checkpoints, metrics and samples',
              'evaluate': 'evaluate writes features, detectors, results and the report',
              'all': 'training and evaluate write checkpoints, features and results'}


def main(argv):
  if not logging.level_debug():  # libraries' logged tracebacks too (Orbax's background writers)
    logging.get_absl_handler().addFilter(_without_traceback)   # (adding it twice is a no-op)
  with _one_line_errors():
    _main(argv)
  logging.info('Done.')


def _without_traceback(record) -> bool:
  """A logging filter: the record's message stays, its traceback goes (--verbosity=1 keeps it)."""
  record.exc_info = record.exc_text = record.stack_info = None
  return True


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MODE.value == 'score':
    return _score()
  from ddm_ood import workdir as workdir_lib
  config = workdir = error = failure = None
  try:  # before JAX starts: a typo fails in seconds, nothing written
    config, workdir = _checked_run_args()
  except Exception as e:  # pylint: disable=broad-except
    error, failure = _expected_failure(e), e
    if error is None:
      raise
  _start_jax(error, config, exc=failure)
  with contextlib.ExitStack() as stack:
    try:  # the lock (process 0) and the checkpoint's network fields: then every process agrees
      stack.enter_context(workdir_lib.held(config, workdir, _MODE.value))
    except Exception as e:  # pylint: disable=broad-except
      error, failure = _expected_failure(e), e
      if error is None:
        raise
    _stop_if_any_failed(error, failure)
    workdir_lib.save_config(config, workdir)  # only once the config has been accepted
    if _MODE.value in ('train', 'all'):
      from ddm_ood import train
      train.train(config, workdir)
    if _MODE.value in ('evaluate', 'all'):
      from ddm_ood import evaluate
      evaluate.run_suite(config, workdir, print_table=True)


def _checked_run_args():
  """(config, absolute workdir) of --mode=train / evaluate / all after every check that needs no
  JAX: flags, the whole config and its sources, the workdir writable. Raises `WorkdirError`."""
  from ddm_ood import workdir as workdir_lib
  given = [f'--{n}' for n in _SCORE_FLAGS if flags.FLAGS[n].present]
  if given:
    raise workdir_lib.WorkdirError(f'{", ".join(given)} only apply to --mode=score.')
  if not flags.FLAGS['config'].present:
    raise workdir_lib.WorkdirError(f'--config=FILE is required with --mode={_MODE.value}.')
  try:
    config = _CONFIG.value
    config.keys()  # a missing / broken file surfaces on the first attribute access
  except OSError as e:
    raise workdir_lib.WorkdirError(_config_load_error(e)) from None
  workdir = workdir_lib.check_workdir_path(_WORKDIR.value)
  workdir_lib.validate_config(config, _MODE.value)
  workdir_lib.check_writable(workdir, f'--workdir={workdir}', _WHY_WRITE[_MODE.value])
  return config, workdir


def _start_jax(error, config, distributed=None, exc=None) -> None:
  """Starts JAX: one process (every CPU core a device), or joins the multi-process job.

  ``error``: the message of this process's own failed check (``exc``), or None. One process
  stops at once; in a multi-process job this process still joins, and every process then stops
  with the first error of any (instead of the others waiting for it until a timeout).
  """
  coordinator, num, pid, timeout = distributed or (
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _JOIN_TIMEOUT.value)
  from ddm_ood import sharding
  if error and not ((coordinator and (num or 0) > 1) or sharding.multi_host_environment()):
    _fail(error, exc)
  if error is None:  # (a process that only joins to stop: its flags may be unparsed)
    from ddm_ood import host_malloc
    logging.info(host_malloc.describe())
    if not coordinator:  # one process: every core a device (before JAX starts)
      from ddm_ood import cpu_devices
      cpu_devices.configure(
          divides=(config.train.batch_size,) if _MODE.value in ('train', 'all') else ())
    _use_compilation_cache()
  try:
    sharding.maybe_initialize_distributed(coordinator, num, pid, timeout)
  except ValueError as e:
    _fail(str(e))
  _stop_if_any_failed(error, exc)


def _stop_if_any_failed(error: str | None, exc: BaseException | None) -> None:
  """Every process passes its own error (or None); all stop with the first process's error
  (this process's traceback kept where that error is its own)."""
  from ddm_ood import sharding
  first = sharding.first_error(error)
  if first:
    _fail(first, exc if error and first.endswith(error) else None)


def _score() -> None:
  """--mode=score: flags and workdir checked before any JAX work, then the folder is scored."""
  from ddm_ood import score_files
  if flags.FLAGS['config'].present:
    _fail("--mode=score reads the workdir's config.json; drop --config.")
  if _COORDINATOR.value:
    _fail('--mode=score runs in one process; drop --coordinator_address.')
  args = score_files.check_args(_WORKDIR.value, _IMAGES.value, _OUT.value, _ID_DATASET.value,
                                _KIND.value, _SKIP_BAD_FILES.value, _REFIT.value)
  _use_compilation_cache()
  score_files.score_folder(args)


def _use_compilation_cache() -> None:
  """Every mode compiles through the persistent cache (a second start skips compilation)."""
  from ddm_ood import compile_cache
  compile_cache.configure(_COMPILATION_CACHE.value)


# ------------------------------------------------------------------------ one line per mistake
@contextlib.contextmanager
def _one_line_errors():
  """Turns every expected failure into one ``ddm_ood: error:`` line; a bug keeps its traceback."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = _expected_failure(e)
    if message is None:
      raise
    _fail(message, e)


def _loaded(module: str, *names: str) -> tuple:
  """Exception classes of ``ddm_ood.<module>`` if it was imported (else it raised none of them)."""
  m = sys.modules.get(f'ddm_ood.{module}')
  return tuple(getattr(m, n) for n in names) if m else ()


def _expected_failure(e: BaseException) -> str | None:
  """The one-line message of an expected failure (cause and remedy), or None for a bug."""
  expected = (*_loaded('config_checks', 'WorkdirError'), *_loaded('data', 'DataError'),
              *_loaded('checkpoint', 'CheckpointNotFoundError', 'CheckpointCorruptError',
                       'CheckpointWriteError'),
              *_loaded('train.loop', 'TrainingDivergedError'))
  if isinstance(e, expected):
    return str(e)
  if isinstance(e, FileNotFoundError) and not e.filename:  # ours: the message says what to do
    return str(e)
  cause, path = None, None
  if isinstance(e, OSError) and e.errno is not None:
    cause, path = e.strerror or errno.errorcode.get(e.errno, str(e.errno)), e.filename
  else:
    write_failure = _loaded('checkpoint', 'write_failure')
    cause = write_failure[0](e) if write_failure else None
  if cause is None:
    return None
  where = f' ({path})' if path else ''
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f'{cause}{where}. Free space on that disk (or use another --workdir / --out), then '
            'rerun the same command: finished checkpoints, cached features and results are kept '
            'and reused. (--verbosity=1 shows the traceback.)')
  if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return (f'Cannot write{where}: {cause}. Make the directory writable or use another '
            '--workdir / --out; nothing already finished was lost. (--verbosity=1 shows the '
            'traceback.)')
  if not isinstance(e, OSError):
    return (f'{cause}: {" ".join(str(e).split())[:300]}. Free space or make the directory '
            'writable, then rerun the same command. (--verbosity=1 shows the traceback.)')
  return None


def _fail(message: str, exc: BaseException | None = None) -> None:
  """Exits with status 1 and a one-line message (with ``exc``'s traceback at --verbosity=1)."""
  if exc is not None and logging.level_debug():
    traceback.print_exception(exc, file=sys.stderr)
  print(f'ddm_ood: error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(1)


# ------------------------------------------------------------------ flags that do not parse
def _config_load_error(e: OSError) -> str:
  reason = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
  return (f'cannot load --config={config_flags.get_config_filename(flags.FLAGS["config"])}: '
          f'{reason}')


def _flag_error(e: Exception, argv) -> str | None:
  """The one-line message of a command line absl or ml_collections cannot parse (None: a bug)."""
  if isinstance(e, flags.Error):
    return f'{e} (--helpfull lists the flags).'
  if isinstance(e, OSError):
    return _config_load_error(e)
  if isinstance(e, (AttributeError, KeyError)):   # --config.<path> naming no field
    text = str(e).replace('\\n', ' ').replace('\\', '')
    field = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    if field:
      given = [a for a in overrides if field.group(1) in re.split(r'[.=]', a)[:-1] or
               a.split('=')[0].endswith('.' + field.group(1))]
      return (f'{(given or overrides or ["--config"])[0]}: the config has no field '
              f'{field.group(1)!r}' + (f'; did you mean {hint.group(1)!r}?' if hint else '.')
              + ' Every field is listed in ddm_ood/default_config.py.')
  return None


def _parse_flags(argv):
  """absl's flag parsing, with every failure as one ``ddm_ood: error:`` line.

  A multi-process job's processes still join the job (with --coordinator_address,
  --num_processes and --process_id, parsed on their own) so that all of them stop together.
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # ml_collections raises several types
    message, failure = _flag_error(e, argv), e
    if message is None:
      raise
  own = flags.FlagValues()
  flags.DEFINE_string('coordinator_address', None, '', flag_values=own)
  flags.DEFINE_integer('num_processes', None, '', flag_values=own)
  flags.DEFINE_integer('process_id', None, '', flag_values=own)
  flags.DEFINE_integer('distributed_timeout_s', _JOIN_TIMEOUT_DEFAULT_S, '', flag_values=own)
  flags.DEFINE_integer('verbosity', 0, '', short_name='v', flag_values=own)
  try:
    own(argv, known_only=True)
  except flags.Error:
    _fail(message, failure)
  logging.set_verbosity(own.verbosity)   # --verbosity=1: _fail prints the traceback
  _start_jax(message, None, tuple(own[n].value for n in _DISTRIBUTED_FLAGS), failure)


if __name__ == '__main__':
  from ddm_ood import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.maybe_reexec()  # replaces this process with one on tcmalloc, where installed
  app.run(main, flags_parser=_parse_flags)
