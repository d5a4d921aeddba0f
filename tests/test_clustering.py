"""Tests for tree_diffusion.clustering against independent computations."""

import itertools
import json
import math

import numpy as np
import pytest
import sklearn.metrics

from tree_diffusion import clustering
from tree_diffusion.tree import Tree


# ------------------------------------------------------------------------------------- helpers


def _brute_force_accuracy(labels, preds):
  """Best one-to-one matching by trying every permutation of the square count matrix."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  d = max(labels.max(), preds.max()) + 1
  best = 0
  for perm in itertools.permutations(range(d)):
    # perm[p] is the class that cluster p is mapped to.
    best = max(best, int(np.sum(np.asarray(perm)[preds] == labels)))
  return best / labels.size


def _brute_force_dendrogram_purity(tree, labels, leaves):
  """O(N^2) DP: each same-class pair scores the class fraction under its lowest common ancestor."""
  leaf_ids = [tree.leaves[k] for k in leaves]
  under = {v: set(tree.subtree(v)) for v in tree.nodes}
  scores = []
  for i, j in itertools.combinations(range(len(labels)), 2):
    if labels[i] != labels[j]:
      continue
    pi, pj = tree.path(leaf_ids[i]), tree.path(leaf_ids[j])
    lca = [a for a, b in zip(pi, pj) if a == b][-1]
    members = [s for s in range(len(labels)) if leaf_ids[s] in under[lca]]
    scores.append(np.mean([labels[s] == labels[i] for s in members]))
  return float(np.mean(scores)) if scores else 1.0


# ------------------------------------------------------------------------------------- nmi


@pytest.mark.parametrize(
  "n,num_classes,num_clusters,seed",
  [
    (50, 3, 3, 0),
    (200, 10, 4, 1),
    (200, 2, 12, 2),
    (37, 5, 5, 3),
    (1000, 7, 16, 4),
    (10, 1, 3, 5),  # constant labels: NMI 0 unless the clustering is constant too
  ],
)
def test_nmi_matches_sklearn_random(n, num_classes, num_clusters, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  preds = rng.integers(0, num_clusters, n)
  # A correlated clustering as well, so the comparison is not only around NMI ≈ 0.
  noisy = np.where(rng.random(n) < 0.7, labels % num_clusters, preds)
  for p in (preds, noisy):
    expected = sklearn.metrics.normalized_mutual_info_score(labels, p)
    assert clustering.nmi(labels, p) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize(
  "labels,preds",
  [
    ([0, 0, 0], [1, 1, 1]),  # one class, one cluster
    ([0, 1, 2], [5, 5, 5]),  # one cluster
    ([3, 3, 9, 9], [100, 100, -1, -1]),  # arbitrary label values, perfect match
    ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent: MI exactly 0
    ([0, 1, 0, 1, 2, 2], [0, 0, 1, 1, 2, 2]),
  ],
)
def test_nmi_edge_cases_match_sklearn(labels, preds):
  expected = sklearn.metrics.normalized_mutual_info_score(labels, preds)
  assert clustering.nmi(labels, preds) == pytest.approx(expected, abs=1e-10)


def test_nmi_is_one_for_relabelled_partition():
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  assert clustering.nmi(labels, (labels + 1) % 3) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------- accuracy


def test_accuracy_hand_worked():
  labels = [0, 0, 0, 1, 1, 2]
  preds = [1, 1, 0, 0, 0, 2]
  # Best matching 1→0 (2 samples), 0→1 (2), 2→2 (1): 5 of 6.
  assert clustering.accuracy(labels, preds) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
  "num_classes,num_clusters,seed",
  [
    (4, 4, 0),
    (4, 4, 1),
    (3, 5, 2),
    (3, 5, 3),
    (5, 3, 4),
    (2, 2, 5),
  ],
)
def test_accuracy_matches_brute_force(num_classes, num_clusters, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, 40)
  preds = np.where(rng.random(40) < 0.5, labels % num_clusters, rng.integers(0, num_clusters, 40))
  assert clustering.accuracy(labels, preds) == pytest.approx(_brute_force_accuracy(labels, preds))


def test_accuracy_surplus_clusters_count_as_errors():
  # Each class split evenly over two clusters: only one cluster per class can be matched.
  labels = [0, 0, 1, 1]
  preds = [0, 1, 2, 3]
  assert clustering.accuracy(labels, preds) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------- purity


def test_leaf_purity_hand_worked():
  leaves = [0, 0, 0, 1, 1, 2, 2, 2, 2]
  labels = [0, 0, 1, 1, 1, 2, 0, 2, 2]
  # Majorities 2/3, 2/2, 3/4 weighted by 3, 2, 4 samples: (2 + 2 + 3) / 9.
  assert clustering.leaf_purity(labels, leaves) == pytest.approx(7 / 9)


def test_leaf_purity_ignores_empty_leaves():
  assert clustering.leaf_purity([0, 0, 1], [0, 0, 3]) == pytest.approx(1.0)


def test_counts_and_histograms():
  leaves = [0, 2, 2, 1, 2]
  labels = [1, 0, 1, 1, 1]
  np.testing.assert_array_equal(clustering.leaf_counts(leaves, 4), [1, 1, 3, 0])
  hist = clustering.label_histograms(labels, leaves, 4, 3)
  assert hist.dtype == np.int64
  np.testing.assert_array_equal(hist, [[0, 1, 0], [0, 1, 0], [1, 2, 0], [0, 0, 0]])


# ------------------------------------------------------------------------------------- dendrogram purity


def test_dendrogram_purity_perfect_tree():
  tree = Tree.complete(2)
  rng = np.random.default_rng(0)
  leaves = rng.integers(0, tree.num_leaves, 50)
  assert clustering.dendrogram_purity(tree, leaves, leaves) == pytest.approx(1.0)


def test_dendrogram_purity_single_leaf_holds_everything():
  tree = Tree.complete(1)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 30)
  leaves = np.ones(30, dtype=int)  # everyone in the right leaf, the left one is empty
  sizes = np.bincount(labels)
  n = labels.size
  pairs = np.array([math.comb(int(s), 2) for s in sizes], dtype=float)
  expected = np.sum(sizes / n * pairs) / np.sum(pairs)
  assert clustering.dendrogram_purity(tree, labels, leaves) == pytest.approx(expected, rel=1e-12)


def test_dendrogram_purity_matches_brute_force_with_passthrough():
  tree = Tree.root_only().grow(0).grow(1).grow(4).prune([3])
  # Node 1 lost its left child and passes through to 4, which splits into leaves 9 and 10.
  assert tree.leaves == (2, 9, 10)
  assert tree.passthrough_nodes == (1,)
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, 60)
  leaves = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 3, 60))
  got = clustering.dendrogram_purity(tree, labels, leaves)
  assert got == pytest.approx(_brute_force_dendrogram_purity(tree, labels, leaves), rel=1e-12)
  assert got < 1.0


@pytest.mark.parametrize("seed", range(4))
def test_dendrogram_purity_matches_brute_force_random_trees(seed):
  rng = np.random.default_rng(seed)
  tree = Tree.root_only()
  for _ in range(5):
    tree = tree.grow(int(rng.choice(tree.leaves)))
  # Pruning a couple of leaves leaves passthrough nodes (possibly chains of them).
  tree = tree.prune([int(v) for v in rng.choice(tree.leaves, 2, replace=False)])
  num_classes = 4
  labels = rng.integers(0, num_classes, 50)
  leaves = np.where(
    rng.random(50) < 0.5, labels % tree.num_leaves, rng.integers(0, tree.num_leaves, 50)
  )
  expected = _brute_force_dendrogram_purity(tree, labels, leaves)
  assert clustering.dendrogram_purity(tree, labels, leaves) == pytest.approx(expected, rel=1e-12)


def test_dendrogram_purity_without_same_class_pairs_is_one():
  assert clustering.dendrogram_purity(Tree.complete(1), [0, 1], [0, 0]) == 1.0


# ------------------------------------------------------------------------------------- validation


def test_validation_errors():
  with pytest.raises(ValueError):
    clustering.nmi([0, 1], [0])
  with pytest.raises(ValueError):
    clustering.accuracy([0, 1, 2], [0, 1])
  with pytest.raises(ValueError):
    clustering.accuracy([0, -1], [0, 1])
  with pytest.raises(ValueError):
    clustering.leaf_counts([0, 4], 4)
  with pytest.raises(ValueError):
    clustering.label_histograms([0, 3], [0, 1], 2, 3)
  with pytest.raises(ValueError):
    clustering.dendrogram_purity(Tree.complete(1), [0, 1], [0, 2])
  with pytest.raises(ValueError):
    clustering.leaf_purity([0.5, 1.0], [0, 1])
  with pytest.raises(ValueError):
    clustering.summary(Tree.complete(1), None, np.zeros((3, 3)))


# ------------------------------------------------------------------------------------- summary


def _small_case():
  tree = Tree.complete(1)  # leaves (1, 2)
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
  labels = np.array([0, 0, 1, 1, 1])
  return tree, labels, probs


def test_summary_with_labels():
  tree, labels, probs = _small_case()
  out = clustering.summary(tree, labels, probs)
  json.dumps(out)  # must serialise as is
  preds = np.array([0, 0, 1, 1, 0])
  assert out["num_leaves"] == 2
  assert out["leaf_counts"] == [3, 2]
  assert out["label_histograms"] == [[2, 1], [0, 2]]
  assert out["accuracy"] == pytest.approx(4 / 5)
  assert out["leaf_purity"] == pytest.approx(4 / 5)
  assert out["nmi"] == pytest.approx(sklearn.metrics.normalized_mutual_info_score(labels, preds))
  assert out["ari"] == pytest.approx(sklearn.metrics.adjusted_rand_score(labels, preds))
  # Same-class pairs: class 0 (1 pair, leaf 1, fraction 2/3); class 1 (3 pairs: one in leaf 2 with
  # fraction 1, two split across the root with fraction 3/5).
  assert out["dendrogram_purity"] == pytest.approx((2 / 3 + 1 + 2 * 3 / 5) / 4)


def test_summary_without_labels():
  tree, labels, probs = _small_case()
  for no_labels in (None, -np.ones_like(labels)):
    out = clustering.summary(tree, no_labels, probs)
    assert out == {"num_leaves": 2, "leaf_counts": [3, 2]}


def test_summary_partially_labelled_uses_labelled_samples_only():
  tree, labels, probs = _small_case()
  partial = labels.copy()
  partial[4] = -1  # the one sample that spoils purity
  out = clustering.summary(tree, partial, probs)
  assert out["leaf_counts"] == [3, 2]  # counts still cover every sample
  assert out["accuracy"] == pytest.approx(1.0)
  assert out["leaf_purity"] == pytest.approx(1.0)
  assert out["dendrogram_purity"] == pytest.approx(1.0)
  assert out["label_histograms"] == [[2, 0], [0, 2]]
