"""``folder`` and ``cubicc``: a folder of images as a dataset.

``folder`` is any folder of images, either flat (unlabelled, labels -1) or with one subfolder per
class (labels are the sorted subfolder names numbered 0..C-1). It is converted once into a local
TFDS dataset (plain ``Tensor`` features, array_record, so neither writing nor reading needs
TensorFlow) under ``<data_dir>/local_images/<folder-name>_<hash>/<version>/`` and reused while the
folder's files and the relevant config fields stay the same (processes preparing the same build at
once take turns on a lock file next to it). The 'test' split is a seeded, per-class (stratified)
random ``test_fraction`` of the images; ``test_fraction=0`` makes 'test' a copy of 'train'.

``cubicc`` is like ``folder`` but a class subfolder layout is required. CUBICC must first be
exported to such a folder (``<folder>/<class name>/<image>.png``).

Which files are read is :mod:`tree_diffusion.data.scan`'s business; without ``data.resize`` a
folder image of the wrong size is an error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

from tree_diffusion import image_files
from tree_diffusion.data.core import (
  Arrays,
  DataError,
  Source,
  get,
  resolve_data_dir,
  size_and_channels,
)
from tree_diffusion.data import splits as split_lib
from tree_diffusion.data.scan import SPLIT_FILES, FolderScan, image_sizes, is_grey, scan_folder
from tree_diffusion.data.tfds import read_source
from tree_diffusion.runs import format_eta

try:
  import fcntl
except ImportError:  # Windows: folder builds are then not locked against each other
  fcntl = None

logger = logging.getLogger(__name__)

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


def _folder_settings(data_config: Any) -> dict[str, Any]:
  """The config fields that determine a folder dataset's content."""
  size, channels = size_and_channels(data_config)
  test_fraction = float(get(data_config, 'test_fraction', 0.1))
  if not 0.0 <= test_fraction < 1.0:
    raise DataError(
      f'data.test_fraction must be in [0, 1), got {test_fraction}; set '
      '--config.data.test_fraction=0.1'
    )
  seed = int(get(data_config, 'seed', 0))
  if seed < 0:
    raise DataError(f'data.seed must be >= 0, got {seed}; set --config.data.seed=0')
  return dict(
    image_size=size,
    channels=channels,
    resize=bool(get(data_config, 'resize', False)),
    test_fraction=test_fraction,
    seed=seed,
  )


def _local_config_name(scan: FolderScan, settings: Mapping[str, Any], require_labels: bool) -> str:
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


def _size_error(e: image_files.ImageSizeError, scan: FolderScan, size: int) -> DataError:
  """The error for an image of the wrong size: the sizes with their counts when they are mixed,
  else the one image's size."""
  sizes = image_sizes(scan.root, scan.files)
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
  scan: FolderScan,
  settings: Mapping[str, Any],
  data_dir: str,
  config_name: str,
  version_dir: str,
  reference_split: Mapping[str, np.ndarray] | None = None,
) -> str:
  """Decodes a folder's images and writes its local tfds dataset; returns the version dir.
  ``reference_split``: the reference's CUBICC split files (``splits.reference_split``), else the
  seeded split."""
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
  kept_files = [scan.files[i] for i in keep]
  if reference_split is not None:
    train, test = split_lib.reference_rows(kept_files, reference_split, scan.root)
  else:
    train, test = split_lib.seeded_split(
      labels, settings['test_fraction'], settings['seed'], scan.root
    )
  splits = {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}
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


def detect_channels(data_config: Any) -> tuple[int, str | None]:
  """The channels for ``data.channels=0`` ("from the images"): 1 when every image of the folder
  is grey (a grey mode or palette, read from the file headers), 3 otherwise.

  Returns:
    ``(channels, notice)``: ``notice`` says what was done with a folder that mixes grey and
    colour images (``None`` otherwise).
  """
  name = str(get(data_config, 'name', ''))
  scan = scan_folder(str(get(data_config, 'folder', '')), require_labels=(name == 'cubicc'))
  grey = colour = 0
  for rel in scan.files:
    try:
      with Image.open(os.path.join(scan.root, rel)) as image:
        if is_grey(image):
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
  scan = scan_folder(str(get(data_config, 'folder', '')), require_labels)
  split = split_lib.reference_split(scan.root) if require_labels else None  # cubicc only
  if require_labels:
    if split is None:
      logger.warning(
        'no %s in %s: CUBICC is split at random instead of as in the reference (a seeded '
        '%g of each class held out; put the reference\'s split files there to use its split)',
        '/'.join(SPLIT_FILES),
        scan.root,
        settings['test_fraction'],
      )
    else:
      settings = dict(settings, reference_split=split[0])
  config_name = _local_config_name(scan, settings, require_labels)
  data_dir = resolve_data_dir(data_config)
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
    return _convert_folder(
      scan, settings, data_dir, config_name, version_dir, split[1] if split else None
    )


def _load_folder(data_config: Any, split: str, require_labels: bool) -> Arrays:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  version_dir = _local_dataset_dir(data_config, require_labels)
  source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
  images, labels = read_source(source, None)
  class_names_path = os.path.join(version_dir, CLASS_NAMES_FILE)
  class_names = ()
  if os.path.exists(class_names_path):
    with open(class_names_path) as f:
      class_names = tuple(json.load(f))
  with open(os.path.join(version_dir, FILES_FILE)) as f:
    split_files = tuple(json.load(f)[split])
  return Arrays(images, labels, len(class_names), class_names, split_files)


SOURCES = (
  Source(
    'cubicc',
    load=lambda data_config, split: _load_folder(data_config, split, require_labels=True),
    prepare=lambda data_config: _local_dataset_dir(data_config, require_labels=True),
    paper_name='CUBICC',
    reads_folder=True,
    channels=detect_channels,
  ),
  Source(
    'folder',
    load=lambda data_config, split: _load_folder(data_config, split, require_labels=False),
    prepare=lambda data_config: _local_dataset_dir(data_config, require_labels=False),
    reads_folder=True,
    channels=detect_channels,
  ),
)
