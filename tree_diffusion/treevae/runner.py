"""The small framework that runs the TreeVAE: per-node linen modules applied to slices of plain
nested-dict variables.

Why the TreeVAE's top level is not a linen ``Module``: its tree grows and is pruned while it
trains, and every node's parameters must stay where they are when that happens. Variables are
therefore plain nested dicts keyed by stable node names (``node_5/decoder``), and growing or
pruning is dict surgery (``model.grow_variables``, ``prune_variables``) rather than a new module
hierarchy whose initialisation would rename or re-create parameters. The linen modules are the
per-node components (encoder, bottom-up blocks, dense and transformation heads, routers,
decoders); :class:`Runner` is what a top-level ``Module.apply`` would otherwise do:

* it hands each module its slice of ``params`` and ``batch_stats`` (:meth:`Runner.__call__`);
* it runs the nodes of one depth, whose modules have the same shapes, as **one** vmapped call over
  their stacked parameters (:meth:`Runner.many`), so a pass traces one call per depth and
  component rather than one per node;
* in training mode it collects the BatchNorm statistics each module updates and writes them back
  into a copy of the input statistics (:meth:`Runner.batch_stats`);
* under mixed precision it casts parameters and inputs to the compute dtype per module and returns
  float32 outputs, so the losses and the tree's probabilities stay in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tree_diffusion import precision
from tree_diffusion.treevae import networks

Variables = dict[str, dict[str, Any]]


class Runner:
  """One pass of the TreeVAE over ``variables``: applies sub-modules to their slices of the
  variables (one at a time, or vmapped over stacked slices) and collects the BatchNorm statistics
  they update. ``train``: BatchNorm with batch statistics; otherwise running statistics.
  """

  def __init__(self, variables: Variables, train: bool, dtype: str = "float32"):
    self.variables = variables
    self.train = train
    self.dtype = precision.compute_dtype(dtype)
    self.updates: list[tuple[tuple[str, ...], Any]] = []

  def _vars(self, path):
    v = {"params": get_path(self.variables["params"], path)}
    if v["params"] is None:
      raise KeyError(f"no parameters at {'/'.join(path)}")
    v["params"] = self._cast(v["params"])
    stats = get_path(self.variables.get("batch_stats", {}), path)
    if stats is not None:
      v["batch_stats"] = stats
    return v

  def _cast(self, tree):
    """Floating arrays of ``tree`` in the compute dtype (a no-op in float32)."""
    if self.dtype == jnp.float32:
      return tree
    return jax.tree_util.tree_map(
      lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )

  def _apply_fn(self, module: nn.Module, train: bool, has_stats: bool):
    f32 = lambda out: jax.tree_util.tree_map(lambda o: o.astype(jnp.float32), out)
    if isinstance(module, networks.GaussianHead):
      return lambda v, *a: (f32(module.apply(v, *self._cast(a))), None)
    if train and has_stats:

      def fn(v, *a):
        out, new = module.apply(v, *self._cast(a), train=True, mutable=["batch_stats"])
        return f32(out), new["batch_stats"]

      return fn
    return lambda v, *a: (f32(module.apply(v, *self._cast(a), train=train)), None)

  def __call__(self, path: tuple[str, ...], module: nn.Module, *args):
    v = self._vars(path)
    out, new = self._apply_fn(module, self.train, "batch_stats" in v)(v, *args)
    if new is not None:
      self.updates.append((path, new))
    return out

  def many(self, paths, module: nn.Module, args: tuple, in_axes: tuple):
    """Applies ``module`` with each of ``paths``' variables, vmapped; outputs stacked on axis 0.

    ``in_axes`` gives, per argument, 0 (stacked per path) or None (shared by all paths).
    """
    paths = [tuple(p) for p in paths]
    vs = [self._vars(p) for p in paths]
    fn = self._apply_fn(module, self.train, "batch_stats" in vs[0])
    if len(paths) == 1:
      out, new = fn(vs[0], *[a if ax is None else a[0] for a, ax in zip(args, in_axes)])
      out = jax.tree_util.tree_map(lambda o: o[None], out)
      news = None if new is None else [new]
    else:
      stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *vs)
      out, new = jax.vmap(fn, in_axes=(0,) + tuple(in_axes))(stacked, *args)
      news = (
        None
        if new is None
        else [jax.tree_util.tree_map(lambda a: a[i], new) for i in range(len(paths))]
      )
    if news is not None:
      self.updates.extend(zip(paths, news))
    return out

  def batch_stats(self) -> dict:
    """The input statistics with this pass's updates written in (unchanged ones shared)."""
    stats = copy_dicts(self.variables.get("batch_stats", {}))
    for path, new in self.updates:
      node = stats
      for p in path[:-1]:
        node = node[p]
      node[path[-1]] = new
    return stats


def get_path(tree: dict, path: tuple[str, ...]):
  """The value at ``path`` in nested dicts, or None."""
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def copy_dicts(d):
  """A copy of the nested dicts of ``d`` (arrays shared)."""
  return {k: copy_dicts(v) for k, v in d.items()} if isinstance(d, dict) else d
