"""One owner per concept: the kinds registry, typed settings with one default per field."""

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from ddm_ood import default_config
from ddm_ood import detector
from ddm_ood import kinds
from ddm_ood import pixel_maps
from ddm_ood import protocol
from ddm_ood import scorer
from ddm_ood import settings
from ddm_ood import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_is_the_only_list_of_kinds():
  assert scorer.FEATURE_KINDS == kinds.NAMES
  assert pixel_maps.MAP_KINDS == kinds.MAP_KINDS == tuple(k for k in kinds.NAMES
                                                      if not k.startswith('diffpath'))
  assert scorer.FEATURE_DIMS == {k: (1 if k == 'diffpath_1d' else 6) for k in kinds.NAMES}
  assert protocol.SEED_KIND == kinds.SEED == 'stein_ssim'
  assert protocol.BASELINE_KINDS == kinds.BASELINES == ('diffpath_6d', 'diffpath_1d')
  assert [protocol.role(m) for m in ('zero_shot', 'stein_ssim@oracle', 'stein', 'stein_ddim',
                                     'stein+stein_ddim', 'diffpath_1d')] \
      == ['method', 'method', 'ablation', 'ablation', 'ablation', 'baseline']
  # Trajectory routing: the '*_ddim' ablations and the baselines always read the DDIM path.
  assert {k: kinds.get(k).trajectory_for('forward') for k in kinds.NAMES} == {
      'stein_ssim': 'forward', 'stein': 'forward', 'eps_ssim': 'forward', 'diffpath_6d': 'ddim',
      'diffpath_1d': 'ddim', 'stein_ssim_ddim': 'ddim', 'stein_ddim': 'ddim'}
  assert {kinds.get(k).trajectory_for('ddim') for k in kinds.NAMES} == {'ddim'}
  assert protocol.needs_selection(('stein', 'diffpath_6d'))
  assert not protocol.needs_selection(kinds.BASELINES)
  # 'selected' is its own field, not a reading of the role.
  assert {k for k in kinds.NAMES if kinds.get(k).selected} == set(kinds.FUSABLE) == {
      'stein_ssim', 'stein', 'eps_ssim', 'stein_ssim_ddim', 'stein_ddim'}


def test_fused_kinds_are_built_from_their_name():
  k = kinds.get('stein+stein_ddim')
  assert k.fused and k.parts == k.base_kinds == ('stein', 'stein_ddim')
  assert k.selected and k.windowed and k.dim == 12 and not k.has_pixel_map
  assert k.trajectories_for('forward') == ('forward', 'ddim')
  assert kinds.get('stein_ssim+stein_ssim_ddim+stein').dim == 18
  assert kinds.base_kinds(('stein_ssim', 'stein+stein_ddim', 'diffpath_6d', 'stein_ddim')) == (
      'stein_ssim', 'stein', 'stein_ddim', 'diffpath_6d')
  with pytest.raises(ValueError, match="'diffpath_6d' cannot be fused"):
    kinds.get('stein+diffpath_6d')
  with pytest.raises(ValueError, match='two or more different'):
    kinds.get('stein+stein')
  with pytest.raises(ValueError, match='reads several trajectories'):
    k.trajectory_for('forward')
  assert kinds.default_method(('stein', 'diffpath_6d')) == 'zero_shot'
  assert kinds.default_method(('diffpath_6d', 'diffpath_1d')) == 'diffpath_6d'


def test_unknown_kinds_are_named():
  with pytest.raises(ValueError, match=r"Unknown feature kind 'msma'; choose from \('stein_ssim'"):
    kinds.check(('stein', 'msma'))
  with pytest.raises(ValueError, match='empty'):
    kinds.check(())
  with pytest.raises(ValueError, match=r"write \('stein',\)"):
    kinds.check('stein')
  with pytest.raises(ValueError, match=r"lists \['stein'\] more than once"):
    kinds.check(('stein', 'stein', 'diffpath_1d'))
  with pytest.raises(ValueError, match='Invalid kind'):
    kinds.Kind('x', 'sideways', 'stein', True, '6d', 'method', True)


