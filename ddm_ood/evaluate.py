"""The zero-shot OOD suite: features of every set, detectors fitted on ID train, metrics.

For each ID set of ``config.eval.id_datasets`` and each feature kind of ``config.eval.feature_kinds``:
fit a detector on the features of ``num_fit`` ID-train images, score ``num_test`` ID-test images
and ``num_test`` test images of every other set of ``config.eval.ood_datasets``, and report
AUROC / FPR95 / AUPR. The DDM is never retrained; only the small detector sees ID data.

Features are cached per (checkpoint step, dataset, split, count, scorer settings) under
``workdir/features``, so a re-run or a new detector costs no network evaluation.
"""

from __future__ import annotations

import csv
import io
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddm_ood import checkpoint
from ddm_ood import complexity
from ddm_ood import data
from ddm_ood import detector
from ddm_ood import kinds as kinds_lib
from ddm_ood import map_study
from ddm_ood import memory
from ddm_ood import metric_writer
from ddm_ood import metrics
from ddm_ood import protocol
from ddm_ood import provenance
from ddm_ood import scorer
from ddm_ood import selection
from ddm_ood import settings as settings_lib
from ddm_ood import sharding
from ddm_ood import schedule as schedule_lib
from ddm_ood import synthetic
from ddm_ood import tables
from ddm_ood import unet
from ddm_ood import workdir as workdir_lib
from ddm_ood.workdir import detector_path, safe_name, scorer_key  # noqa: F401  (public here too)

METRIC_NAMES = ('auroc', 'fpr95', 'aupr_in', 'aupr_out')
COMPLEXITY_KEY = selection.COMPLEXITY_KEY
INDEX_KEY = 'index'
# Held-out ID-train images the zero-shot selection needs at the least (per ID set).
MIN_SELECTION_IMAGES = 10


