"""Which image went where: one row per image with its leaf, as ``WORKDIR/assignments.csv``.

Columns (:data:`COLUMNS`): the split and the row's index in it, the image's file relative to its
folder (folder datasets; empty otherwise), its label (empty when the dataset has none), the most
probable leaf's node id and probability, the root-to-leaf node path (``0/1/4``), and the second
most probable leaf with its probability (empty for a one-leaf tree). Probabilities are the
q-routers' products (:meth:`TreeVAE.leaf_probabilities`), written with 6 significant digits.
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Mapping

import numpy as np

from tree_diffusion import files
from tree_diffusion.data import Arrays
from tree_diffusion.tree import Tree

COLUMNS = (
  "split",
  "index",
  "file",
  "label",
  "leaf",
  "leaf_probability",
  "path",
  "second_leaf",
  "second_probability",
)


def probability_rows(tree: Tree, probs: np.ndarray) -> Iterable[dict]:
  """Per row of ``probs`` (``[N, K]`` in ``tree.leaves`` order): its ``index`` and the leaf columns
  (``leaf``, ``leaf_probability``, ``path``, ``second_leaf``, ``second_probability``)."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] != tree.num_leaves:
    raise ValueError(
      f"probs must be [N, {tree.num_leaves}] (one column per leaf of {tree}); got {probs.shape}"
    )
  order = np.argsort(-probs, axis=1, kind="stable")
  leaves = np.asarray(tree.leaves)
  for i in range(len(probs)):
    first = order[i, 0]
    second = order[i, 1] if tree.num_leaves > 1 else None
    yield {
      "index": i,
      "leaf": int(leaves[first]),
      "leaf_probability": f"{probs[i, first]:.6g}",
      "path": "/".join(str(n) for n in tree.path(int(leaves[first]))),
      "second_leaf": "" if second is None else int(leaves[second]),
      "second_probability": "" if second is None else f"{probs[i, second]:.6g}",
    }


def rows(tree: Tree, split: str, arrays: Arrays, probs: np.ndarray) -> Iterable[dict]:
  """The rows of one split: ``probs`` is ``[N, K]`` in ``tree.leaves`` order for ``arrays``."""
  if np.shape(probs) != (len(arrays), tree.num_leaves):
    raise ValueError(
      f"probs must be [{len(arrays)}, {tree.num_leaves}] (one row per image, one "
      f"column per leaf of {tree}); got {np.shape(probs)}"
    )
  labelled = arrays.num_classes > 0
  for row in probability_rows(tree, probs):
    i = row["index"]
    yield {
      "split": split,
      "index": i,
      "file": arrays.files[i] if arrays.files else "",
      "label": int(arrays.labels[i]) if labelled else "",
      **row,
    }


def to_csv(tree: Tree, splits: Mapping[str, tuple[Arrays, np.ndarray]]) -> str:
  """The CSV text (header and one row per image) of ``{split: (arrays, probs)}``."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  for split, (arrays, probs) in splits.items():
    writer.writerows(rows(tree, split, arrays, probs))
  return buf.getvalue()


def write(path: str, tree: Tree, splits: Mapping[str, tuple[Arrays, np.ndarray]]) -> None:
  """Writes :func:`to_csv` to ``path`` atomically (UTF-8; local or ``gs://``)."""
  files.write_text(path, to_csv(tree, splits))
