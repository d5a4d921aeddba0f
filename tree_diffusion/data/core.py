"""The data layer's core: ``Arrays`` (a whole split in host memory), the ``Source`` each dataset
module declares, the config helpers they share, and the seeded batching every stage uses.

Every dataset is loaded whole into host memory as ``Arrays`` (uint8 NHWC images, int32 labels) and
batched by ``batches``, whose shuffling is a permutation that depends only on ``(seed, epoch)``, so
a run can be reproduced and resumed exactly.

Resize rule (``data.resize=True``, used when an image is not ``image_size`` x ``image_size``):
center-crop to a square on the shorter side, then resize with PIL's bilinear filter, which is
antialiased when downsampling (it widens its support by the scale factor, as torchvision's default
``Resize`` does).

User-facing problems raise ``DataError`` with a one-line message that names the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image

from tree_diffusion import image_files

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset name, as a dataset module declares it (its ``SOURCES``).

  Attributes:
    name: the ``config.data.name`` that selects it.
    load: ``(data_config, split) -> Arrays``.
    prepare: ``(data_config) -> directory or None``: what can be done ahead of training (tfds
      download and preparation, a folder's conversion); None when there is nothing to prepare.
    native_shape: ``(image_size, channels)`` of the images as stored, when the dataset has one.
    sizes: ``(train, test)`` image counts of its standard split, when fixed (end-to-end estimates).
    paper_name: its name in the paper's tables, when the paper reports it.
    reads_folder: whether its images come from ``config.data.folder``.
    channels: ``(data_config) -> (channels, notice or None)`` for ``data.channels=0`` when there
      is no native shape (a folder looks at its files).
  """

  name: str
  load: Callable[[Any, str], 'Arrays']
  prepare: Callable[[Any], str | None]
  native_shape: tuple[int, int] | None = None
  sizes: tuple[int, int] | None = None
  paper_name: str | None = None
  reads_folder: bool = False
  channels: Callable[[Any], tuple[int, str | None]] | None = None


class DataError(ValueError):
  """A problem with the data or the data config; the one-line message names the fix."""


class DatasetNotPreparedError(DataError):
  """A TFDS dataset is not prepared in the data dir (nothing is ever downloaded implicitly)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Arrays:
  """One whole split in host memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N]; -1 when the dataset has no labels.
    num_classes: number of classes; 0 when unlabelled.
    class_names: name of each class (index = label); empty when unlabelled or unknown.
    files: each image's file, relative to the folder it was read from (folder datasets); empty
      for the other datasets.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] = ()
  files: tuple[str, ...] = ()

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(
        f'images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}'
      )
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(
        f'labels must be int32 [{self.images.shape[0]}], got {self.labels.dtype} '
        f'{self.labels.shape}'
      )
    if self.files and len(self.files) != len(self.labels):
      raise ValueError(
        f'files must name each of the {len(self.labels)} images, got {len(self.files)}'
      )

  def __len__(self) -> int:
    return int(self.images.shape[0])


def get(data_config: Any, field: str, default: Any) -> Any:
  """Reads an optional config field (older configs may lack the newer ones)."""
  value = data_config.get(field, default) if hasattr(data_config, 'get') else default
  return default if value is None else value


def resolve_data_dir(data_config: Any) -> str:
  """The data dir; '' means $TFDS_DATA_DIR or ~/tensorflow_datasets, as in tfds."""
  data_dir = str(get(data_config, 'data_dir', ''))
  if not data_dir:
    data_dir = os.environ.get('TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets')
  if '://' in data_dir:  # a remote (e.g. gs://) dir is passed to tfds as it is
    return data_dir
  return os.path.abspath(os.path.expanduser(data_dir))


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use 'train' or 'test'")


def size_and_channels(data_config: Any) -> tuple[int, int]:
  """The configured (image_size, channels), validated."""
  size, channels = get(data_config, 'image_size', 0), get(data_config, 'channels', 0)
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise DataError(
      f'data.image_size must be a positive int, got {size!r}; set '
      '--config.data.image_size=28 (or 32, 64)'
    )
  if channels not in (1, 3):
    raise DataError(
      f'data.channels must be 1 or 3, got {channels!r}; set '
      '--config.data.channels=1 (grey) or 3 (RGB) (0, "from the images", is '
      'resolved by the launchers; in code, set it from data.detect_channels)'
    )
  return int(size), int(channels)


