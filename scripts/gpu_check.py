"""One prepared run of the accelerator checks, inside a time budget (run by scripts/gpu_check.sh).

Stages, in order (each a subprocess with its own time limit; a stage that no longer fits the
remaining budget is skipped and reported as such):

1. ``fixture``: tests/test_diffpath_reference.py on the accelerator (the converted DiffPath
   fixture at its pinned precision 'highest' equals the official statistics within 1e-3).
2. ``main_job``: the README main job, ``python -m ddm_ood.main --config=CONFIG --workdir=W``
   (CONFIG = configs/fashion_mnist.py), its wall time and phases from its log; its
   ``eval/results.md`` / ``results.json`` are copied to $OUT as they come (nothing expected).
3. ``train_bench``: the CelebA-size train step at batch 128 (benchmarks/train_bench.py: FLOPs
   from ddm_ood.flops, fraction of the measured bf16 matmul peak).
4. ``scorer_bench_ddim``: the CelebA-size DiffPath scorer (ddim10) at batch 512 in float32 at
   'highest', float32 and bf16 (benchmarks/scorer_bench.py --throughput); then ``family_bench``:
   guided-diffusion's 256x256 model in ddm_ood vs its own PyTorch code (benchmarks/family_bench.py,
   when .peers/guided-diffusion holds its code).
5. Extras while time remains, in this order: the train step with cuDNN's attention
   (``attention='auto'``) instead of XLA's (the default), ``precision`` (the fixture's error
   against the official statistics at every ``config.model.precision``), ``--mode=score``
   start-up cold vs warm (benchmarks/startup_bench.py) and the seed method's scorer (forward,
   stein_ssim) in bf16.

Writes $OUT/summary.json (every stage's JSON, wall times, status) and $OUT/gpu_check.log.
``DDM_OOD_GPU_CHECK_REDUCED=1`` runs the same stages at toy sizes (the CPU dry run);
``DDM_OOD_GPU_CHECK_STAGES=main_job,train_bench`` runs only those; ``DDM_OOD_GPU_CHECK_BUDGET_S``
(default 460) is the whole run's budget.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get('OUT') or os.path.join(tempfile.gettempdir(), 'gpu_check_out')
REDUCED = os.environ.get('DDM_OOD_GPU_CHECK_REDUCED', '0') == '1'
BUDGET_S = float(os.environ.get('DDM_OOD_GPU_CHECK_BUDGET_S', '460'))
MAIN_CONFIG = os.environ.get('DDM_OOD_GPU_CHECK_CONFIG', 'configs/fashion_mnist.py')
# Only these stages (comma-separated names as in the summary; default: all).
STAGES = [s for s in os.environ.get('DDM_OOD_GPU_CHECK_STAGES', '').split(',') if s]
CAP_SCALE = 5.0 if REDUCED else 1.0   # a 2-core CPU is far slower than the GPU at toy sizes
# The CPU dry run: the same config and code paths (every data source, kind, the oracle and the
# localisation study, the report) at toy sizes.
REDUCED_MAIN_JOB = ('--config.train.num_steps=6', '--config.train.checkpoint_every=3',
                    '--config.train.num_samples=4', '--config.train.sample_steps=3',
                    '--config.eval.num_fit=32', '--config.eval.num_test=16',
                    '--config.select.num_val=12', '--config.select.localisation_images=4',
                    '--config.data.texture_crops=60', '--config.data.synthetic_examples=32',
                    '--config.detector.n_components=(1,2)', '--config.scorer.batch_size=32')
T0 = time.monotonic()
LOG = None
SUMMARY: dict = {'reduced': REDUCED, 'budget_s': BUDGET_S, 'stages': {}}


def log(msg: str) -> None:
  line = f'[gpu_check {time.monotonic() - T0:7.1f}s] {msg}'
  print(line, flush=True)
  LOG.write(line + '\n')
  LOG.flush()


def remaining() -> float:
  return BUDGET_S - (time.monotonic() - T0)


def save_summary() -> None:
  SUMMARY['elapsed_s'] = time.monotonic() - T0
  with open(os.path.join(OUT, 'summary.json'), 'w') as f:
    json.dump(SUMMARY, f, indent=1)


def run(name: str, cmd: list[str], cap_s: float, need_s: float, env: dict | None = None,
        parse_json: bool = True) -> tuple[dict | None, str]:
  """Runs ``cmd`` if ``need_s`` seconds are left; limit min(cap_s, what is left - 10 s).

  Returns:
    ``(the stage's summary entry or None if skipped, its stdout + stderr)``.
  """
  if STAGES and name not in STAGES:
    return None, ''
  cap_s *= CAP_SCALE
  left = remaining()
  if left < need_s:
    log(f'{name}: skipped ({left:.0f} s left, needs ~{need_s:.0f} s)')
    SUMMARY['stages'][name] = {'status': 'skipped', 'seconds_left': left}
    save_summary()
    return None, ''
  limit = max(min(cap_s, left - 10), 1)
  log(f'{name}: {" ".join(cmd)}  (limit {limit:.0f} s)')
  t = time.monotonic()
  full_env = dict(os.environ, **(env or {}))
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=limit)
    rc, out, err = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc = 'timeout'
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or '')
  wall = time.monotonic() - t
  LOG.write(f'--- {name} stdout (last 6000 chars)\n{out[-6000:]}\n--- {name} stderr (last 6000 '
            f'chars)\n{err[-6000:]}\n')
  result = {'status': 'ok' if rc == 0 else f'failed ({rc})', 'wall_s': wall}
  if parse_json and rc == 0:
    try:
      start = out.index('{')
      result['result'] = json.loads(out[start:])
    except ValueError:
      result['result'] = out[-2000:]
  elif rc != 0:
    result['stderr_tail'] = err[-1500:]
  SUMMARY['stages'][name] = result
  log(f'{name}: {result["status"]} in {wall:.1f} s')
  save_summary()
  return result, out + err


def main_job_phases(log_text: str) -> dict:
  """Seconds from the job's first log line to its phases (absl timestamps HH:MM:SS.ffffff)."""
  stamps = []
  for line in log_text.splitlines():
    m = re.match(r'^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)', line)
    if m:
      stamps.append((int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), line))
  if not stamps:
    return {}
  t0 = stamps[0][0]
  marks = {'first_step_logged': r'\] \[\d+\] grad_norm=', 'training_finished': 'Training finished',
           'first_features': r'features .*: \d+/\d+ images', 'done': r'main.py:\d+\] Done'}
  out = {}
  for name, pattern in marks.items():
    for t, line in stamps:
      if re.search(pattern, line):
        out[name + '_s'] = t - t0
        break
  sps = [float(m) for m in re.findall(r'steps_per_sec=([\d.]+)', log_text)]
  if sps:
    out['train_steps_per_sec_last'] = sps[-1]
  return out


