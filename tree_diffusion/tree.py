"""The TreeVAE topology as an immutable, hashable value.

Nodes carry stable heap ids: the root is 0 and the children of node ``i`` are ``2i+1`` (left) and
``2i+2`` (right). Growing or pruning never renumbers a node, so parameters keyed by node id stay
where they are. A node is

* a **leaf** when none of its children is present (it owns a decoder),
* **internal** when both children are present (it owns a p-router and a q-router),
* a **passthrough** node when exactly one child is present (left behind by pruning; it has neither
  routers nor a decoder and hands its path probability to its only child).

Because heap ids enumerate a complete binary tree level by level, left to right, sorting ids gives
the breadth-first order in which the reference implementation numbers its nodes and leaves
(breadth-first over the tree as it stands): a depth-1 leaf on the right comes before depth-2 leaves on the left.

A ``Tree`` is passed as a static argument to jitted functions; a grown or pruned tree is a new value
and triggers exactly one retrace.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
from typing import Iterable

# The deepest node a Tree may hold. A TreeVAE's depth is bounded by its number of bottom-up
# levels (7 in the paper's configs); this bound keeps a mistyped id or depth from allocating
# 2^depth nodes.
MAX_DEPTH = 16
MAX_NODE_ID = 2 ** (MAX_DEPTH + 1) - 2


def parent_of(node_id: int) -> int | None:
  """Heap parent of ``node_id`` (``None`` for the root)."""
  return None if node_id == 0 else (node_id - 1) // 2


def depth_of(node_id: int) -> int:
  """Depth of a heap id (root 0)."""
  return (node_id + 1).bit_length() - 1


@dataclasses.dataclass(frozen=True)
class Tree:
  """A binary tree topology given by the sorted tuple of its present heap ids."""

  nodes: tuple[int, ...]

  def __post_init__(self):
    given = self.nodes
    if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
      raise TypeError(
        f"a Tree's nodes are a sequence of heap ids such as (0, 1, 2); got "
        f"{type(given).__name__} {given!r}"
      )
    given = tuple(given)
    bad = [n for n in given if isinstance(n, bool) or not isinstance(n, numbers.Integral)]
    if bad:
      raise TypeError(f"a Tree's nodes are integer heap ids such as (0, 1, 2); got {bad[0]!r}")
    nodes = tuple(sorted(set(int(n) for n in given)))
    if nodes and nodes[0] < 0:
      raise ValueError(
        f"a Tree's node ids are heap ids >= 0 (root 0, children 2i+1 and 2i+2); got {nodes[0]}"
      )
    if nodes and nodes[-1] > MAX_NODE_ID:
      raise ValueError(
        f"node {nodes[-1]} is deeper than {MAX_DEPTH} levels (heap ids up to {MAX_NODE_ID})"
      )
    if not nodes or nodes[0] != 0:
      raise ValueError(f"a tree needs its root (node 0); got nodes {nodes}")
    present = set(nodes)
    for n in nodes[1:]:
      if parent_of(n) not in present:
        raise ValueError(f"node {n} has no parent {parent_of(n)} in the tree {nodes}")
    object.__setattr__(self, "nodes", nodes)

  # ----------------------------------------------------------------------------- constructors

  @classmethod
  def root_only(cls) -> "Tree":
    return cls((0,))

  @classmethod
  def complete(cls, depth: int) -> "Tree":
    """The complete tree whose leaves all sit at ``depth`` (``0 <= depth <= MAX_DEPTH``)."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
      raise TypeError(f"depth must be an integer in 0..{MAX_DEPTH}; got {depth!r}")
    if not 0 <= depth <= MAX_DEPTH:
      raise ValueError(
        f"depth must be an integer in 0..{MAX_DEPTH} (a complete tree of depth d "
        f"has 2^(d+1) - 1 nodes); got {depth}"
      )
    return cls(tuple(range(2 ** (depth + 1) - 1)))

  # ----------------------------------------------------------------------------- structure

  def __contains__(self, node_id: int) -> bool:
    return node_id in self._node_set

  @functools.cached_property
  def _node_set(self) -> frozenset[int]:
    return frozenset(self.nodes)

  def parent(self, node_id: int) -> int | None:
    self._check(node_id)
    return parent_of(node_id)

  def children(self, node_id: int) -> tuple[int, ...]:
    """Present children of ``node_id``, left before right."""
    self._check(node_id)
    return tuple(c for c in (2 * node_id + 1, 2 * node_id + 2) if c in self._node_set)

  def node_depth(self, node_id: int) -> int:
    self._check(node_id)
    return depth_of(node_id)

  def is_leaf(self, node_id: int) -> bool:
    return not self.children(node_id)

  def is_internal(self, node_id: int) -> bool:
    return len(self.children(node_id)) == 2

  def is_passthrough(self, node_id: int) -> bool:
    return len(self.children(node_id)) == 1

  @functools.cached_property
  def leaves(self) -> tuple[int, ...]:
    """Leaf ids in the reference's breadth-first leaf order (= ascending heap id)."""
    return tuple(n for n in self.nodes if self.is_leaf(n))

  @functools.cached_property
  def internal_nodes(self) -> tuple[int, ...]:
    return tuple(n for n in self.nodes if self.is_internal(n))

  @functools.cached_property
  def passthrough_nodes(self) -> tuple[int, ...]:
    return tuple(n for n in self.nodes if self.is_passthrough(n))

  @functools.cached_property
  def levels(self) -> tuple[tuple[int, ...], ...]:
    """Node ids grouped by depth: ``levels[k]`` lists the nodes at depth ``k`` left to right."""
    out = [[] for _ in range(self.depth + 1)]
    for n in self.nodes:
      out[depth_of(n)].append(n)
    return tuple(tuple(level) for level in out)

  @property
  def num_leaves(self) -> int:
    return len(self.leaves)

  @property
  def depth(self) -> int:
    """Depth of the deepest node (0 for a root-only tree)."""
    return depth_of(self.nodes[-1])

  def leaf_index(self, node_id: int) -> int:
    """Position of a leaf in :attr:`leaves` (its cluster index)."""
    return self.leaves.index(node_id)

  def path(self, node_id: int) -> tuple[int, ...]:
    """Node ids from the root down to ``node_id`` (both included)."""
    self._check(node_id)
    out = [node_id]
    while out[-1] != 0:
      out.append(parent_of(out[-1]))
    return tuple(reversed(out))

  def bfs_index(self, node_id: int) -> int:
    """The reference's BFS counter of a node (0 … num_nodes−1), e.g. for node-id embeddings."""
    self._check(node_id)
    return self.nodes.index(node_id)

  def subtree(self, node_id: int) -> tuple[int, ...]:
    """All present ids under ``node_id`` (itself included), in BFS order."""
    self._check(node_id)
    return tuple(n for n in self.nodes if node_id in self.path(n))

  # ----------------------------------------------------------------------------- surgery

  def grow(self, node_id: int) -> "Tree":
    """Gives leaf ``node_id`` two children."""
    self._check(node_id)
    if not self.is_leaf(node_id):
      raise ValueError(
        f"can only grow a leaf; node {node_id} has children {self.children(node_id)}"
      )
    return Tree(self.nodes + (2 * node_id + 1, 2 * node_id + 2))

  def prune(self, node_ids: Iterable[int]) -> "Tree":
    """Removes leaves, then every ancestor left without children (never the root).

    The parent of a removed leaf keeps its other child and becomes a passthrough node.
    """
    node_ids = tuple(node_ids)
    for n in node_ids:
      self._check(n)
      if not self.is_leaf(n):
        raise ValueError(f"can only prune leaves; node {n} has children {self.children(n)}")
      if n == 0:
        raise ValueError("cannot prune the root")
    present = set(self.nodes) - set(node_ids)
    frontier = {parent_of(n) for n in node_ids}
    while frontier:
      nxt = set()
      for n in frontier:
        if n != 0 and n in present and not ({2 * n + 1, 2 * n + 2} & present):
          present.discard(n)
          nxt.add(parent_of(n))
      frontier = nxt
    return Tree(tuple(present))

  # ----------------------------------------------------------------------------- io

  def to_json(self) -> str:
    return json.dumps({"nodes": list(self.nodes)})

  @classmethod
  def from_json(cls, s: str | dict) -> "Tree":
    """The tree of :meth:`to_json`'s text, ``{"nodes": [0, 1, 2, …]}`` (or of that dict).

    Raises:
      TypeError: not a string or dict, or not that form.
      ValueError: text that is not JSON, or node ids that do not make a tree.
    """
    form = 'a JSON object {"nodes": [0, 1, 2, ...]} (what Tree.to_json writes)'
    if isinstance(s, (str, bytes)):
      try:
        d = json.loads(s)
      except ValueError as e:
        raise ValueError(f"a tree must be {form}; got text that is not JSON ({e})") from None
    else:
      d = s
    if not isinstance(d, dict):
      raise TypeError(f"a tree must be {form}; got {type(d).__name__} {d!r:.80}")
    if not isinstance(d.get("nodes"), list):
      got = f"keys {sorted(d)}" if "nodes" not in d else f"nodes {d['nodes']!r:.80}"
      raise TypeError(f"a tree must be {form}; got {got}")
    return cls(tuple(d["nodes"]))

  def __repr__(self) -> str:
    return f"Tree(leaves={self.leaves}, passthrough={self.passthrough_nodes})"

  def _check(self, node_id: int):
    if node_id not in self._node_set:
      raise ValueError(f"node {node_id!r} is not in the tree (nodes {self.nodes})")
