"""The reference's growing and pruning rules on synthetic leaf-probability matrices."""

import numpy as np

from tree_diffusion.tree import Tree
from tree_diffusion.treevae import growing


def _probs(counts, k):
  """Hard one-hot rows: counts[i] samples fully in leaf i."""
  rows = [np.eye(k)[i] for i, c in enumerate(counts) for _ in range(c)]
  return np.asarray(rows)


def test_effective_leaves_and_threshold():
  p = _probs([500, 495, 5], 3)  # the last leaf holds 0.5% of the mass
  assert growing.effective_leaves(p).tolist() == [True, True, False]
  assert growing.subset_threshold(2) == 0.5 and growing.subset_threshold(4) == 0.25


def test_select_splits_the_largest_leaf():
  t = Tree.complete(1)  # leaves 1, 2
  p = _probs([300, 700], 2)
  d = growing.select_leaf(t, p, batch_size=256, max_depth=5, num_clusters=10)
  assert d.leaf == 2 and d.n_effective == 2 and d.threshold == 0.5
  idx = growing.subset_indices(p, t, 2, d.threshold)
  assert len(idx) == 700 and idx.min() == 300


def test_select_skips_small_leaves_and_stops():
  t = Tree.complete(1)
  p = _probs([100, 200], 2)  # both below a batch of 256
  assert growing.select_leaf(t, p, batch_size=256, max_depth=5, num_clusters=10).leaf is None
  # Enough effective leaves: stop.
  assert (
    growing.select_leaf(t, _probs([500, 500], 2), batch_size=8, max_depth=5, num_clusters=2).leaf
    is None
  )


def test_select_stops_when_the_best_leaf_is_at_max_depth():
  t = Tree.root_only().grow(0).grow(1)  # leaves 2 (depth 1), 3, 4 (depth 2)
  p = _probs([100, 600, 300], 3)  # leaf 3 is largest and at max depth 2
  d = growing.select_leaf(t, p, batch_size=50, max_depth=2, num_clusters=10)
  # The reference breaks out instead of trying the next leaf.
  assert d.leaf is None and d.not_expandable == (3,)
  # Once marked, the next-largest leaf at depth 1 is chosen.
  d = growing.select_leaf(t, p, batch_size=50, max_depth=2, num_clusters=10, not_expandable={3, 4})
  assert d.leaf == 2


def test_soft_probabilities_use_the_threshold():
  t = Tree.complete(1)
  p = np.array([[0.6, 0.4]] * 300 + [[0.45, 0.55]] * 100)
  d = growing.select_leaf(t, p, batch_size=50, max_depth=5, num_clusters=10)
  assert d.counts == {1: 300, 2: 100} and d.leaf == 1


def test_pruning_rule():
  t = Tree.complete(2)  # leaves 3, 4, 5, 6
  p = _probs([400, 300, 295, 5], 4)  # leaf 6 has 0.5% of argmax assignments
  assert growing.leaf_to_prune(t, p) == 6
  assert growing.leaf_to_prune(t, _probs([400, 300, 290, 10], 4)) is None
  assert growing.leaf_to_prune(Tree.root_only(), np.ones((5, 1))) is None


def test_ties_go_to_the_later_leaf():
  """Equal confident counts: the reference walks a reversed ascending argsort, so the leaf later
  in the breadth-first leaf order is split."""
  t = Tree.complete(2)  # leaves 3, 4, 5, 6
  p = np.array(
    [[0.7, 0.1, 0.1, 0.1]] * 60 + [[0.1, 0.1, 0.7, 0.1]] * 60 + [[0.1, 0.7, 0.1, 0.1]] * 10
  )
  d = growing.select_leaf(t, p, batch_size=50, max_depth=5, num_clusters=10)
  assert d.counts[3] == d.counts[5] == 60 and d.leaf == 5


def test_contrastive_configs_need_a_whole_batch_to_split():
  """With contrastive augmentation the loader takes half a batch of images, but a leaf still
  needs stage1.batch_size confident samples to be split (the reference's rule): 48 of 64 is not
  enough."""
  from configs import cifar10

  c = cifar10.get_config().stage1
  c.batch_size = 64
  assert c.augment and "InfoNCE" in c.augmentation_method
  assert growing.min_samples_to_split(c) == 64
  p = _probs([48, 16], 2)
  d = growing.select_leaf(
    Tree.complete(1), p, batch_size=growing.min_samples_to_split(c), max_depth=5, num_clusters=10
  )
  assert d.leaf is None and d.counts[1] == 48
