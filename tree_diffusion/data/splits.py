"""How a folder dataset is split into train and test: a seeded per-class split, or, for CUBICC,
the reference's split files.

With ``train_split.npy``, ``test_split.npy`` and ``validation_split.npy`` (the reference's row
indices into its CUBICC arrays) in the root of the class-subfolder dataset, each image must be
named by its row (``<class>/<row>.png``): train is ``train_split``, test is ``test_split`` and
``validation_split`` together, as the reference evaluates. Without them CUBICC, like any folder,
holds out a seeded ``test_fraction`` of each class.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Mapping, Sequence

import numpy as np

from tree_diffusion.data.core import DataError
from tree_diffusion.data.scan import SPLIT_FILES

logger = logging.getLogger(__name__)


def seeded_split(
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


def reference_split(root: str) -> tuple[str, dict[str, np.ndarray]] | None:
  """The reference's CUBICC split, ``(hash, {file: indices})``, when all of ``SPLIT_FILES`` are in
  ``root``; ``None`` when none is.

  Raises:
    DataError: only some of the files are there, or one is not a 1-D integer array.
  """
  present = [f for f in SPLIT_FILES if os.path.isfile(os.path.join(root, f))]
  if not present:
    return None
  if len(present) < len(SPLIT_FILES):
    missing = sorted(set(SPLIT_FILES) - set(present))
    raise DataError(
      f'{root} has {", ".join(present)} but not {", ".join(missing)}: put all three of the '
      f"reference's split files there, or none (a seeded random split)"
    )
  h, out = hashlib.sha256(), {}
  for name in SPLIT_FILES:
    try:
      a = np.load(os.path.join(root, name), allow_pickle=False)
    except (OSError, ValueError) as e:
      raise DataError(f'{os.path.join(root, name)} is not a .npy array ({e})') from None
    if a.ndim != 1 or a.dtype.kind not in 'iu':
      raise DataError(
        f'{os.path.join(root, name)} must hold a 1-D integer array of row indices; got '
        f'{a.dtype} {a.shape}'
      )
    out[name] = a.astype(np.int64)
    h.update(np.ascontiguousarray(out[name]).tobytes() + name.encode())
  return h.hexdigest()[:16], out


def reference_rows(
  files: Sequence[str], split: Mapping[str, np.ndarray], root: str
) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ``files`` for the reference's split: each image is named by its row in the
  reference's arrays (``<class>/<row>.png``); train is ``train_split``, test ``test_split`` and
  ``validation_split`` together, as the reference evaluates. Images in no split are left out."""
  rows = {}
  for i, rel in enumerate(files):
    stem = os.path.splitext(os.path.basename(rel))[0]
    if not stem.isdigit():
      raise DataError(
        f"with the reference's split files, each image is named by its row in the reference's "
        f'arrays (<class>/<row>.png); {os.path.join(root, rel)} is not'
      )
    if int(stem) in rows:
      raise DataError(f'two images are row {int(stem)} of the reference split in {root}')
    rows[int(stem)] = i

  def select(name: str) -> list[int]:
    missing = [int(r) for r in split[name] if int(r) not in rows]
    if missing:
      raise DataError(
        f'{len(missing)} rows of {name} have no image in {root} (e.g. row {missing[0]}); '
        f"export every image of the reference's arrays as <class>/<row>.png"
      )
    return [rows[int(r)] for r in split[name]]

  train = np.asarray(sorted(select('train_split.npy')), np.int64)
  test = np.asarray(sorted(select('test_split.npy') + select('validation_split.npy')), np.int64)
  unused = len(files) - len(set(train.tolist()) | set(test.tolist()))
  if unused:
    logger.warning('%d images of %s are in none of the split files; left out', unused, root)
  return train, test