def test_settings_take_the_one_default_of_each_field():
  full = default_config.get_config()
  assert settings.scorer(full.scorer) == settings.scorer({}) == settings.scorer(None)
  s = settings.scorer({'num_draws': 4, 't_min': 300})
  assert (s.num_draws, s.t_min, s.num_steps) == (4, 300, full.scorer.num_steps)
  assert settings.scorer(s) is s
  # detector.max_iter: one default (the schema's), whether or not a partial config names it.
  d = settings.detector(ml_collections.ConfigDict({'n_components': [1, 2], 'cv_folds': 2}))
  assert d.max_iter == full.detector.max_iter == 200
  assert d.n_components == (1, 2) and d.covariance_types == tuple(full.detector.covariance_types)
  hash(s), hash(d)   # frozen and hashable: usable as static arguments


@pytest.mark.parametrize('field,value,message', [
    ('mode', 'reverse', r"config.scorer.mode='reverse' is not one of \('forward', 'ddim'\)"),
    ('num_draws', 0, 'config.scorer.num_draws must be >= 1'),
    ('t_min', -1, 'config.scorer.t_min must be >= 0'),
    ('chunk', -2, 'config.scorer.chunk must be >= 0'),
    ('ssim_pair', 'x', 'config.scorer.ssim_pair'),
])
def test_bad_scorer_settings_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    settings.scorer({field: value})


@pytest.mark.parametrize('field,value,message', [
    ('cv_folds', 1, 'config.detector.cv_folds must be >= 2'),
    ('covariance_types', ('full', 'banded'), "Unknown covariance type 'banded'"),
    ('n_components', (), 'must be non-empty'),
    ('n_components', (0, 2), 'n_components must be >= 1'),
    ('kde_bandwidth', 'wide', "kde_bandwidth must be a float, 'scott' or 'silverman'"),
])
def test_bad_detector_settings_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    settings.detector({field: value})
  with pytest.raises(ValueError, match=message):   # fit_detector parses at its boundary
    detector.fit_detector(np.random.default_rng(0).normal(size=(40, 2)), {field: value})


def test_no_config_get_with_a_default_in_the_library():
  """Defaults live in default_config only: no ``cfg.get(name, default)`` in ddm_ood/."""
  pattern = re.compile(r'(cfg|config|\bm|\bsc|\bc\.\w+)\.get\(\s*[\'"]\w+[\'"]\s*,')
  hits = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, 'ddm_ood')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        for i, line in enumerate(open(path), 1):
          if pattern.search(line):
            hits.append(f'{os.path.relpath(path, ROOT)}:{i}: {line.strip()}')
  assert not hits, hits


def test_load_config_fills_fields_an_older_workdir_lacks(tmp_path):
  cfg = default_config.get_config().to_dict()
  del cfg['scorer']['t_min'], cfg['model']['norm_eps'], cfg['select']
  cfg['scorer']['num_draws'] = 3
  with open(tmp_path / workdir_lib.CONFIG_FILE, 'w') as f:
    json.dump(json.loads(json.dumps(cfg, default=list)), f)
  back = workdir_lib.load_config(str(tmp_path))
  full = default_config.get_config()
  assert back.scorer.t_min == full.scorer.t_min and back.model.norm_eps == full.model.norm_eps
  assert back.scorer.num_draws == 3
  assert back.select.to_dict().keys() == full.select.to_dict().keys()


