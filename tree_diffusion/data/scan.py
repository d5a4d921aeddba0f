"""Listing the image files of a folder (``png/jpg/jpeg/bmp/gif/webp/tif/tiff``, hidden entries
ignored), flat or with one subfolder per class.

* Folders are searched recursively and symlinked folders and files are followed. A folder reached a
  second time (a symlink loop, a link back to the dataset or to a class folder, two links to one
  folder) is skipped with a warning naming it, so every image is listed once; broken links and
  non-image files are skipped with a warning.
* Pixels: grey or RGB, wider bit depths scaled and transparency composited as
  ``tree_diffusion.image_files`` describes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

from tree_diffusion.data.core import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
# The reference's CUBICC split files, read from the root of a class-subfolder dataset
# (:mod:`tree_diffusion.data.folder`).
SPLIT_FILES = ('train_split.npy', 'test_split.npy', 'validation_split.npy')


@dataclasses.dataclass(frozen=True)
class FolderScan:
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


def scan_folder(folder: str, require_labels: bool) -> FolderScan:
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
    return FolderScan(root, tuple(files), (-1,) * len(files), ())

  # Class subfolders: files directly in the root cannot be labelled, so they are left out (with a
  # warning) rather than failing the whole dataset.
  for name in top_files:
    if name in SPLIT_FILES:
      continue
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
  return FolderScan(root, tuple(files), tuple(labels), tuple(name for name, _ in per_class))


def image_sizes(root: str, files: Sequence[str]) -> dict[tuple[int, int], list[str]]:
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


def is_grey(image: Image.Image) -> bool:
  """Whether an opened (not decoded) image is grey: a grey mode, or a palette of greys."""
  if image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F'):
    return True
  if image.mode in ('P', 'PA'):
    palette = np.asarray(image.getpalette() or [], np.int32).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())
  return False