def _to_pil(array: np.ndarray) -> Image.Image:
  return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _resize_array(array: np.ndarray, size: int) -> np.ndarray:
  """Applies the resize rule to one uint8 HWC array."""
  return image_files.from_pil(image_files.center_crop_resize(_to_pil(array), size))


def maybe_resize_all(images: np.ndarray, data_config: Any) -> np.ndarray:
  """Resizes a whole split when ``data.resize`` is set and the size differs from ``image_size``."""
  if not get(data_config, 'resize', False):
    return images
  size, _ = size_and_channels(data_config)
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((images.shape[0], size, size, images.shape[3]), np.uint8)
  for i, image in enumerate(images):
    out[i] = _resize_array(image, size)
  return out


def check_image_shape(arrays: Arrays, data_config: Any) -> None:
  """Checks that the images are ``image_size`` x ``image_size`` x ``channels``.

  Args:
    arrays: a loaded split.
    data_config: the ``config.data`` ConfigDict.

  Raises:
    DataError: the shapes differ (the message names both and the fix).
  """
  size, channels = size_and_channels(data_config)
  height, width, got_channels = arrays.images.shape[1:]
  if (height, width, got_channels) == (size, size, channels):
    return
  fixes = []
  if height == width:
    fixes.append(f'--config.data.image_size={height}')
  if got_channels != channels:
    fixes.append(f'--config.data.channels={got_channels}')
  fix = ' '.join(fixes) if fixes else ''
  if (height, width) != (size, size):
    fix = f'{fix} (or --config.data.resize=True)' if fix else '--config.data.resize=True'
  raise DataError(
    f'images are {height}x{width}x{got_channels} but the config expects '
    f'{size}x{size}x{channels}; set {fix}'
  )


def identity(train: Arrays, test: Arrays) -> dict[str, Any]:
  """What a run was trained on: the size of each split and a hash of both, recorded in every
  checkpoint and export, so that a dataset that changed under a run (images added, removed or
  edited, another split) is refused instead of silently used.

  Args:
    train: the loaded 'train' split.
    test: the loaded 'test' split.

  Returns:
    ``{"train": N, "test": M, "classes": C, "hash": hex}``; the hash covers the images, labels and
    row order of both splits (so also which images are held out for 'test').
  """
  for name, arrays in (('train', train), ('test', test)):
    if not isinstance(arrays, Arrays):
      raise TypeError(
        f'{name} must be a data.Arrays (data.load_arrays(config.data, {name!r})); '
        f'got {type(arrays).__name__}'
      )
  h = hashlib.blake2b(digest_size=16)
  for arrays in (train, test):
    images = np.ascontiguousarray(arrays.images)
    h.update(np.asarray(images.shape, np.int64).tobytes())
    h.update(memoryview(images).cast('B'))
    h.update(np.ascontiguousarray(arrays.labels, np.int32).tobytes())
  return {
    'train': len(train),
    'test': len(test),
    'classes': int(train.num_classes),
    'hash': h.hexdigest(),
  }