def test_every_core_entry_checks_inputs_the_same_way():
  """The UNet, the scorer and the anomaly map share one input check (`ddm_ood.inputs`)."""
  import jax
  import jax.numpy as jnp
  from ddm_ood import schedule as schedule_lib
  from ddm_ood.unet import UNet
  model = UNet(channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               num_heads=1, dropout=0.0, num_groups=4)
  sched = schedule_lib.make_schedule('cosine', 100)
  apply_fn = lambda p, x, t: model.apply(p, x, t, train=False)  # noqa: E731
  cfg = {'num_steps': 4}
  ints = jnp.zeros((2, 8, 8, 1), jnp.int32)
  ids = jnp.arange(2)
  with pytest.raises(ValueError, match=r'^UNet: images must be float in \[-1, 1\], got dtype int32'):
    model.init(jax.random.key(0), ints, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r'^scorer: images must be float'):
    scorer.make_trajectory_scorer(apply_fn, sched, cfg)(None, ints, ids, jax.random.key(0))
  with pytest.raises(ValueError, match=r'^anomaly map: images must be float'):
    pixel_maps.make_anomaly_map_fn(apply_fn, sched, cfg)(None, ints, ids, jax.random.key(0),
                                                         jnp.ones(4))
  with pytest.raises(ValueError, match=r'^scorer: images must have shape \[B, H, W, C\]'):
    scorer.make_trajectory_scorer(apply_fn, sched, cfg)(None, ints[0].astype(float), ids,
                                                        jax.random.key(0))
  with pytest.raises(ValueError, match=r'^scorer: image_ids must be integers of shape \[B\]=\[2\]'):
    scorer.make_trajectory_scorer(apply_fn, sched, cfg)(None, ints.astype(float), ids[:1],
                                                        jax.random.key(0))


@pytest.mark.parametrize('field,value,message', [
    ('corruptions', ('blur', 'melt'), r"config.select.corruptions=\('blur', 'melt'\) must be a "
                                      r"non-empty subset of \('patch_shuffle'.*; unknown: \['melt'\]"),
    ('aggregations', (), r'config.select.aggregations=\(\) must be a non-empty subset'),
    ('complexity', (), r'config.select.complexity=\(\) must be a non-empty tuple of booleans'),
    ('complexity', ('yes',), r'must be a non-empty tuple of booleans'),
    ('criterion_quantile', 0.0, r'config.select.criterion_quantile=0.0 must be in \(0, 1\]'),
    ('anomalies_per_image', 0, r'config.select.anomalies_per_image=0 must be >= 1'),
])
def test_select_section_is_validated(field, value, message):
  cfg = default_config.get_config()
  cfg.select[field] = value
  with pytest.raises(workdir_lib.WorkdirError, match=message):
    workdir_lib.validate_config(cfg, 'evaluate')


@pytest.mark.parametrize('pairs,message', [
    ((('mnist[0-4]',),), r"near_ood_pairs: \('mnist\[0-4\]',\) is not an \(ID, OOD\) pair"),
    ((('mnist[0-4]', 'mnist[10]'),), r"near_ood_pairs \(OOD\): .*unknown class '10'"),
    ((('digits[1]', 'mnist'),), r'near_ood_pairs \(ID\): .*class splits NAME\[CLASSES\] exist'),
    ((('mnist[0-4]', 'mnist[5-9]'),) * 2, r'config.eval.near_ood_pairs names .* more than once'),
])
def test_near_ood_pairs_are_validated(pairs, message):
  cfg = default_config.get_config()
  cfg.eval.near_ood_pairs = pairs
  with pytest.raises(workdir_lib.WorkdirError, match=message):
    workdir_lib.validate_config(cfg, 'evaluate')


def test_fused_kinds_validate_in_the_config():
  cfg = default_config.get_config()
  cfg.eval.feature_kinds = ('stein', 'stein+diffpath_6d')
  with pytest.raises(workdir_lib.WorkdirError, match="feature_kinds: .*'diffpath_6d' cannot be"):
    workdir_lib.validate_config(cfg, 'evaluate')
  cfg.eval.feature_kinds = ('stein+stein_ddim', 'diffpath_6d')
  workdir_lib.validate_config(cfg, 'evaluate')
