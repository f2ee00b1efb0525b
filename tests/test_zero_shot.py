"""The zero-shot path: aggregations, synthetic anomalies, selection from ID data only."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from ddm_ood import default_config
from ddm_ood import detector
from ddm_ood import workdir
from ddm_ood import features
from ddm_ood import metrics
from ddm_ood import selection
from ddm_ood import synthetic

K = 5


def _stats(n, seed, scale=None):
  """Random per-timestep power sums [n, K, 3] and derivatives [n, K-1, 3], with per-timestep
  scales that differ by orders of magnitude (as the real ones do: large at small t)."""
  rng = np.random.default_rng(seed)
  scale = np.logspace(3, 0, K)[:, None] if scale is None else scale
  per_t = rng.normal(size=(n, K, 3)) * scale
  per_d = rng.normal(size=(n, K - 1, 3)) * scale[1:]
  return per_t, per_d


def test_flatten_layout_and_sum_equals_scorer_features():
  per_t, per_d = _stats(7, 0)
  s = features.flatten_stats(per_t, per_d)
  assert s.shape == (7, features.num_stats(K)) == (7, 6 * K - 3)
  np.testing.assert_array_equal(s[:, :3 * K].reshape(7, K, 3), per_t)
  np.testing.assert_array_equal(s[:, 3 * K:].reshape(7, K - 1, 3), per_d)
  for k0 in range(K):
    r = features.fit_reducer(s, K, k0, 'sum')
    want = np.concatenate([per_t[:, k0:].sum(1), per_d[:, k0:].sum(1)], -1)   # the 6-D feature
    np.testing.assert_allclose(np.asarray(features.reduce(r, s)), want, rtol=1e-5, atol=1e-3)


def test_zsum_standardises_each_timestep_on_the_fit_set():
  per_t, per_d = _stats(400, 1)
  s = features.flatten_stats(per_t, per_d)
  r = features.fit_reducer(s, K, 1, 'zsum')
  f = np.asarray(features.reduce(r, s))
  z_t = (per_t - per_t.mean(0)) / per_t.std(0)
  z_d = (per_d - per_d.mean(0)) / per_d.std(0)
  want = np.concatenate([z_t[:, 1:].sum(1), z_d[:, 1:].sum(1)], -1)
  np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-4)
  # Every timestep contributes the same spread: the features' variance is about W (W = K - 1
  # independent unit-variance terms), however unequal the raw scales.
  np.testing.assert_allclose(f[:, :3].var(0), K - 1, rtol=0.15)


def test_concat_keeps_the_window_columns_standardised():
  per_t, per_d = _stats(300, 2)
  s = features.flatten_stats(per_t, per_d)
  r = features.fit_reducer(s, K, 2, 'concat')
  f = np.asarray(features.reduce(r, s))
  w = K - 2
  assert f.shape == (300, 3 * w + 3 * (w - 1))
  np.testing.assert_allclose(f.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(f.std(0), 1, rtol=1e-4)


def test_timestep_weights_follow_the_aggregation():
  per_t, per_d = _stats(200, 3)
  s = features.flatten_stats(per_t, per_d)
  np.testing.assert_array_equal(features.timestep_weights(features.fit_reducer(s, K, 2, 'sum'), K),
                                [0, 0, 1, 1, 1])
  w = features.timestep_weights(features.fit_reducer(s, K, 0, 'zsum'), K)
  np.testing.assert_allclose(w, 1 / per_t[:, :, 1].std(0), rtol=1e-4)


def test_reducer_errors_are_clear():
  s = features.flatten_stats(*_stats(5, 4))
  with pytest.raises(ValueError, match='aggregation'):
    features.fit_reducer(s, K, 0, 'mean')
  with pytest.raises(ValueError, match='window start'):
    features.fit_reducer(s, K, K, 'zsum')
  with pytest.raises(ValueError, match=r'\[N, 27\]'):
    features.fit_reducer(s[:, :-1], K, 0, 'zsum')
  bad = s.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    features.fit_reducer(bad, K, 0, 'zsum')


def test_synthetic_anomalies_are_deterministic_and_change_every_image():
  rng = np.random.default_rng(0)
  x = np.clip(rng.normal(size=(12, 16, 16, 1)), -1, 1).astype(np.float32)
  a, which = synthetic.make_anomalies(x, seed=3)
  b, _ = synthetic.make_anomalies(x, seed=3)
  np.testing.assert_array_equal(a, b)
  c, _ = synthetic.make_anomalies(x, seed=4)
  assert not np.array_equal(a, c)   # the random corruptions depend on the seed
  np.testing.assert_array_equal(which, np.arange(12) % len(synthetic.CORRUPTIONS))
  assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
  # What each corruption did to image i (donor: image (i + 6) % 12).
  for i in range(12):
    c, donor = synthetic.CORRUPTIONS[which[i]], x[(i + 6) % 12]
    assert np.abs(a[i] - x[i]).max() > 1e-3, c
    if c == 'patch_shuffle':   # the same 16 patches of 4 x 4 pixels, in another layout
      tiles = lambda im: sorted(im[r:r + 4, q:q + 4].tobytes() for r in range(0, 16, 4)
                                for q in range(0, 16, 4))
      assert tiles(a[i]) == tiles(x[i])
    elif c == 'cutpaste':      # a rectangle, 30-60% of the side, cut from the donor
      ys, xs = np.nonzero(np.any(a[i] != x[i], -1))
      h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      assert 4 <= h <= 9 and 4 <= w <= 9, (h, w)
      crop = a[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      assert any(np.array_equal(crop, donor[y:y + h, q:q + w])
                 for y in range(17 - h) for q in range(17 - w))
    elif c == 'blend':
      np.testing.assert_allclose(a[i], np.clip(0.5 * (x[i] + donor), -1, 1), atol=1e-7)
    elif c == 'blur':          # smoother: less total variation, same mean up to the border
      tv = lambda im: np.abs(np.diff(im, axis=0)).sum() + np.abs(np.diff(im, axis=1)).sum()
      assert tv(a[i]) < 0.5 * tv(x[i]) and abs(a[i].mean() - x[i].mean()) < 0.05
    elif c == 'noise':         # std 0.2 where not clipped
      free = np.abs(a[i]) < 1
      assert abs((a[i] - x[i])[free].std() - 0.2) < 0.04 and abs((a[i] - x[i])[free].mean()) < 0.05
  inv = list(synthetic.CORRUPTIONS).index('invert')
  np.testing.assert_array_equal(a[inv], -x[inv])
  # Image i's anomaly does not depend on the other images (except its donor).
  d, _ = synthetic.make_anomalies(x[:12], seed=3, corruptions=('blur',))
  e, _ = synthetic.make_anomalies(x[:6], seed=3, corruptions=('blur',))
  np.testing.assert_array_equal(d[:6], e)
  with pytest.raises(ValueError, match='Unknown corruption'):
    synthetic.make_anomalies(x, 0, ('rotate',))
  with pytest.raises(ValueError, match='at least 2'):
    synthetic.make_anomalies(x[:1], 0)


def _strokes(n, size=16, seed=0):
  """Bright random strokes on a dark background, in [-1, 1] (MNIST-like)."""
  rng = np.random.default_rng(seed)
  x = -np.ones((n, size, size, 1), np.float32)
  for i in range(n):
    r = rng.integers(3, size - 3)
    x[i, r - 1:r + 2, 2:size - 2] = rng.uniform(0.5, 1.0)
    c = rng.integers(3, size - 3)
    x[i, 2:size - 2, c - 1:c + 2] = rng.uniform(0.5, 1.0)
  return x


@pytest.mark.parametrize('name', synthetic.CORRUPTIONS)
def test_every_corruption_is_deterministic_and_keeps_shape_and_range(name):
  x = np.concatenate([_strokes(6), np.clip(np.random.default_rng(1).normal(
      size=(6, 16, 16, 1)), -1, 1).astype(np.float32)])
  a, which = synthetic.make_anomalies(x, 7, (name,), per_image=2)
  b, _ = synthetic.make_anomalies(x, 7, (name,), per_image=2)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (24, 16, 16, 1) and a.dtype == np.float32
  assert a.min() >= -1 and a.max() <= 1
  np.testing.assert_array_equal(which, 0)
  assert np.mean([np.abs(a[j] - x[j % 12]).max() > 1e-3 for j in range(24)]) >= 0.9, name
  assert synthetic.family_of(name) in synthetic.FAMILIES


def test_near_ood_corruptions_do_what_they_say():
  x = _strokes(8)
  names = ('erode', 'dilate', 'low_contrast', 'quantise', 'erase', 'rescale', 'shift',
           'mix_halves')
  a, which = synthetic.make_anomalies(x, 0, names)
  ink = lambda im: (im + 1).sum()    # background -1
  for i in range(8):
    c, y, donor = names[which[i]], a[i], x[(i + 4) % 8]
    if c == 'erode':          # thinner strokes: less ink, never brighter
      assert np.all(y <= x[i] + 1e-6) and ink(y) < 0.7 * ink(x[i])
    elif c == 'dilate':       # thicker strokes
      assert np.all(y >= x[i] - 1e-6) and ink(y) > 1.3 * ink(x[i])
    elif c == 'low_contrast':  # pulled towards the background (-1): 35-60% of the ink
      assert 0.34 < ink(y) / ink(x[i]) < 0.61
    elif c == 'quantise':     # two grey levels
      assert len(np.unique(y)) <= 2
    elif c == 'erase':        # a rectangle set to the background, nothing else changed
      changed = np.any(y != x[i], -1)
      assert np.all(y[changed] == -1) and changed.any()
    elif c in ('rescale', 'shift'):   # the same kind of image, moved or resized
      assert abs(ink(y) - ink(x[i])) > 1 or np.abs(y - x[i]).max() > 0.5
    elif c == 'mix_halves':   # one half is the donor's
      h = 8
      halves = [(slice(0, h), slice(None)), (slice(h, None), slice(None)),
                (slice(None), slice(0, h)), (slice(None), slice(h, None))]
      assert any(np.array_equal(y[s], donor[s]) and np.array_equal(
          np.delete(y, range(*s[0].indices(16)), 0) if s[1] == slice(None) else
          np.delete(y, range(*s[1].indices(16)), 1),
          np.delete(x[i], range(*s[0].indices(16)), 0) if s[1] == slice(None) else
          np.delete(x[i], range(*s[1].indices(16)), 1)) for s in halves)
  # per_image > 1: the first N anomalies are those of per_image = 1; the next N use other seeds.
  b, wb = synthetic.make_anomalies(x, 0, names, per_image=3)
  np.testing.assert_array_equal(b[:8], a)
  np.testing.assert_array_equal(wb, np.arange(24) % len(names))
  with pytest.raises(ValueError, match='per_image'):
    synthetic.make_anomalies(x, 0, names, per_image=0)


def test_corruption_registry_is_the_config_default():
  assert tuple(default_config.get_config().select.corruptions) == synthetic.CORRUPTIONS
  assert set(synthetic.REGISTRY) == set(synthetic.CORRUPTIONS)
  for fam in synthetic.FAMILIES:
    assert any(c.family == fam for c in synthetic.REGISTRY.values())
  with pytest.raises(ValueError, match='registered twice'):
    synthetic.register('blur', 'simpler')(lambda x, d, r: x)


def test_criterion_is_a_low_quantile_of_the_corruptions():
  per = {'a': 1.0, 'b': 0.9, 'c': 0.5, 'd': 0.3, 'e': 1.0, 'f': 1.0}
  assert selection.criterion(per, 1.0) == pytest.approx(np.mean(list(per.values())))
  assert selection.criterion(per, 1 / 3) == pytest.approx(0.4)     # the 2 worst of 6
  assert selection.criterion(per, 0.01) == pytest.approx(0.3)       # the worst
  with pytest.raises(ValueError, match='quantile'):
    selection.criterion(per, 0)


def _flat_dict(per_t_r, per_d_r, kind='stein_ssim'):
  return {f'per_draw/{kind}': per_t_r, f'per_draw_deriv/{kind}': per_d_r}


def _det_cfg():
  return ml_collections.ConfigDict(dict(n_components=(1,), covariance_types=('full',), cv_folds=2,
                                        kde_bandwidth=1.0, max_iter=50, reg_covar=1e-6))


def test_zero_shot_selection_finds_the_informative_window():
  """Anomalies differ from ID images only at the last two timesteps, where the noise is smallest;
  at small t a large texture-like noise buries them in the plain sum. The ID-only protocol must
  pick a window / aggregation that sees them, and its detector must separate them."""
  rng = np.random.default_rng(0)
  scale = np.logspace(3, 0, K)[:, None]

  def make(n, shift):
    per_t = rng.normal(size=(n, 2, K, 3)) * scale
    per_t[:, :, 3:, 1] += shift
    per_d = np.diff(per_t, axis=2)
    return _flat_dict(per_t, per_d)

  fit, val, syn = make(300, 0.0), make(100, 0.0), make(60, 4.0)
  which = np.arange(60) % 2
  cands = selection.candidates(['stein_ssim'], K, np.arange(K) * 10, [0, 30],
                               ['sum', 'zsum'])
  assert [(c.k0, c.aggregation) for c in cands] == [(0, 'sum'), (0, 'zsum'), (3, 'sum'),
                                                     (3, 'zsum')]
  best, det, table = selection.select_zero_shot(cands, fit, val, syn, which, ('a', 'b'), K,
                                                _det_cfg(), 0)
  crit = {(r['setting']['k0'], r['setting']['aggregation']): r['criterion'] for r in table}
  assert crit[(0, 'sum')] < 0.75          # the plain sum over the whole grid is buried
  assert best != cands[0] and max(crit.values()) > 0.95
  assert set(table[0]['auroc']) == {'a', 'b'}
  s_val = selection.score(det, best, val)
  s_syn = selection.score(det, best, syn)
  assert (s_syn.mean() - s_val.mean()) > 3 * s_val.std()


def test_draws_first_uses_draw_zero_only_and_fit_matches_manual():
  rng = np.random.default_rng(5)
  per_t = rng.normal(size=(50, 3, K, 3))
  per_d = rng.normal(size=(50, 3, K - 1, 3))
  d = _flat_dict(per_t, per_d)
  np.testing.assert_array_equal(selection.stats_of(d, 'stein_ssim', 'first'),
                                features.flatten_stats(per_t[:, 0], per_d[:, 0]))
  np.testing.assert_allclose(selection.stats_of(d, 'stein_ssim', 'all'),
                             features.flatten_stats(per_t.mean(1), per_d.mean(1)))
  s = selection.Setting('stein_ssim', 'first', 1, 'zsum')
  fitted = selection.fit(s, d, K, _det_cfg(), 0)
  stats = selection.stats_of(d, 'stein_ssim', 'first')
  manual = detector.fit_detector(
      np.asarray(features.reduce(features.fit_reducer(stats, K, 1, 'zsum'), stats)), _det_cfg(), 0)
  np.testing.assert_allclose(selection.score(fitted, s, d), np.asarray(manual.score(
      features.reduce(fitted.reducer, stats))), rtol=1e-6)
  desc = s.describe(np.arange(K) * 100, num_draws=3)
  assert desc == dict(kind='stein_ssim', draws='first', num_draws=1, t_min=100, k0=1,
                      aggregation='zsum', complexity=False)
  assert selection.Setting.from_description(desc) == s


def test_detector_with_reducer_round_trips(tmp_path):
  rng = np.random.default_rng(6)
  d = _flat_dict(rng.normal(size=(40, 2, K, 3)), rng.normal(size=(40, 2, K - 1, 3)))
  s = selection.Setting('stein_ssim', 'all', 0, 'zsum')
  fitted = selection.fit(s, d, K, _det_cfg(), 0)
  path = str(tmp_path / 'det.npz')
  workdir.save_detector(dataclasses.replace(fitted, info=dict(fitted.info, setting=s.describe(
      np.arange(K), 2))), path)
  back = workdir.load_detector(path)
  np.testing.assert_array_equal(np.asarray(back.reducer.weight), np.asarray(fitted.reducer.weight))
  np.testing.assert_allclose(selection.score(back, s, d), selection.score(fitted, s, d), rtol=1e-6)
  assert back.info['setting']['aggregation'] == 'zsum'
  plain = detector.fit_detector(rng.normal(size=(40, 6)), _det_cfg(), 0)
  with pytest.raises(ValueError, match='not on per-timestep statistics'):
    plain.score_stats(np.zeros((2, features.num_stats(K))))


def test_oracle_leave_one_out_excludes_the_set():
  """select_oracle with ``exclude`` never looks at the excluded set."""
  rng = np.random.default_rng(7)
  scale = np.ones((K, 1))

  def make(n, shift_k):
    per_t = rng.normal(size=(n, 1, K, 3)) * scale
    if shift_k is not None:
      per_t[:, :, shift_k, 1] += 5.0
    return _flat_dict(per_t, np.diff(per_t, axis=2))

  fits = {'id': make(200, None)}
  vals = {'id': make(80, None)}
  # OOD set 'early' differs at k = 0 only, 'late' at k = 4 only.
  ood = {'early': make(80, 0), 'late': make(80, 4)}
  cands = selection.candidates(['stein_ssim'], K, np.arange(K), [0, 4], ['sum'])
  fitted = lambda i, s: selection.fit(s, fits[i], K, _det_cfg(), 0)
  best, _ = selection.select_oracle(cands, ['id'], fitted, vals, ood)
  assert best.k0 == 0                     # only the whole grid sees both sets
  best_wo, table = selection.select_oracle(cands, ['id'], fitted, vals, ood, exclude=['early'])
  assert best_wo.k0 == 4                  # without 'early', the late window wins ...
  assert all('early' not in pair for row in table for pair in row['auroc'])


def test_scores_see_both_tails_with_complexity():
  """Images whose error energy is far below (or above) what ID images of their complexity show
  are flagged. Without the complexity statistics the low ones hide in the ID energy range:
  exactly the failure of error-energy scores on inputs simpler than the ID data."""
  rng = np.random.default_rng(11)

  def make(n, energy_factor):
    cx = rng.uniform(-1.0, 1.0, size=(n, 1))                   # complexity, varies a lot
    level = (1.0 + 0.8 * cx) * energy_factor                    # ID energy grows with it
    per_t = rng.normal(size=(n, 2, K, 3)) * 0.05
    per_t[..., 1] += level[:, None] * np.linspace(1, 2, K)[None, None, :]
    per_t[..., 0] += 0.3 * level[:, None]
    d = _flat_dict(per_t, np.diff(per_t, axis=2))
    d[selection.COMPLEXITY_KEY] = np.concatenate([cx, 0.5 * cx + 0.05 * rng.normal(size=(n, 1))],
                                                 1).astype(np.float32)
    return d

  fit, test_id = make(400, 1.0), make(200, 1.0)
  low, high = make(200, 0.5), make(200, 1.6)        # energy 0.5x / 1.6x of ID at equal complexity
  energy = lambda d: d['per_draw/stein_ssim'][:, :, :, 1].mean((1, 2))
  # The low set's energies lie inside the ID range: no one-sided energy threshold finds them.
  assert np.percentile(energy(low), 90) < np.percentile(energy(test_id), 90)
  aurocs = {}
  for c in (False, True):
    s = selection.Setting('stein_ssim', 'all', 0, 'zsum', c)
    det = selection.fit(s, fit, K, _det_cfg(), 0)
    s_id = selection.score(det, s, test_id)
    aurocs[c] = [float(metrics.auroc(s_id, selection.score(det, s, o))) for o in (low, high)]
  assert aurocs[True][0] > 0.95 and aurocs[True][1] > 0.95, aurocs    # both tails flagged
  assert aurocs[False][0] < 0.8, aurocs    # without complexity the simpler inputs hide