def identity_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
  """``None`` if ``saved`` and ``now`` (both from :func:`identity`) are the same dataset, else
  what changed, for a message: ``"train 4000 -> 3990 images, test 1000 -> 998"`` or ``"same
  counts (4000 train, 1000 test), other contents"``."""
  for name, ident in (('saved', saved), ('now', now)):
    if not isinstance(ident, Mapping) or 'hash' not in ident:
      raise TypeError(
        f'{name} must be a dataset identity, the dict data.identity returns '
        f'({{"train", "test", "classes", "hash"}}); got {ident!r:.80}'
      )
  if saved.get('hash') == now.get('hash'):
    return None
  counts = [
    f'{s} {saved.get(s)} -> {now.get(s)} images' for s in SPLITS if saved.get(s) != now.get(s)
  ]
  if saved.get('classes') != now.get('classes'):
    counts.append(f"classes {saved.get('classes')} -> {now.get('classes')}")
  if counts:
    return ', '.join(counts)
  return (
    f"same counts ({now.get('train')} train, {now.get('test')} test), other contents "
    'or another train/test split'
  )


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches ``batches`` yields for ``n`` rows.

  Args:
    n: number of rows.
    batch_size: rows per batch.
    drop_remainder: whether an incomplete last batch is dropped.

  Returns:
    The number of batches in one epoch.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
  arrays: Arrays,
  batch_size: int,
  *,
  shuffle: bool,
  seed: int = 0,
  epoch: int = 0,
  drop_remainder: bool,
  indices: np.ndarray | None = None,
  pad: bool = False,
  part: slice | None = None,
  skip: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over one epoch of batches.

  The order is ``np.random.default_rng([seed, epoch]).permutation`` of the rows when shuffling
  (and the row order otherwise), so it depends only on ``(seed, epoch)`` and an interrupted run can
  resume at any batch of any epoch.

  Args:
    arrays: the split to batch.
    batch_size: rows per batch.
    shuffle: whether to permute the rows.
    seed: shuffling seed (>= 0).
    epoch: epoch number (>= 0), mixed into the permutation.
    drop_remainder: drop the last batch if it is incomplete.
    indices: optional 1-D int array of row ids; only these rows are used (in this order when not
      shuffling).
    pad: with ``drop_remainder=False``, pad the last batch to ``batch_size`` with zeros; every
      batch then carries a ``mask``.
    part: only these rows of every batch are read and returned (this process's block of a global
      batch, ``sharding.process_rows``); the order of the epoch is unchanged.
    skip: start at this batch of the epoch (resuming); skipped batches are not read.

  Returns:
    An iterator of dicts: ``image`` float32 [B,H,W,C] in [0,1] (= uint8 / 255), ``label`` int32
    [B], ``index`` int64 [B] (row ids, -1 for padding) and, when ``pad``, ``mask`` bool [B] (True
    for real rows).
  """
  if not isinstance(arrays, Arrays):
    raise TypeError(
      f'arrays must be a data.Arrays (data.load_arrays(config.data, split)); got '
      f'{type(arrays).__name__}'
    )
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
    raise TypeError(f'batch_size must be an integer >= 1, got {batch_size!r}')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be an integer >= 1, got {batch_size}')
  if pad and drop_remainder:
    raise ValueError('pad=True needs drop_remainder=False (there is nothing left to pad)')
  if pad and part is not None:
    raise ValueError('pad=True cannot be combined with part (pad the global batch instead)')
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed and epoch must be >= 0, got seed={seed}, epoch={epoch}')
  n = len(arrays)
  if indices is None:
    rows = np.arange(n, dtype=np.int64)
  else:
    rows = np.asarray(indices)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
      raise ValueError(f'indices must be a 1-D int array, got {rows.dtype} {rows.shape}')
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
      raise ValueError(f'indices must be in [0, {n}), got [{rows.min()}, {rows.max()}]')
  if shuffle:
    rows = rows[np.random.default_rng([seed, epoch]).permutation(rows.size)]
  # Validated eagerly above; the generator below does the lazy part.
  return _iterate(arrays, rows, batch_size, drop_remainder, pad, part, skip)


def _iterate(
  arrays: Arrays,
  rows: np.ndarray,
  batch_size: int,
  drop_remainder: bool,
  pad: bool,
  part: slice | None,
  skip: int,
) -> Iterator[dict[str, np.ndarray]]:
  for start in range(
    skip * batch_size, num_batches(rows.size, batch_size, drop_remainder) * batch_size, batch_size
  ):
    index = rows[start : start + batch_size]
    if part is not None:
      index = index[part]
    # Division (not multiplication by 1/255) keeps image exactly equal to uint8 / 255 in float32.
    image = arrays.images[index].astype(np.float32) / np.float32(255.0)
    batch = {'image': image, 'label': arrays.labels[index], 'index': index}
    if pad:
      real = index.size
      missing = batch_size - real
      if missing:
        batch = {
          'image': np.concatenate([image, np.zeros((missing,) + image.shape[1:], np.float32)]),
          'label': np.concatenate([batch['label'], np.zeros((missing,), np.int32)]),
          'index': np.concatenate([index, np.full((missing,), -1, np.int64)]),
        }
      batch['mask'] = np.arange(batch_size) < real
    yield batch
