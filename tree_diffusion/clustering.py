"""Host-side clustering metrics for TreeVAE / TreeDiffusion evaluations.

Everything here is plain NumPy/SciPy (sklearn only for the adjusted Rand index) and runs on the
host after the model has produced per-sample leaf assignments, so none of it needs jax.

Conventions shared by all functions:

* ``labels`` are ground-truth classes, ``preds`` / ``leaves`` are cluster indices. Cluster indices
  of a tree are positions in :attr:`tree_diffusion.tree.Tree.leaves` (``0 … K-1``), not heap ids.
* Metrics are computed in float64 and returned as Python floats so they serialise to JSON.
* Mismatched lengths, non-integer values where integers are needed and out-of-range indices raise
  ``ValueError`` rather than silently producing a wrong number.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize

from tree_diffusion.tree import Tree


# ------------------------------------------------------------------------------------- validation


def _as_vector(x: Any, name: str) -> np.ndarray:
  """Converts ``x`` to a 1-D array, complaining about any other rank."""
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
  return arr


def _as_int_vector(x: Any, name: str) -> np.ndarray:
  """Converts ``x`` to a 1-D int64 array.

  Integer-valued floats are accepted because labels often come back from jax as float arrays;
  anything with a fractional part is rejected since truncating it would silently relabel samples.
  """
  arr = _as_vector(x, name)
  if arr.dtype.kind == "b":
    return arr.astype(np.int64)
  if arr.dtype.kind == "f":
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
      raise ValueError(f"{name} must hold integers; got non-integer values")
    return arr.astype(np.int64)
  if arr.dtype.kind not in "iu":
    raise ValueError(f"{name} must hold integers; got dtype {arr.dtype}")
  return arr.astype(np.int64)


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str):
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"{name_a} and {name_b} differ in length: {a.shape[0]} vs {b.shape[0]}")


def _check_range(x: np.ndarray, upper: int | None, name: str):
  """Checks ``0 <= x`` (and ``x < upper`` when ``upper`` is given)."""
  if x.size == 0:
    return
  if x.min() < 0:
    raise ValueError(f"{name} must be non-negative; got minimum {x.min()}")
  if upper is not None and x.max() >= upper:
    raise ValueError(
      f"{name} out of range: maximum {x.max()} but only {upper} allowed (0 … {upper - 1})"
    )


# ------------------------------------------------------------------------------------- counting


def leaf_counts(leaves: Any, num_leaves: int) -> np.ndarray:
  """Number of samples assigned to each leaf.

  Args:
    leaves: per-sample leaf indices in ``0 … num_leaves-1``, shape ``[N]``.
    num_leaves: number of leaves ``K`` (empty leaves still get a zero entry).

  Returns:
    int64 array of shape ``[K]``.
  """
  leaves = _as_int_vector(leaves, "leaves")
  _check_range(leaves, num_leaves, "leaves")
  return np.bincount(leaves, minlength=num_leaves).astype(np.int64)


def label_histograms(labels: Any, leaves: Any, num_leaves: int, num_classes: int) -> np.ndarray:
  """Per-leaf class histograms.

  Args:
    labels: per-sample classes in ``0 … num_classes-1``, shape ``[N]``.
    leaves: per-sample leaf indices in ``0 … num_leaves-1``, shape ``[N]``.
    num_leaves: number of leaves ``K``.
    num_classes: number of classes ``C``.

  Returns:
    int64 array of shape ``[K, C]``; entry ``[k, c]`` counts samples of class ``c`` in leaf ``k``.
  """
  labels = _as_int_vector(labels, "labels")
  leaves = _as_int_vector(leaves, "leaves")
  _check_same_length(labels, leaves, "labels", "leaves")
  _check_range(labels, num_classes, "labels")
  _check_range(leaves, num_leaves, "leaves")
  # A flat bincount over (leaf, class) pairs is a vectorised 2-D histogram.
  flat = np.bincount(leaves * num_classes + labels, minlength=num_leaves * num_classes)
  return flat.reshape(num_leaves, num_classes).astype(np.int64)


# ------------------------------------------------------------------------------------- flat metrics


def _entropy_from_counts(counts: np.ndarray) -> float:
  """Natural-log entropy of the distribution proportional to ``counts`` (zeros ignored)."""
  counts = counts[counts > 0].astype(np.float64)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))


def nmi(labels: Any, preds: Any) -> float:
  """Normalised mutual information with the arithmetic-mean normaliser.

  ``NMI = I(Y; Ŷ) / ((H(Y) + H(Ŷ)) / 2)`` in nats, computed from the contingency table. This is the
  definition of sklearn's ``normalized_mutual_info_score`` with its default ``average_method``,
  including its limit cases: both labellings constant (or empty) give 1.0, and zero mutual
  information otherwise gives 0.0. Label values may be arbitrary (they are only compared).

  Args:
    labels: ground-truth labels, shape ``[N]``.
    preds: cluster assignments, shape ``[N]``.

  Returns:
    The NMI in ``[0, 1]``.
  """
  labels = _as_vector(labels, "labels")
  preds = _as_vector(preds, "preds")
  _check_same_length(labels, preds, "labels", "preds")
  classes, y = np.unique(labels, return_inverse=True)
  clusters, k = np.unique(preds, return_inverse=True)
  # Neither labelling splits the data: a trivially perfect match.
  if classes.size == clusters.size == 1 or classes.size == clusters.size == 0:
    return 1.0
  # One constant labelling has zero entropy, hence zero MI, while the other does not.
  if classes.size == 1 or clusters.size == 1:
    return 0.0

  contingency = np.zeros((classes.size, clusters.size), dtype=np.float64)
  np.add.at(contingency, (y, k), 1.0)
  n = contingency.sum()
  row = contingency.sum(axis=1)
  col = contingency.sum(axis=0)
  nz_r, nz_c = np.nonzero(contingency)
  n_rc = contingency[nz_r, nz_c]
  # MI = sum_rc p_rc log(p_rc / (p_r p_c)) with p = count / n, i.e. log(n * n_rc / (n_r * n_c)).
  mi = np.sum((n_rc / n) * (np.log(n_rc) + np.log(n) - np.log(row[nz_r]) - np.log(col[nz_c])))
  # Rounding can make independent labellings come out a hair below zero.
  mi = max(float(mi), 0.0)
  if mi == 0.0:
    return 0.0
  normaliser = 0.5 * (_entropy_from_counts(row) + _entropy_from_counts(col))
  return float(mi / normaliser)


def _labels_and_groups(labels: Any, groups: Any, name: str, metric: str):
  """``labels`` and ``groups`` (clusters or leaves, called ``name``) as non-negative integer
  vectors of one non-zero length, for ``metric``."""
  labels = _as_int_vector(labels, "labels")
  groups = _as_int_vector(groups, name)
  _check_same_length(labels, groups, "labels", name)
  if labels.size == 0:
    raise ValueError(f"{metric} needs at least one sample")
  _check_range(labels, None, "labels")
  _check_range(groups, None, name)
  return labels, groups


def accuracy(labels: Any, preds: Any) -> float:
  """Clustering accuracy under the best one-to-one cluster→class matching (Hungarian).

  As in the reference: a square count matrix of size ``max(max_pred, max_true) + 1`` with
  ``w[pred, true]`` counts, solved by ``linear_sum_assignment(w.max() - w)``. When there are more
  clusters than classes the surplus clusters are matched to empty classes, so their samples count
  as errors.

  Args:
    labels: non-negative integer classes, shape ``[N]``.
    preds: non-negative integer cluster indices, shape ``[N]``.

  Returns:
    Matched count divided by ``N``.
  """
  labels, preds = _labels_and_groups(labels, preds, "preds", "accuracy")
  d = int(max(preds.max(), labels.max())) + 1
  w = np.zeros((d, d), dtype=np.int64)
  np.add.at(w, (preds, labels), 1)
  # linear_sum_assignment minimises cost; w.max() - w turns "most matches" into "least cost".
  rows, cols = scipy.optimize.linear_sum_assignment(w.max() - w)
  return float(w[rows, cols].sum() / labels.size)


def adjusted_rand(labels: Any, preds: Any) -> float:
  """Adjusted Rand index (sklearn's ``adjusted_rand_score``).

  Args:
    labels: ground-truth labels, shape ``[N]``.
    preds: cluster assignments, shape ``[N]``.

  Returns:
    The ARI (1.0 for identical partitions, about 0 for random ones).
  """
  labels = _as_vector(labels, "labels")
  preds = _as_vector(preds, "preds")
  _check_same_length(labels, preds, "labels", "preds")
  import sklearn.metrics  # pylint: disable=g-import-not-at-top  (1.7 s; only needed here)

  return float(sklearn.metrics.adjusted_rand_score(labels, preds))


def leaf_purity(labels: Any, leaves: Any) -> float:
  """Size-weighted mean over leaves of each leaf's majority-class fraction.

  Equivalently the fraction of samples whose class is the majority class of their leaf. Empty
  leaves have weight 0 and so do not matter.

  Args:
    labels: non-negative integer classes, shape ``[N]``.
    leaves: non-negative integer leaf indices, shape ``[N]``.

  Returns:
    The purity in ``(0, 1]``.
  """
  labels, leaves = _labels_and_groups(labels, leaves, "leaves", "leaf_purity")
  hist = label_histograms(labels, leaves, int(leaves.max()) + 1, int(labels.max()) + 1)
  # sum_k n_k * (max_c n_kc / n_k) / N: the leaf sizes cancel.
  return float(hist.max(axis=1).sum() / labels.size)


# ------------------------------------------------------------------------------------- tree metrics


def dendrogram_purity(tree: Tree, labels: Any, leaves: Any) -> float:
  """Dendrogram purity of hard leaf assignments on ``tree``.

  Every pair of samples with the same class ``c`` is credited to its lowest common ancestor ``v``
  (a leaf when both samples sit in the same leaf) with the class-``c`` fraction among all samples
  under ``v``; DP is the mean credit over all same-class pairs. Passthrough nodes are transparent:
  their sample set is that of their only child, so no pair has them as its lowest common ancestor.

  Computed bottom-up in ``O(num_nodes * C)``: at a leaf, class ``c`` has ``C(n_c, 2)`` pairs; at an
  internal node with children ``A`` and ``B`` it has ``n_Ac * n_Bc`` new pairs.

  Args:
    tree: the tree topology.
    labels: non-negative integer classes, shape ``[N]``.
    leaves: per-sample positions in ``tree.leaves`` (``0 … K-1``), shape ``[N]``.

  Returns:
    The purity in ``(0, 1]``. When there is no same-class pair (e.g. every class has at most one
    sample, or no samples at all) it is defined as 1.0, since nothing can be impure.
  """
  labels = _as_int_vector(labels, "labels")
  leaves = _as_int_vector(leaves, "leaves")
  _check_same_length(labels, leaves, "labels", "leaves")
  _check_range(labels, None, "labels")
  _check_range(leaves, tree.num_leaves, "leaves")
  num_classes = int(labels.max()) + 1 if labels.size else 1
  hist = label_histograms(labels, leaves, tree.num_leaves, num_classes).astype(np.float64)

  class_sizes = hist.sum(axis=0)
  total_pairs = float(np.sum(class_sizes * (class_sizes - 1) / 2))
  if total_pairs == 0:
    return 1.0

  counts: dict[int, np.ndarray] = {}
  credit = 0.0
  # Children have larger heap ids than their parents, so descending ids visit children first.
  for node in reversed(tree.nodes):
    children = tree.children(node)
    if not children:
      c = hist[tree.leaf_index(node)]
      n = c.sum()
      if n > 0:
        credit += float(np.sum(c * (c - 1) / 2 * (c / n)))
    elif len(children) == 1:
      # Passthrough: same samples as the child, whose pairs are already credited there.
      c = counts[children[0]]
    else:
      a, b = counts[children[0]], counts[children[1]]
      c = a + b
      n = c.sum()
      # A pair's LCA is this node only if one sample comes from each side; n > 0 whenever any
      # such pair exists, so the guard only skips nodes that contribute nothing anyway.
      if n > 0:
        credit += float(np.sum(a * b * (c / n)))
    counts[node] = c
  return float(credit / total_pairs)


def summary(tree: Tree, labels: Any | None, leaf_probs: Any) -> dict[str, Any]:
  """JSON-serialisable clustering report for one evaluation.

  Samples are assigned to their most probable leaf. Labels ``< 0`` mark unlabelled samples: label
  metrics are computed on the labelled samples only, and if no sample is labelled (or ``labels``
  is ``None``) only the label-free entries are reported. ``leaf_counts`` always covers all samples.

  Args:
    tree: the tree whose leaves index the columns of ``leaf_probs``.
    labels: integer classes, shape ``[N]``, or ``None`` when the data has no labels.
    leaf_probs: leaf probabilities, shape ``[N, K]`` with columns in ``tree.leaves`` order.

  Returns:
    A dict with ``num_leaves`` and ``leaf_counts`` (list of ints), plus, when labels are present,
    ``nmi``, ``accuracy``, ``ari``, ``leaf_purity``, ``dendrogram_purity`` (floats) and
    ``label_histograms`` (``K`` lists of ``C`` ints).
  """
  leaf_probs = np.asarray(leaf_probs)
  if leaf_probs.ndim != 2 or leaf_probs.shape[1] != tree.num_leaves:
    raise ValueError(
      f"leaf_probs must have shape [N, {tree.num_leaves}] (one column per leaf of {tree}); "
      f"got {leaf_probs.shape}"
    )
  assigned = np.argmax(leaf_probs, axis=1).astype(np.int64)
  out: dict[str, Any] = {
    "num_leaves": int(tree.num_leaves),
    "leaf_counts": [int(v) for v in leaf_counts(assigned, tree.num_leaves)],
  }
  if labels is None:
    return out
  labels = _as_int_vector(labels, "labels")
  _check_same_length(labels, assigned, "labels", "leaf_probs")
  labelled = labels >= 0
  if not np.any(labelled):
    return out

  y, k = labels[labelled], assigned[labelled]
  num_classes = int(y.max()) + 1
  out.update(
    nmi=nmi(y, k),
    accuracy=accuracy(y, k),
    ari=adjusted_rand(y, k),
    leaf_purity=leaf_purity(y, k),
    dendrogram_purity=dendrogram_purity(tree, y, k),
    label_histograms=label_histograms(y, k, tree.num_leaves, num_classes).tolist(),
  )
  return out
