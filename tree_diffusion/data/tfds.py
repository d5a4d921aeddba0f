"""``mnist``, ``fashion_mnist``, ``cifar10``, ``celeb_a``: TFDS datasets read through
``tfds.data_source`` (array_record, no TensorFlow needed to read).

They are never downloaded implicitly: if one is not prepared, ``DatasetNotPreparedError`` says
which command prepares it (``python -m launch.prepare_data``, which needs the network and
TensorFlow). CelebA is cropped to 148x148 at (top 40, left 15) and resized to ``image_size`` (64
in the reference), like the reference pipeline; all its labels are 0 (one class).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from tree_diffusion import image_files
from tree_diffusion.data.core import (
  Arrays,
  DataError,
  DatasetNotPreparedError,
  Source,
  get,
  maybe_resize_all,
  resolve_data_dir,
)

logger = logging.getLogger(__name__)

# The reference CelebA crop: a 148x148 box whose top-left corner is at (row 40, column 15).
_CELEB_A_CROP = (40, 15, 148)
_CELEB_A_SIZE = 64

# Records read from a tfds data source per call; large enough to amortise the per-call overhead,
# small enough that the decoded records of one slice stay small next to the output arrays.
_READ_SLICE = 1024

_TENSORFLOW_PIN = 'tensorflow-cpu==2.21.0'


def prepare_command(name: str, data_dir: str) -> str:
  return f'python -m launch.prepare_data --dataset={name} --data_dir={data_dir}'


def open_source(name: str, split: str, data_dir: str):
  """``tfds.data_source(download=False)`` with its failures turned into one-line DataErrors."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, ValueError, FileNotFoundError, KeyError) as e:
    # tfds does not say "not prepared": an absent dataset falls back to the builder's default
    # tfrecord format and fails with NotImplementedError("Random access data source for file
    # format FileFormat.TFRECORD is not supported..."). Ask the builder (a local file check, no
    # network) which case this is.
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
        f'dataset {name!r} is not prepared in {data_dir}; run: '
        f'{prepare_command(name, data_dir)} (needs network and `pip install '
        f'{_TENSORFLOW_PIN}`)'
      ) from None
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
      f'dataset {name!r} in {builder.data_dir} cannot be read as array_record ({reason}); '
      f'reading without TensorFlow needs an array_record preparation: delete that folder and '
      f'run: '
      f'{prepare_command(name, data_dir)}'
    ) from None


def _read_records(source, keys: list[int]) -> Sequence[Mapping[str, Any]]:
  try:
    return source.__getitems__(keys)
  except TypeError:
    # tfds.testing.mock_data (tfds 4.9.10) installs a __getitems__ that cannot be called; reading
    # one record at a time works there (and real sources never get here).
    return [source[k] for k in keys]


def read_source(
  source, transform: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record of a tfds data source into (uint8 NHWC images, int32 labels)."""
  n = len(source)
  images = labels = None
  for start in range(0, n, _READ_SLICE):
    records = _read_records(source, list(range(start, min(start + _READ_SLICE, n))))
    for offset, record in enumerate(records):
      image = np.asarray(record['image'], dtype=np.uint8)
      if transform is not None:
        image = transform(image)
      if images is None:
        # Allocated once the first (transformed) image gives the shape, to avoid stacking copies.
        images = np.empty((n,) + image.shape, np.uint8)
        labels = np.zeros((n,), np.int32)
      images[start + offset] = image
      if 'label' in record:
        labels[start + offset] = int(record['label'])
  if images is None:
    raise DataError('the tfds split is empty; re-prepare it with python -m launch.prepare_data')
  return images, labels


def _celeb_a_transform(size: int) -> Callable[[np.ndarray], np.ndarray]:
  top, left, side = _CELEB_A_CROP

  def transform(image: np.ndarray) -> np.ndarray:
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return image_files.from_pil(crop.resize((size, size), Image.Resampling.BILINEAR))

  return transform


def _load(name: str, data_config: Any, split: str) -> Arrays:
  data_dir = resolve_data_dir(data_config)
  source = open_source(name, split, data_dir)
  if name == 'celeb_a':
    size = int(get(data_config, 'image_size', 0)) or _CELEB_A_SIZE
    images, labels = read_source(source, _celeb_a_transform(size))
    return Arrays(images, labels, 1, ('face',))
  images, labels = read_source(source, None)
  label_feature = source.dataset_info.features['label']
  class_names = tuple(str(c) for c in (getattr(label_feature, 'names', None) or ()))
  return Arrays(
    maybe_resize_all(images, data_config), labels, int(label_feature.num_classes), class_names
  )


def _prepare(name: str, data_config: Any) -> str:
  """Downloads and prepares ``name`` as array_record (needs the network and TensorFlow); returns
  its directory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = resolve_data_dir(data_config)
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      raise DataError(
        f'preparing {name!r} needs TensorFlow (tfds encodes its images with it); '
        f'run: pip install {_TENSORFLOW_PIN}'
      ) from None
    logger.info('preparing %s in %s', name, data_dir)
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # pylint: disable=broad-except
      # tfds surfaces network and checksum failures as many unrelated types; the user needs one
      # line saying that the download failed and what to retry.
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise DataError(
        f'preparing {name!r} failed ({type(e).__name__}: {first_line}); check the '
        f'network and rerun: {prepare_command(name, data_dir)}'
      ) from e
  # Prove the result is readable without TensorFlow (e.g. not an older tfrecord preparation).
  open_source(name, 'train', data_dir)
  return os.fspath(builder.data_dir)


def _source(name: str, native_shape: tuple[int, int], sizes: tuple[int, int], paper_name: str):
  return Source(
    name,
    load=functools.partial(_load, name),
    prepare=functools.partial(_prepare, name),
    native_shape=native_shape,
    sizes=sizes,
    paper_name=paper_name,
  )


SOURCES = (
  _source('mnist', (28, 1), (60_000, 10_000), 'MNIST'),
  _source('fashion_mnist', (28, 1), (60_000, 10_000), 'FashionMNIST'),
  _source('cifar10', (32, 3), (50_000, 10_000), 'CIFAR-10'),
  _source('celeb_a', (_CELEB_A_SIZE, 3), (162_770, 19_962), 'CelebA'),
)