def main() -> None:
  global LOG
  os.makedirs(OUT, exist_ok=True)
  LOG = open(os.path.join(OUT, 'gpu_check.log'), 'a')
  work = tempfile.mkdtemp(prefix='gpu_check_')
  py = sys.executable
  # Every stage: the accelerator if there is one, no CPU-only test flags, a fresh compilation
  # cache of this run (not $OUT: its files would come back).
  env = {'JAX_PLATFORMS': os.environ.get('DDM_OOD_GPU_CHECK_PLATFORMS', ''), 'XLA_FLAGS': '',
         'DDM_OOD_COMPILATION_CACHE': os.path.join(work, 'jax_cache'),
         'PYTHONUNBUFFERED': '1', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    SUMMARY['env'] = {'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()],
                      'backend': jax.default_backend(), 'python': sys.version.split()[0]}
  except Exception as e:  # pylint: disable=broad-except
    SUMMARY['env'] = {'error': repr(e)}
  log(f'env: {SUMMARY["env"]}')
  save_summary()

  # 1. Exactness on the accelerator.
  run('fixture', [py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                  'tests/test_diffpath_reference.py'], 150, 30, env, parse_json=False)

  # 2. The README main job (generic: whatever the config produces is copied back).
  workdir = os.path.join(work, 'main_job')
  job, text = run('main_job', [py, '-m', 'ddm_ood.main', f'--config={MAIN_CONFIG}',
                               f'--workdir={workdir}', '--alsologtostderr',
                               *(REDUCED_MAIN_JOB if REDUCED else ())], 330, 120, env,
                  parse_json=False)
  if job is not None:
    job['phases'] = main_job_phases(text)
    for name in ('results.md', 'results.json'):
      src = os.path.join(workdir, 'eval', name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(OUT, f'main_job_{name}'))
    save_summary()

  # 3-4. CelebA-size train step and scorer with the one FLOP count and the measured peak.
  celeba = ['--config=configs/celeba.py']
  batch, steps = ('2', '2') if REDUCED else ('128', '20')
  run('train_bench', [py, 'benchmarks/train_bench.py', *celeba,
                      f'--config.train.batch_size={batch}', f'--steps={steps}'], 180, 60, env)
  sbatch = '2' if REDUCED else '512'
  reps = '1' if REDUCED else '3'
  run('scorer_bench_ddim', [py, 'benchmarks/scorer_bench.py', '--throughput',
                            '--config=configs/diffpath_celeba.py', '--mode=ddim',
                            f'--batches={sbatch}', '--chunks=0', f'--reps={reps}',
                            # the exact one first: the others' feature differences are from it
                            '--variants=compute_dtype=float32,precision=highest;'
                            'compute_dtype=float32,precision=default;'
                            'compute_dtype=bfloat16,precision=default'], 150, 60, env)

  # 4b. Issue 22: guided-diffusion's 552M 256x256 model in ddm_ood vs its own PyTorch code
  # (its code in the ignored folder .peers/guided-diffusion; skipped without it).
  guided = os.path.join(ROOT, '.peers', 'guided-diffusion')
  if os.path.isdir(guided):
    size = (['--num_channels=32', '--batch=2', '--num_steps=2'] if REDUCED else
            ['--batch=8', '--num_steps=10'])
    run('family_bench', [py, 'benchmarks/family_bench.py', f'--guided_dir={guided}', *size,
                         '--rounds=1'], 150, 90, env)

  # 5. Extras, most useful first.
  run('train_bench_cudnn_attention', [py, 'benchmarks/train_bench.py', *celeba,
                                      f'--config.train.batch_size={batch}', f'--steps={steps}',
                                      '--config.model.attention=auto'], 150, 90, env)
  run('precision', [py, os.path.join('scripts', 'gpu_check.py'), '--precision_report'], 90, 40,
      env)
  if job is not None and job['status'] == 'ok':
    run('score_startup', [py, 'benchmarks/startup_bench.py', f'--workdir={workdir}',
                          '--images=1', '--rounds=1', '--runs=cold,warm'], 120, 60, env)
  run('scorer_bench_forward', [py, 'benchmarks/scorer_bench.py', '--throughput',
                               '--config=configs/diffpath_celeba.py', '--mode=forward',
                               '--kinds=stein_ssim', f'--batches={sbatch}', '--chunks=0',
                               f'--reps={reps}',
                               '--variants=compute_dtype=bfloat16,precision=default'], 90, 45, env)

  SUMMARY['finished'] = True
  save_summary()
  log(f'done in {time.monotonic() - T0:.1f} s; summary in {OUT}/summary.json')
  shutil.rmtree(work, ignore_errors=True)


def precision_report() -> None:
  """The DiffPath fixture at every precision setting: largest relative error of its 6-D / 1-D
  statistics against the official code's (prints JSON)."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddm_ood import network  # pylint: disable=g-import-not-at-top
  from ddm_ood import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  from tests import test_diffpath_reference as ref_test  # pylint: disable=g-import-not-at-top
  config, model, variables, sched, ref = ref_test.setup()
  images = jnp.asarray(ref['images'])
  ids = jnp.arange(images.shape[0], dtype=jnp.int32)
  out = {'backend': jax.default_backend(), 'pinned': config.model.precision, 'settings': {}}
  for name in network.PRECISIONS:
    net = network.Network(model.module, name)
    score = jax.jit(scorer_lib.make_trajectory_scorer(net.apply, sched, config.scorer,
                                                      ('diffpath_6d', 'diffpath_1d')))
    feats = jax.tree.map(np.asarray, score(variables, images, ids, jax.random.key(0))['features'])
    out['settings'][name] = {
        'diffpath_6d_max_rel_err': ref_test.rel_err(feats['diffpath_6d'], ref['stats_6d']),
        'diffpath_1d_max_rel_err': ref_test.rel_err(feats['diffpath_1d'][:, 0], ref['stats_1d'])}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  if '--precision_report' in sys.argv:
    precision_report()
  else:
    main()
