"""Host-side rules that decide how the tree grows and is pruned.

Pure NumPy functions of leaf-probability matrices ``[N, K]`` (columns in ``tree.leaves`` order),
so they are unit-tested on synthetic inputs without a model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tree_diffusion.tree import Tree, depth_of


def effective_leaves(leaf_probs: np.ndarray, min_share: float = 0.01) -> np.ndarray:
  """Boolean ``[K]``: leaves whose summed probability mass is ≥ ``min_share`` of the total."""
  mass = np.asarray(leaf_probs, np.float64).sum(axis=0)
  return mass >= min_share * mass.sum()


def subset_threshold(n_effective: int) -> float:
  """Probability a sample needs to count towards a leaf: ``min(1/n_eff, 0.5)``."""
  return min(1.0 / max(n_effective, 1), 0.5)


@dataclasses.dataclass(frozen=True)
class GrowDecision:
  """Outcome of one leaf-selection round."""

  leaf: int | None  # node id to split, or None to stop growing
  reason: str  # why (for the log)
  n_effective: int
  threshold: float
  counts: dict  # leaf node id -> samples with probability ≥ threshold
  not_expandable: tuple = ()  # leaves newly marked as not expandable


def min_samples_to_split(stage1_config) -> int:
  """The fewest confident samples a leaf needs to be split: ``stage1.batch_size``, also with
  contrastive augmentation, whose loader takes half a batch of images (two views each). This is
  the reference's rule; a small tree would train on half-batches of a leaf with fewer."""
  return int(stage1_config.batch_size)


def select_leaf(
  tree: Tree,
  leaf_probs: np.ndarray,
  *,
  batch_size: int,
  max_depth: int,
  num_clusters: int,
  not_expandable=frozenset(),
) -> GrowDecision:
  """The reference's leaf-selection rule.

  * Stop if the number of effective leaves (≥ 1% of the mass) reaches ``num_clusters``.
  * Rank the expandable leaves by how many samples reach them with probability
    ``≥ min(1/n_eff, 0.5)``, largest first; equal counts put the leaf later in the breadth-first
    leaf order first (the reference walks a reversed ascending argsort).
  * Walk the ranking: skip leaves with fewer than ``batch_size`` such samples; if the best remaining
    leaf is at ``max_depth``, mark it not expandable and stop growing altogether (the reference
    breaks out instead of trying the next leaf); otherwise split it.
  """
  leaf_probs = np.asarray(leaf_probs)
  if leaf_probs.shape[1] != tree.num_leaves:
    raise ValueError(
      f"leaf_probs has {leaf_probs.shape[1]} columns, the tree {tree.num_leaves} leaves"
    )
  n_eff = int(effective_leaves(leaf_probs).sum())
  thr = subset_threshold(n_eff)
  counts = {leaf: int((leaf_probs[:, i] >= thr).sum()) for i, leaf in enumerate(tree.leaves)}
  if n_eff >= num_clusters:
    return GrowDecision(
      None, f"{n_eff} effective leaves reach num_clusters_tree={num_clusters}", n_eff, thr, counts
    )
  ranking = sorted(
    (l for l in tree.leaves if l not in not_expandable),
    key=lambda l: (-counts[l], -tree.leaf_index(l)),
  )
  for leaf in ranking:
    if counts[leaf] < batch_size:
      continue
    if depth_of(leaf) >= max_depth:
      return GrowDecision(
        None, f"largest leaf {leaf} is at max depth {max_depth}", n_eff, thr, counts, (leaf,)
      )
    return GrowDecision(
      leaf, f"split leaf {leaf} ({counts[leaf]} samples ≥ {thr:.3f})", n_eff, thr, counts
    )
  return GrowDecision(
    None, f"no expandable leaf has ≥ batch_size={batch_size} samples", n_eff, thr, counts
  )


def subset_indices(leaf_probs: np.ndarray, tree: Tree, leaf: int, threshold: float) -> np.ndarray:
  """Row ids whose probability of ``leaf`` is ≥ ``threshold`` (the small tree's training data)."""
  return np.flatnonzero(np.asarray(leaf_probs)[:, tree.leaf_index(leaf)] >= threshold)


def leaf_to_prune(tree: Tree, leaf_probs: np.ndarray, min_share: float = 0.01) -> int | None:
  """One pruning round: the leaf with fewest argmax assignments if below ``min_share``.

  Returns ``None`` when the smallest leaf is large enough or the tree has < 2 leaves.
  """
  if tree.num_leaves < 2:
    return None
  assign = np.asarray(leaf_probs).argmax(axis=1)
  counts = np.bincount(assign, minlength=tree.num_leaves)
  smallest = int(np.argmin(counts))  # first minimum in BFS leaf order, as the reference
  if counts[smallest] < min_share * len(assign):
    return tree.leaves[smallest]
  return None
