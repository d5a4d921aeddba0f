"""Tree topology: heap ids, BFS leaf order, grow/prune surgery, JSON round trip, hashing."""

import pytest

from tree_diffusion.tree import Tree


def test_grow_and_bfs_order():
  t = Tree.root_only().grow(0).grow(1)
  # Node 2 (a depth-1 leaf on the right) comes before the depth-2 leaves of node 1 (BFS).
  assert t.leaves == (2, 3, 4)
  assert t.children(1) == (3, 4) and t.parent(4) == 1 and t.node_depth(4) == 2
  assert t.path(4) == (0, 1, 4)
  assert t.depth == 2 and t.levels == ((0,), (1, 2), (3, 4))
  assert t.bfs_index(3) == 3
  with pytest.raises(ValueError):
    t.grow(1)  # not a leaf


def test_prune_makes_passthrough_and_removes_childless_parents():
  t = Tree.root_only().grow(0).grow(1).grow(4)  # leaves 2, 3, 9, 10
  p = t.prune([3])
  assert p.leaves == (2, 9, 10) and p.passthrough_nodes == (1,)
  assert p.is_passthrough(1) and p.children(1) == (4,)
  # Removing both children of 4 leaves 4 childless: it goes, and so does passthrough 1.
  q = p.prune([9, 10])
  assert q.nodes == (0, 2) and q.passthrough_nodes == (0,)
  with pytest.raises(ValueError):
    t.prune([1])  # not a leaf


def test_json_round_trip_and_hash():
  t = Tree.root_only().grow(0).grow(2).prune([5])
  u = Tree.from_json(t.to_json())
  assert u == t and hash(u) == hash(t)
  assert len({t, u, Tree.complete(2)}) == 2


def test_invalid_trees_are_rejected():
  with pytest.raises(ValueError):
    Tree((1, 2))
  with pytest.raises(ValueError):
    Tree((0, 3))  # 3's parent 1 is missing