@dataclasses.dataclass
class FeatureExtractor:
  """Compiled feature extraction for one trained model, sharded over all devices.

  Attributes:
    config: the run's config.
    params: EMA parameters of the UNet.
    step: checkpoint step the parameters come from (part of the cache key).
    cache_dir: folder for cached features ('' disables caching).
  """
  config: ml_collections.ConfigDict
  params: Any
  step: int
  cache_dir: str = ''

  def __post_init__(self):
    self.model = unet.build_model(self.config)
    self.schedule = schedule_lib.schedule_for(self.config.diffusion)
    # The scorer computes the base kinds; fused kinds are composed from them downstream.
    self.kinds = kinds_lib.base_kinds(self.config.eval.feature_kinds)
    self._complexity = jax.jit(complexity.image_complexity)
    self.data_cfg = data.suite_data_config(self.config)
    n_dev = jax.device_count()
    # Batch a multiple of the device count; chunk (if any) a multiple of it that divides the batch
    # (each device then scores its own rows) and small enough for config.scorer.memory_budget_gb.
    self.batch_size, chunk = memory.plan_for_config(
        self.config, unet.param_count(self.params), n_dev, jax.devices()[0])
    scorer_cfg = self.config.scorer
    if chunk != int(scorer_cfg.chunk):
      logging.info('Feature extraction: batch %d, chunk %d (config: batch %d, chunk %d; %d '
                   'devices, memory budget).', self.batch_size, chunk, scorer_cfg.batch_size,
                   scorer_cfg.chunk, n_dev)
      scorer_cfg = scorer_cfg.copy_and_resolve_references()
      scorer_cfg.chunk = chunk
    score_fn = scorer.make_trajectory_scorer(
        lambda p, x, t: self.model.apply(p, x, t), self.schedule, scorer_cfg, self.kinds)
    self.mesh = sharding.data_mesh()
    self._params = sharding.replicate(self.params, self.mesh)
    self.params_sha256 = provenance.params_digest(self.params)
    if self.cache_dir:  # the cache is keyed by step: drop one another network computed
      provenance.check_feature_cache(os.path.join(self.cache_dir, f'step_{self.step:08d}'),
                                     self.params_sha256, is_writer=jax.process_index() == 0)
    self.key = scorer_key(self.config.seed)
    self._score = jax.jit(score_fn)

  def _cache_path(self, dataset: str, split: str, num: int) -> str:
    c = self.config
    settings = dict(scorer=c.scorer.to_dict(), kinds=self.kinds, seed=c.seed,
                    diffusion=c.diffusion.to_dict(),
                    data={k: c.data[k] for k in ('image_size', 'channels', 'data_dir',
                                                 'texture_crops', 'synthetic_examples')})
    if self.data_cfg.resize_via:  # only when set: old caches stay valid
      settings['data']['resize_via'] = int(self.data_cfg.resize_via)
    for k in ('beta_start', 'beta_end'):  # likewise for diffusion fields at their defaults
      if settings['diffusion'].get(k) == settings_lib.section(None, 'diffusion')[k]:
        settings['diffusion'].pop(k)
    for field in provenance.NOT_RESULTS:  # results do not depend on them
      settings['scorer'].pop(field.split('.', 1)[1], None)
    if self.model.dtype != jnp.float32:  # only then, so existing float32 caches stay valid
      settings['compute_dtype'] = jnp.dtype(self.model.dtype).name
    if self.model.precision != 'default':  # likewise
      settings['precision'] = self.model.precision
    if getattr(self.model, 'attention', 'xla') != 'xla':   # cuDNN's fused attention (GPU)
      settings['attention'] = self.model.attention
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()
    return os.path.join(self.cache_dir, f'step_{self.step:08d}',
                        f'{safe_name(dataset)}__{split}__n{num}__{digest[:12]}.npz')

  def features(self, dataset: str, split: str, num: int) -> dict[str, np.ndarray]:
    """Features of the first ``num`` images (0 = all) of a dataset split.

    A class split ('mnist[0-4]') is a view of its parent (`data.parse_class_split`): its rows
    are the parent's rows of those classes among the parent's first ``num``, computed once.

    Returns:
      A flat dict: per base kind (`kinds.base_kinds`) 'features/<kind>' [N, D],
      'per_timestep/<kind>' [N, K_kind, 3], 'per_timestep_deriv/<kind>' [N, K_kind - 1, 3],
      'per_draw/<kind>' [N, R, K_kind, 3], 'per_draw_deriv/<kind>' [N, R, K_kind - 1, 3]
      (`scorer.kind_timesteps`), 'complexity/image' [N, 2] (`complexity`) and 'index' [N] int64,
      each image's index in the dataset's (the parent's) fixed order, which is also its id.
    """
    parent, classes = data.parse_class_split(dataset)
    if classes is not None:
      rows = self.index(dataset, split, num)
      return {k: v[rows] for k, v in self.features(parent, split, num).items()}

    def compute():
      images = self.images(dataset, split, num)
      # A dataset's images are named by their index in its fixed order.
      return self.features_of(images, np.arange(images.shape[0], dtype=np.int32),
                              label=f'{dataset}/{split}')
    out = self._cached(self._cache_path(dataset, split, num), compute)
    if COMPLEXITY_KEY not in out:   # a cache written before the complexity statistics existed
      out[COMPLEXITY_KEY] = self.complexity_of(self.images(dataset, split, num))
    out[INDEX_KEY] = np.arange(len(out[COMPLEXITY_KEY]), dtype=np.int64)
    return out

  def index(self, dataset: str, split: str, num: int) -> np.ndarray:
    """The indices of `images` (dataset, split, num) in the dataset's (its parent's) order."""
    return data.class_split_indices(dataset, split, self.config.data, num, self.config.seed)

  def complexity_of(self, images: np.ndarray) -> np.ndarray:
    """`complexity.image_complexity` [N, 2] of images [N, H, W, C], in batches."""
    bs = max(1, self.batch_size)
    parts = [np.asarray(self._complexity(images[i:i + bs])) for i in range(0, len(images), bs)]
    return np.concatenate(parts) if parts else np.zeros((0, complexity.DIM), np.float32)

  def images(self, dataset: str, split: str, num: int) -> np.ndarray:
    """The first ``num`` images of a dataset split, as the features of `features` see them."""
    return data.load_images(dataset, split, self.data_cfg, max_examples=num,
                            seed=self.config.seed)

  def synthetic_features(self, dataset: str, start: int, num: int) -> dict[str, np.ndarray]:
    """Features of synthetic anomalies of the ID-train images with index (`index`) in
    ``[start, start + num)`` (cached).

    ``config.select.anomalies_per_image`` anomalies per image (`synthetic.make_anomalies`).
    Also returns 'corruption' [N'] int32, the index into ``config.select.corruptions``.
    """
    corruptions = tuple(self.config.select.corruptions)
    per_image = int(settings_lib.section(self.config.select, 'select')['anomalies_per_image'])

    def compute():
      images = self.images(dataset, 'train', start + num)
      images = images[self.index(dataset, 'train', start + num) >= start]
      images, which = synthetic.make_anomalies(images, self.config.seed, corruptions, per_image)
      out = self.features_of(images, label=f'{dataset}/synthetic')  # complexity included
      out['corruption'] = which
      return out
    key = [start, corruptions, per_image, synthetic.VERSION]
    tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
    return self._cached(self._cache_path(dataset, f'synthetic{tag}', num), compute)

  def _cached(self, path: str, compute) -> dict[str, np.ndarray]:
    path = path if self.cache_dir else ''
    cached = None
    if path and os.path.exists(path):
      try:
        with np.load(path) as f:
          cached = dict(f)
      except Exception as e:  # pylint: disable=broad-except  # BadZipFile, EOFError, ValueError...
        logging.warning('Feature cache %s is unreadable (%s: %s); recomputing it.', path,
                        type(e).__name__, e)
    # Recomputing is collective: all hosts take the same branch, even if one cannot see the file
    # (a host-local disk, or process 0 still writing it).
    if sharding.all_processes(cached is not None):
      return cached
    out = compute()
    if path and jax.process_index() == 0:
      workdir_lib.atomic_savez(path, **out)
    return out

  def features_of(self, images: np.ndarray, image_ids: np.ndarray | None = None,
                  label: str = 'images') -> dict[str, np.ndarray]:
    """Features of an in-memory array of images [N, H, W, C] in [-1, 1].

    ``image_ids`` [N] int32 name the images (their noise); by default a hash of each image's
    pixels (`scorer.content_ids`), so results do not depend on the order or batching.
    """
    scorer.validate_images(images, self.config.data.image_size, self.config.data.channels)
    n = images.shape[0]
    if image_ids is None:
      ids = np.concatenate([np.asarray(_content_ids(images[i:i + 1024]))
                            for i in range(0, n, 1024)]) if n else np.zeros(0, np.int32)
    else:
      ids = np.asarray(image_ids, np.int32)
    bs = self.batch_size
    n_hosts, host = jax.process_count(), jax.process_index()
    local = bs // n_hosts
    chunks: list[dict[str, np.ndarray]] = []
    t0 = time.time()
    for start in range(0, n, bs):
      x, mask = sharding.pad_to_multiple(images[start:start + bs], bs)
      i, _ = sharding.pad_to_multiple(ids[start:start + bs], bs)
      rows = slice(host * local, (host + 1) * local)
      xg = sharding.global_batch_from_local(x[rows], self.mesh)
      ig = sharding.global_batch_from_local(i[rows], self.mesh)
      out = self._score(self._params, xg, ig, self.key)
      flat = _flatten(out)
      flat[COMPLEXITY_KEY] = self._complexity(xg)
      chunks.append({k: sharding.to_host(v)[mask] for k, v in flat.items()})
      done = min(start + bs, n)
      if done == n or (start // bs) % 4 == 3:
        dt = time.time() - t0
        logging.info('features %s: %d/%d images, %.1f images/s, ETA %.0f s', label, done, n,
                     done / dt, (n - done) * dt / done)
    if not chunks:
      raise ValueError(f'No images to compute features of ({label}).')
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


_content_ids = jax.jit(scorer.content_ids)


def _flatten(out: dict) -> dict[str, jax.Array]:
  """{'features': {kind: a}, ...} -> {'features/kind': a, ...}."""
  flat = {}
  for group, per_kind in out.items():
    for kind, value in per_kind.items():
      flat[f'{group}/{kind}'] = value
  return flat


def _per_timestep_detectors(fit: np.ndarray, seed: int) -> list[detector.DetectorParams]:
  """One full-covariance Gaussian per timestep on its 3 power sums (fit: [N, K, 3])."""
  cfg = ml_collections.ConfigDict(dict(n_components=(1,), covariance_types=('full',),
                                       cv_folds=2, kde_bandwidth=1.0, max_iter=100,
                                       reg_covar=1e-6))
  return [detector.fit_detector(fit[:, k], cfg, seed=seed).params for k in range(fit.shape[1])]


def _per_timestep_auroc(dets: list, id_test: np.ndarray, ood_test: np.ndarray) -> list[float]:
  """AUROC of each timestep's detector on ID-test vs OOD-test power sums ([N, K, 3] inputs)."""
  return [float(metrics.auroc(np.asarray(detector.anomaly_score(d, id_test[:, k])),
                              np.asarray(detector.anomaly_score(d, ood_test[:, k]))))
          for k, d in enumerate(dets)]


def run_suite(config: ml_collections.ConfigDict, workdir: str, *,
              print_table: bool = False, make_report: bool = True) -> dict:
  """Runs the OOD suite on the latest checkpoint of ``workdir`` and writes the results.

  Writes ``workdir/eval/results.json``, ``results.csv``, ``results.md``, ``scores.npz`` and the
  fitted detectors (``workdir/eval/detectors/<id>__<kind>.npz``), then the report
  (``workdir/report.md`` and plots) when ``make_report``.

  Returns:
    The results dict (as in results.json).

  Raises:
    workdir.WorkdirError: a bad config or source name (checked before any work), a network config
      that differs from the checkpoint's, or another process holding the workdir.
  """
  with workdir_lib.opened(config, workdir, 'evaluate') as workdir:
    return _run_suite(config, workdir, print_table, make_report)


def suite_pairs(config) -> list[tuple[str, str, str]]:
  """The (ID, OOD, suite) pairs the suite evaluates, in report order: every ID set of
  ``eval.id_datasets`` against every other set of ``eval.ood_datasets`` ('far'), then the
  ``eval.near_ood_pairs`` ('near': e.g. class splits such as mnist[0-4] vs mnist[5-9])."""
  ev = config.eval
  far = [(i, o, 'far') for i in ev.id_datasets for o in ev.ood_datasets if o != i]
  return far + [(str(i), str(o), 'near') for i, o in ev.near_ood_pairs]


def _run_suite(config, workdir, print_table, make_report):
  t_start = time.time()
  ev = config.eval
  kinds_lib.check(ev.feature_kinds)
  pairs = suite_pairs(config)
  id_names = list(dict.fromkeys(p[0] for p in pairs)) or list(ev.id_datasets)
  test_names = list(dict.fromkeys([*id_names, *(p[1] for p in pairs)]))
  for name in test_names:
    data.check_source_name(name)
  for name in test_names:
    if name.startswith('folder:'):  # user folders fail here, before any long computation
      data.load_images(name, 'test', config.data, max_examples=ev.num_test, seed=config.seed)
  params, step = checkpoint.restore_ema_params(workdir, config)
  logging.info('Evaluating checkpoint step %d of %s', step, workdir)
  training_note = workdir_lib.training_note(workdir, step)
  if training_note:
    logging.warning(training_note)
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(os.path.join(out_dir, 'detectors'), exist_ok=True)
  extractor = FeatureExtractor(config, params, step, cache_dir=os.path.join(workdir, 'features'))
  record = provenance.record(step, extractor.params_sha256, config)  # saved with every detector

  rows, scores, detectors_info, settings = [], {}, {}, {}
  method_names = protocol.methods(config)
  fits, vals, id_tests, fitted_all = {}, {}, {}, {}
  # Only selected kinds choose settings; a baselines-only suite fits on every train image.
  selecting = protocol.needs_selection(ev.feature_kinds)
  num_val = int(config.select.num_val) if selecting else 0
  held_out = MIN_SELECTION_IMAGES if selecting else 0
  for id_name in id_names:
    train = extractor.features(id_name, 'train', ev.num_fit + num_val if ev.num_fit else 0)
    index = train[INDEX_KEY]
    n_train = len(index)
    # The first num_fit images of the set's order fit (of a class split: those among its
    # parent's first num_fit); the rest are held out.
    n_fit = min(int(np.sum(index < ev.num_fit)) if ev.num_fit else n_train, n_train - held_out)
    if n_fit < MIN_SELECTION_IMAGES:
      raise ValueError(
          f'ID set {id_name!r} has {n_train} training images: too few to fit detectors'
          + (f' and hold out {held_out}+ for the zero-shot selection' if selecting else '')
          + '; use a larger ID set.')
    fits[id_name] = _take(train, slice(0, n_fit))
    vals[id_name] = _take(train, slice(n_fit, None))
    syn = (extractor.synthetic_features(id_name, int(index[n_fit]),
                                        int(index[-1]) + 1 - int(index[n_fit]))
           if selecting else None)
    id_tests[id_name] = extractor.features(id_name, 'test', ev.num_test)
    fitted_all[id_name] = protocol.fit_id_set(config, ev.feature_kinds, fits[id_name],
                                              vals[id_name], syn)
  ood_tests: dict[str, Mapping[str, np.ndarray]] = {}

  def ood_test(name: str) -> Mapping[str, np.ndarray]:
    """An OOD set's test features, read once (every method and ID set scores them)."""
    if name not in ood_tests:
      ood_tests[name] = extractor.features(name, 'test', ev.num_test)
    return ood_tests[name]

  loo = None
  if config.select.oracle and protocol.SEED_KIND in ev.feature_kinds:
    ood_train = {o: extractor.features(o, 'train', num_val) for o in ev.ood_datasets}
    chosen, loo = protocol.oracle(config, list(ev.id_datasets), fits, vals, ood_train,
                                  ood_test,
                                  id_tests, also=[i for i in id_names if i not in ev.id_datasets])
    for id_name, f in chosen.items():
      fitted_all[id_name][protocol.SEED_KIND + protocol.ORACLE] = f

  localisation_result = None
  if int(config.select.localisation_images) > 0 and protocol.SEED_KIND in ev.feature_kinds:
    id_name = id_names[0]
    no_ssim = fitted_all[id_name].get('stein')
    localisation_result = map_study.localisation_study(
        config, extractor, id_name, fitted_all[id_name][protocol.SEED_KIND].detector.reducer,
        no_ssim.detector.reducer if no_ssim else None)

  for id_name in id_names:
    fit, id_test = fits[id_name], id_tests[id_name]
    detectors_info[id_name], settings[id_name] = {}, {}
    for method in method_names:
      f = fitted_all[id_name][method]
      info = dict(f.detector.info, setting=f.setting)
      workdir_lib.save_detector(dataclasses.replace(f.detector, info=info),
                                detector_path(workdir, id_name, method), provenance=record)
      detectors_info[id_name][method] = f.detector.info
      settings[id_name][method] = dict(setting=f.setting, selection=f.selection)
      s_id = protocol.method_scores(f, method, id_test)
      scores[f'{id_name}|{method}|id'] = s_id
      t_key = f'per_timestep/{method}'
      t_dets = _per_timestep_detectors(fit[t_key], config.seed) if t_key in fit else None
      for _, ood_name, suite in (p for p in pairs if p[0] == id_name):
        ood = ood_test(ood_name)
        s_ood = protocol.method_scores(f, method, ood)
        scores[f'{id_name}|{method}|{ood_name}'] = s_ood
        row = dict(id=id_name, ood=ood_name, kind=method, role=protocol.role(method),
                   suite=suite, **metrics.ood_metrics(s_id, s_ood))
        if t_dets is not None:
          row['per_timestep_auroc'] = _per_timestep_auroc(t_dets, id_test[t_key], ood[t_key])
        rows.append(row)
        logging.info('%s vs %s [%s]: AUROC %.4f FPR95 %.4f', id_name, ood_name, method,
                     row['auroc'], row['fpr95'])

  results = dict(
      checkpoint_step=int(step), workdir=workdir,
      timesteps=schedule_lib.scorer_timesteps(config.diffusion.num_timesteps,
                                              config.scorer.num_steps).tolist(),
      kind_timesteps={kind: scorer.kind_timesteps(config.diffusion.num_timesteps, config.scorer,
                                                  kind).tolist() for kind in ev.feature_kinds},
      wall_time_s=time.time() - t_start, num_devices=jax.device_count(),
      backend=jax.default_backend(), rows=rows,
      averages=_averages(rows, method_names, 'far'),
      near_averages=_averages(rows, method_names, 'near'), settings=settings,
      leave_one_out=loo, localisation=localisation_result, detectors=detectors_info,
      config=json.loads(config.to_json_best_effort()), provenance=record,
      training_note=training_note)
  if jax.process_index() == 0:
    _write_results(results, scores, out_dir)
  _write_tensorboard(results, workdir)
  table = tables.results_table(results, 'far')
  if results['near_averages']:
    table += '\n\nNear-OOD:\n' + tables.results_table(results, 'near')
  if print_table:
    print(table, flush=True)
  if make_report and jax.process_index() == 0:
    from ddm_ood import report  # matplotlib is only needed here
    report.write_report(config, workdir, results, scores,
                        map_study.example_maps_fn(config, extractor, fitted_all[id_names[0]]))
  return results


def _averages(rows: list[dict], methods: list[str], suite: str) -> dict:
  """{method: {metric: mean over the suite's pairs}} for the methods with rows in ``suite``."""
  out = {}
  for kind in methods:
    sel = [r for r in rows if r['kind'] == kind and r.get('suite', 'far') == suite]
    if sel:
      out[kind] = {m: float(np.mean([r[m] for r in sel])) for m in METRIC_NAMES}
  return out


def _take(feats: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
  return {k: v[rows] for k, v in feats.items()}


def _write_tensorboard(results: dict, workdir: str) -> None:
  """AUROC / FPR95 per pair and method, and the averages, as TensorBoard scalars in
  ``workdir/eval`` (`metric_writer`, as the training metrics), at the checkpoint's step."""
  writer = metric_writer.MetricWriter(
      os.path.join(workdir, 'eval') if jax.process_index() == 0 else None, collection='eval')
  scalars = {}
  for r in results['rows']:
    for m in ('auroc', 'fpr95'):
      scalars[f"eval/{m}/{r['id']}/{r['ood']}/{r['kind']}"] = r[m]
  for kind, avg in results['averages'].items():
    for m in ('auroc', 'fpr95'):
      scalars[f'eval/average_{m}/{kind}'] = avg[m]
  for kind, avg in (results.get('near_averages') or {}).items():
    for m in ('auroc', 'fpr95'):
      scalars[f'eval/near_average_{m}/{kind}'] = avg[m]
  writer.write_scalars(int(results['checkpoint_step']), scalars)
  writer.flush()
  writer.close()


def _write_results(results: dict, scores: dict, out_dir: str) -> None:
  workdir_lib.atomic_write_json(os.path.join(out_dir, 'results.json'), results)
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(['id', 'ood', 'kind', 'role', 'suite', *METRIC_NAMES, 'n_id', 'n_ood'])
  for r in results['rows']:
    w.writerow([r['id'], r['ood'], r['kind'], r.get('role', ''), r.get('suite', 'far'),
                *(f'{r[m]:.6f}' for m in METRIC_NAMES), r['n_id'], r['n_ood']])
  workdir_lib.atomic_write(os.path.join(out_dir, 'results.csv'), buf.getvalue())
  text = tables.results_table(results, 'far') + '\n'
  if results['near_averages']:
    text += '\n## Near-OOD\n\n' + tables.results_table(results, 'near') + '\n'
  workdir_lib.atomic_write(os.path.join(out_dir, 'results.md'), text)
  workdir_lib.atomic_savez(os.path.join(out_dir, 'scores.npz'), **scores, **{
      provenance.SCORES_KEY: np.array(json.dumps(results['provenance']))})
