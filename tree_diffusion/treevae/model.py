"""The CNN-TreeVAE: per-node linen modules wired by a pure function of (variables, tree, x, key).

The tree is static data (:class:`tree_diffusion.tree.Tree`); the forward pass is unrolled over its
nodes at trace time. Variables are nested dicts keyed by stable names, so growing and pruning are
plain dict surgery and never renumber anything::

    {"params":      {"encoder": …, "bottom_up_1": …, …, "proj_0": …,
                     "node_0": {"dense": …, "p_router": …, "q_router": …},
                     "node_1": {"dense": …, "transform": …, "decoder": …}, …},
     "batch_stats": {same keys, for the modules that have BatchNorm}}

Depth conventions follow the reference implementation: the config lists ``latent_channels`` and
``bottom_up_channels`` from the input side to the root; a node at depth ``k`` reads bottom-up level
``L−1−k``, so the deepest possible leaf sits at depth ``L−1``.

The module is long because the forward pass, generation, the importance weights and the
parameter surgery that grows and prunes the tree all read and write this one variable layout.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion import inputs, precision
from tree_diffusion.tree import Tree, depth_of
from tree_diffusion.treevae import losses
from tree_diffusion.treevae import networks
from tree_diffusion.treevae.runner import Runner, copy_dicts, get_path

PyTree = Any
Variables = dict[str, dict[str, Any]]

# Component names of a node, in a fixed order.
DENSE, TRANSFORM, P_ROUTER, Q_ROUTER, DECODER = (
  "dense",
  "transform",
  "p_router",
  "q_router",
  "decoder",
)
COMPONENTS = (DENSE, TRANSFORM, P_ROUTER, Q_ROUTER, DECODER)


def node_key(node_id: int) -> str:
  return f"node_{node_id}"


def node_components(tree: Tree, node_id: int) -> tuple[str, ...]:
  """The modules a node owns: every node a bottom-up head, non-roots a prior, and routers or a decoder."""
  comps = [DENSE]
  if node_id != 0:
    comps.append(TRANSFORM)
  if tree.is_internal(node_id):
    comps += [P_ROUTER, Q_ROUTER]
  if tree.is_leaf(node_id):
    comps.append(DECODER)
  return tuple(comps)


@dataclasses.dataclass(frozen=True)
class TreeVAE:
  """Architecture hyper-parameters of a CNN-TreeVAE; hashable, so it can be a static jit argument."""

  encoder: str = "cnn1"
  image_size: int = 28
  channels: int = 1
  latent_channels: tuple[int, ...] = (16,) * 7
  bottom_up_channels: tuple[int, ...] = (32,) * 7
  representation_dim: int = 2
  res_connections: bool = False
  act: str = "swish"
  output: str = "sigmoid"
  dropout_router: float = 0.0
  contrastive: bool = False
  # Compute dtype of the networks (an execution policy, not architecture: not exported). With
  # "bfloat16" each module runs its convolutions/matmuls in bfloat16 on bfloat16 copies of its
  # float32 parameters (BatchNorm statistics in float32) and hands float32 back, so the latent
  # Gaussians, KLs, routing probabilities and losses between modules are float32.
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "latent_channels", tuple(self.latent_channels))
    object.__setattr__(self, "bottom_up_channels", tuple(self.bottom_up_channels))
    for name in ("image_size", "channels", "representation_dim"):
      inputs.count(getattr(self, name), name)
    if self.image_size <= self.representation_dim:
      raise ValueError(
        f"image_size {self.image_size} must exceed representation_dim "
        f"{self.representation_dim} (the encoder reduces one to the other)"
      )
    if not self.latent_channels or len(self.latent_channels) != len(self.bottom_up_channels):
      raise ValueError(
        "latent_channels and bottom_up_channels need the same length (one per "
        f"level, at least one); got {self.latent_channels} and "
        f"{self.bottom_up_channels}"
      )
    for name in ("latent_channels", "bottom_up_channels"):
      for i, c in enumerate(getattr(self, name)):
        inputs.count(c, f"{name}[{i}]")
    if self.encoder not in networks.ENCODERS:
      raise ValueError(
        f"unknown encoder {self.encoder!r}; choose one of {sorted(networks.ENCODERS)}"
      )
    if self.output not in ("sigmoid", "mse"):
      raise ValueError(f"unknown output {self.output!r}; use 'sigmoid' or 'mse'")
    networks.activation(self.act)
    precision.compute_dtype(self.dtype, "stage1.dtype")

  @classmethod
  def from_config(cls, c) -> "TreeVAE":
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})

  def to_dict(self) -> dict:
    """The architecture (what an export records; the compute ``dtype`` is left out)."""
    d = dataclasses.asdict(self)
    d.pop("dtype")
    return d

  # ------------------------------------------------------------------------- per-depth sizes

  @property
  def num_levels(self) -> int:
    return len(self.bottom_up_channels)

  @property
  def max_depth(self) -> int:
    return self.num_levels - 1

  def h(self, depth: int) -> int:
    """Bottom-up channels read by nodes at ``depth`` (the reference's ``H(k)``)."""
    return self.bottom_up_channels[self.num_levels - 1 - depth]

  def lz(self, depth: int) -> int:
    """Latent channels of nodes at ``depth`` (``Lz(k)``)."""
    return self.latent_channels[self.num_levels - 1 - depth]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def latent_shape(self, depth: int) -> tuple[int, int, int]:
    r = self.representation_dim
    return (r, r, self.lz(depth))

  # ------------------------------------------------------------------------- module definitions

  def encoder_def(self) -> nn.Module:
    return networks.ENCODERS[self.encoder](
      self.image_size, self.channels, self.bottom_up_channels[0], self.representation_dim, self.act
    )

  def bottom_up_def(self, level: int) -> nn.Module:
    h = self.bottom_up_channels
    return networks.ConvBlock(
      h[level - 1],
      h[level],
      self.latent_channels[level],
      self.res_connections,
      self.act,
      heads=False,
    )

  def component_def(self, comp: str, depth: int) -> nn.Module:
    if comp == DENSE:
      return networks.GaussianHead(self.lz(depth))
    if comp == TRANSFORM:
      return networks.ConvBlock(
        self.lz(depth - 1),
        self.h(depth),
        self.lz(depth),
        self.res_connections,
        self.act,
        heads=True,
      )
    if comp in (P_ROUTER, Q_ROUTER):
      return networks.Router(self.h(depth), self.act, self.dropout_router)
    if comp == DECODER:
      return networks.DECODERS[self.encoder](
        self.image_size, self.channels, self.lz(depth), self.representation_dim, self.act
      )
    raise ValueError(comp)

  def _component_input(self, comp: str, depth: int) -> jax.Array:
    r = self.representation_dim
    c = {
      DENSE: self.h(depth),
      TRANSFORM: self.lz(depth - 1) if depth else 0,
      P_ROUTER: self.lz(depth),
      Q_ROUTER: self.h(depth),
      DECODER: self.lz(depth),
    }[comp]
    return jnp.zeros((1, r, r, c), jnp.float32)

  # ------------------------------------------------------------------------- initialisation

  def init_components(self, key: jax.Array, node_id: int, comps: Iterable[str]) -> Variables:
    """Fresh variables of some components of one node: ``{"params": {comp: …}, "batch_stats": …}``."""
    return self._init_components(key, node_id, tuple(comps))

  def _init_components(self, key: jax.Array, node_id: int, comps: tuple[str, ...]) -> Variables:
    out = {"params": {}, "batch_stats": {}}
    for comp in comps:
      k = jax.random.fold_in(jax.random.fold_in(key, node_id), COMPONENTS.index(comp))
      v = _init_module(
        self.component_def(comp, depth_of(node_id)),
        k,
        self._component_input(comp, depth_of(node_id)),
      )
      _merge_into(out, v, (comp,))
    return out

  def init(self, key: jax.Array, tree: Tree) -> Variables:
    """Variables for ``tree``: shared encoder/bottom-up (+ projection heads) and every node."""
    self.check_tree(tree)
    inputs.prng_key(key)
    return self._init(key, tree)

  def _init(self, key: jax.Array, tree: Tree) -> Variables:
    r = self.representation_dim
    h = self.bottom_up_channels
    out = {"params": {}, "batch_stats": {}}
    k_enc, k_bu, k_proj, k_nodes = jax.random.split(key, 4)
    _merge_into(
      out, _init_module(self.encoder_def(), k_enc, jnp.zeros((1,) + self.image_shape)), ("encoder",)
    )
    for j in range(1, self.num_levels):
      _merge_into(
        out,
        _init_module(
          self.bottom_up_def(j), jax.random.fold_in(k_bu, j), jnp.zeros((1, r, r, h[j - 1]))
        ),
        (f"bottom_up_{j}",),
      )
    if self.contrastive:
      for j in range(self.num_levels):
        _merge_into(
          out,
          _init_module(
            networks.ContrastiveProjection(self.act),
            jax.random.fold_in(k_proj, j),
            jnp.zeros((1, r, r, h[j])),
          ),
          (f"proj_{j}",),
        )
    for n in tree.nodes:
      _merge_into(out, self._init_components(k_nodes, n, node_components(tree, n)), (node_key(n),))
    return out

  def check_tree(self, tree: Tree):
    if not isinstance(tree, Tree):
      raise TypeError(
        f"tree must be a tree_diffusion.tree.Tree (the one load_treevae returns); "
        f"got {type(tree).__name__}"
      )
    if tree.depth > self.max_depth:
      raise ValueError(
        f"tree depth {tree.depth} exceeds the model's max depth {self.max_depth} "
        f"(one less than the {self.num_levels} bottom-up levels)"
      )

  def check_call(self, variables: Variables, tree: Tree, x=None, key=None, num=None):
    """The checks of a public entry point's arguments (see :mod:`tree_diffusion.inputs`): a
    ``Tree`` the model can hold, variables with every node of it, images of the model's shape
    in [0, 1], one PRNG key, a count ``>= 1``."""
    self.check_tree(tree)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping):
      raise TypeError(
        f"variables must be the {{'params', 'batch_stats'}} dict load_treevae "
        f"returns; got {type(variables).__name__}"
      )
    missing = [n for n in tree.nodes if node_key(n) not in params]
    if missing:
      raise ValueError(
        f"variables hold no parameters for nodes {missing} of {tree}: pass the "
        f"tree that came with these variables"
      )
    if x is not None:
      inputs.images(x, self.image_shape)
    if key is not None:
      inputs.prng_key(key)
    if num is not None:
      inputs.count(num, "num")

  # ------------------------------------------------------------------------- forward passes

  def bottom_up(self, run: Runner, x: jax.Array) -> list[jax.Array]:
    """Deterministic features ``d_0 … d_{L−1}`` (each ``[B, R, R, h_j]``)."""
    ds = [run(("encoder",), self.encoder_def(), x)]
    for j in range(1, self.num_levels):
      ds.append(run((f"bottom_up_{j}",), self.bottom_up_def(j), ds[-1]))
    return ds

  # The forward passes work depth by depth: the modules of all nodes at one depth (and of all
  # leaves' decoders) have identical shapes, so their parameters are stacked and applied with one
  # ``vmap``. The compiled graph then grows with the tree's depth, not with its number of nodes,
  # which keeps compile times flat as the tree grows and batches the small per-node matmuls.

  def latent_distributions(self, run: Runner, prefixes, depth: int, d: jax.Array, z_parents):
    """Posterior and prior ``(mu_q, var_q, mu_p, var_p)`` of nodes at one depth, ``[N, B, R, R, C]``.

    ``prefixes`` name each node's variables (``("node_5",)``). Root: ``q = N(mû, vâr)``, prior
    ``N(0, I)``. Other nodes: prior from the transformation of the parent's *sample*, posterior by
    precision-weighted merge.
    """
    mu_hat, var_hat = run.many(
      [p + (DENSE,) for p in prefixes], self.component_def(DENSE, depth), (d,), (None,)
    )
    if z_parents is None:
      return mu_hat, var_hat, jnp.zeros_like(mu_hat), jnp.ones_like(var_hat)
    mu_p, var_p = run.many(
      [p + (TRANSFORM,) for p in prefixes], self.component_def(TRANSFORM, depth), (z_parents,), (0,)
    )
    mu_q, var_q = losses.merge_gaussians(mu_hat, var_hat, mu_p, var_p)
    return mu_q, var_q, mu_p, var_p

  def latents(self, run: Runner, prefixes, depth: int, d: jax.Array, z_parents, key):
    """Posterior samples and KLs of nodes at one depth: ``[N, B, R, R, C]``, ``[N, B]``."""
    mu_q, var_q, mu_p, var_p = self.latent_distributions(run, prefixes, depth, d, z_parents)
    z = losses.sample_gaussian(jax.random.fold_in(key, depth), mu_q, var_q)
    kl = jax.vmap(losses.gaussian_kl)(mu_q, var_q, mu_p, var_p)
    return z, kl

  def router_probs(self, run: Runner, paths, depth: int, comp: str, u: jax.Array, axis):
    """``[N, B]`` probabilities of going left (``comp`` is ``P_ROUTER`` or ``Q_ROUTER``)."""
    return run.many(paths, self.component_def(comp, depth), (u,), (axis,))

  def decode(self, run: Runner, prefixes, depth: int, z: jax.Array) -> jax.Array:
    """Decoder outputs (pre-activation) for stacked latents ``[N, B, R, R, C]``."""
    return run.many(
      [p + (DECODER,) for p in prefixes], self.component_def(DECODER, depth), (z,), (0,)
    )

  def decoder_groups(self, leaves: Iterable[int]) -> list[tuple[int, ...]]:
    """Leaves whose decoders have identical shapes (same latent channels), decoded together."""
    groups: dict[int, list[int]] = {}
    for n in leaves:
      groups.setdefault(self.lz(depth_of(n)), []).append(n)
    return [tuple(g) for g in groups.values()]

  def contrastive_bottom_up(self, run: Runner, ds) -> jax.Array:
    """NT-Xent of the projection heads, averaged over the bottom-up levels."""
    terms = [
      losses.nt_xent(run((f"proj_{j}",), networks.ContrastiveProjection(self.act), d))
      for j, d in enumerate(ds)
    ]
    return sum(terms) / len(terms)

  def apply(
    self,
    variables: Variables,
    tree: Tree,
    x: jax.Array,
    key: jax.Array,
    *,
    train: bool,
    decode: bool = True,
    contrastive: bool = False,
    return_recon: bool = False,
  ):
    """The full TreeVAE forward pass.

    Args:
      variables: ``{"params", "batch_stats"}`` for ``tree``.
      tree: the static topology.
      x: images ``[B, H, W, C]`` in [0, 1].
      key: PRNG key for the latent samples: one draw per depth (``fold_in(key, depth)``) for
        all nodes of that depth (one RNG op per depth: per-node draws made XLA compile times
        explode).
      train: BatchNorm with batch statistics (and returns updated statistics).
      decode: compute the leaves' reconstructions and the reconstruction loss.
      contrastive: add the contrastive terms (the batch must be ``[view1; view2]``).
      return_recon: also return every leaf's reconstruction, ``[K, B, H, W, C]``.

    Returns:
      ``(out, batch_stats)`` where ``out`` holds per-sample terms ``rec``, ``kl_root``,
      ``kl_nodes``, ``kl_decisions`` (``[B]``), ``aug`` (scalar), ``leaf_probs`` ``[B, K]`` in
      ``tree.leaves`` order, ``z`` (node id → sample) and optionally ``recon``.
    """
    self.check_call(variables, tree, x, key)
    run = Runner(variables, train, dtype=self.dtype)
    b = x.shape[0]
    ds = self.bottom_up(run, x)
    prob = {0: jnp.ones((b,), x.dtype)}
    z = {}
    zero = jnp.zeros((b,), x.dtype)
    kl_root, kl_nodes, kl_dec, aug = zero, zero, zero, jnp.zeros((), x.dtype)
    for depth, nodes in enumerate(tree.levels):
      d = ds[self.max_depth - depth]
      z_par = None if depth == 0 else jnp.stack([z[(n - 1) // 2] for n in nodes])
      zs, kls = self.latents(run, [(node_key(n),) for n in nodes], depth, d, z_par, key)
      for i, n in enumerate(nodes):
        z[n] = zs[i]
        if n == 0:
          kl_root = jnp.clip(kls[i], -1.0, 1000.0)
        else:
          kl_nodes = kl_nodes + jnp.clip(prob[n] * kls[i], -1.0, 1000.0)
      internal = tuple(n for n in nodes if tree.is_internal(n))
      if internal:
        idx = [nodes.index(n) for n in internal]
        pi_p = self.router_probs(
          run, [(node_key(n), P_ROUTER) for n in internal], depth, P_ROUTER, zs[jnp.array(idx)], 0
        )
        pi_q = self.router_probs(
          run, [(node_key(n), Q_ROUTER) for n in internal], depth, Q_ROUTER, d, None
        )
        for i, n in enumerate(internal):
          kl_dec = kl_dec + prob[n] * losses.bernoulli_kl(pi_q[i], pi_p[i])
          if contrastive:
            aug = aug + losses.router_infonce(pi_q[i], prob[n])
        route(tree, prob, internal, pi_q)
      route(tree, prob, [n for n in nodes if tree.is_passthrough(n)], None)
    rec = zero
    recon = {}
    if decode:
      for group in self.decoder_groups(tree.leaves):
        outs = self.decode(
          run, [(node_key(n),) for n in group], depth_of(group[0]), jnp.stack([z[n] for n in group])
        )
        rec_g = jax.vmap(lambda o: losses.reconstruction_loss(x, o, self.output))(outs)  # [N, B]
        for i, n in enumerate(group):
          rec = rec + prob[n] * rec_g[i]
          if return_recon:
            recon[n] = losses.output_image(outs[i], self.output)
    # The bottom-up NT-Xent term only while the root routes between two children, as in the
    # reference (which computes it with the root's router): none for a root-only tree or a root
    # that pruning left with one child.
    if contrastive and tree.is_internal(0):
      aug = aug + self.contrastive_bottom_up(run, ds)
    result = dict(
      rec=rec,
      kl_root=kl_root,
      kl_nodes=kl_nodes,
      kl_decisions=kl_dec,
      aug=aug,
      leaf_probs=jnp.stack([prob[n] for n in tree.leaves], axis=1),
      z=z,
    )
    if return_recon:
      result["recon"] = jnp.stack([recon[n] for n in tree.leaves])
    return result, run.batch_stats()

  def path_log_weights(
    self, variables: Variables, tree: Tree, x: jax.Array, key: jax.Array, details: bool = False
  ):
    """Log importance weights of one posterior sample, per leaf (eval-mode BatchNorm).

    Every node's latent is drawn from the posterior as in :meth:`apply`; for leaf ``k`` with
    root-to-leaf path ``P_k`` the weight is::

        log w_k = log p(x | z_k) + log p(z_0) − log q(z_0 | x)
                  + Σ_{i → j on P_k} [log p(c_j | z_i) + log p(z_j | z_i) − log q(z_j | z_i, x)]

    with ``p(c_j | z_i)`` the p-router's probability of taking the edge (1 through passthrough
    nodes). ``logsumexp_k log w_k`` is an unbiased (in ``exp``) estimate of ``p(x)`` in which
    the discrete path is summed out exactly instead of sampled (see :mod:`tree_diffusion.eval.
    likelihood`). Gaussians use ``var + EPS`` as everywhere in the model. ``p(x | z)`` is the
    decoder's Bernoulli for ``sigmoid`` outputs and ``N(x; out, ½ I)`` for ``mse`` ones, the
    density whose negative log is the training loss ``Σ (out − x)²`` plus ``(D/2) log π``.

    Returns:
      ``[B, K]`` (columns in ``tree.leaves`` order), or ``(log_w, parts)`` with ``details``:
      ``parts`` holds per node ``z``, ``mu_q``, ``var_q``, ``mu_p``, ``var_p``, per internal node
      ``pi_p`` and per leaf the decoder output ``out`` (for independent checks).
    """
    self.check_call(variables, tree, x, key)
    run = Runner(variables, train=False, dtype=self.dtype)
    ds = self.bottom_up(run, x)
    acc, edge, parts = {}, {0: 0.0}, {}
    for depth, nodes in enumerate(tree.levels):
      d = ds[self.max_depth - depth]
      z_par = None if depth == 0 else jnp.stack([parts[(n - 1) // 2]["z"] for n in nodes])
      mu_q, var_q, mu_p, var_p = self.latent_distributions(
        run, [(node_key(n),) for n in nodes], depth, d, z_par
      )
      zs = losses.sample_gaussian(jax.random.fold_in(key, depth), mu_q, var_q)
      ratio = jax.vmap(losses.gaussian_log_density)(zs, mu_p, var_p) - jax.vmap(
        losses.gaussian_log_density
      )(zs, mu_q, var_q)  # [N, B]
      for i, n in enumerate(nodes):
        parts[n] = dict(z=zs[i], mu_q=mu_q[i], var_q=var_q[i], mu_p=mu_p[i], var_p=var_p[i])
        acc[n] = (0.0 if n == 0 else acc[(n - 1) // 2]) + edge[n] + ratio[i]
      internal = tuple(n for n in nodes if tree.is_internal(n))
      if internal:
        pi_p = self.router_probs(
          run,
          [(node_key(n), P_ROUTER) for n in internal],
          depth,
          P_ROUTER,
          jnp.stack([parts[n]["z"] for n in internal]),
          0,
        )
        for i, n in enumerate(internal):
          parts[n]["pi_p"] = pi_p[i]
          edge[2 * n + 1] = jnp.log(jnp.maximum(pi_p[i], 1e-30))
          edge[2 * n + 2] = jnp.log(jnp.maximum(1.0 - pi_p[i], 1e-30))
      for n in nodes:
        if tree.is_passthrough(n):
          edge[tree.children(n)[0]] = 0.0
    for group in self.decoder_groups(tree.leaves):
      outs = self.decode(
        run,
        [(node_key(n),) for n in group],
        depth_of(group[0]),
        jnp.stack([parts[n]["z"] for n in group]),
      )
      for i, n in enumerate(group):
        parts[n]["out"] = outs[i]
        acc[n] = acc[n] + losses.log_likelihood(x, outs[i], self.output)
    log_w = jnp.stack([acc[n] for n in tree.leaves], axis=1)
    return (log_w, parts) if details else log_w

  # Small-tree (growing) phase. The frozen tree and the new split are two functions: the
  # split's step then depends only on the depth of the split node, so it compiles once per depth
  # instead of once per split, and its gradients never touch the frozen tree.

  def frozen_path(
    self, variables: Variables, tree: Tree, parent: int, x: jax.Array, key: jax.Array
  ) -> dict:
    """The frozen tree's inputs to the split under ``parent`` (eval-mode BatchNorm, sampled z).

    Returns:
      dict with ``d_parent`` and ``d_child`` (bottom-up features read by the split node and its
      children), ``z_parent`` (sample of the split node) and ``prob`` (its path probability, ``[B]``).
    """
    run = Runner(variables, train=False, dtype=self.dtype)
    ds = self.bottom_up(run, x)
    prob = jnp.ones((x.shape[0],), x.dtype)
    z = None
    path = tree.path(parent)
    for n, child in zip(path, path[1:] + (None,)):
      depth = depth_of(n)
      d = ds[self.max_depth - depth]
      z = self.latents(run, [(node_key(n),)], depth, d, None if z is None else z[None], key)[0][0]
      if child is not None and tree.is_internal(n):
        pi_q = self.router_probs(run, [(node_key(n), Q_ROUTER)], depth, Q_ROUTER, d, None)[0]
        prob = prob * (pi_q if child == 2 * n + 1 else 1.0 - pi_q)
    k = depth_of(parent)
    return dict(
      d_parent=ds[self.max_depth - k], d_child=ds[self.max_depth - k - 1], z_parent=z, prob=prob
    )

  def apply_split(
    self,
    variables: Variables,
    depth: int,
    x: jax.Array,
    frozen: dict,
    key: jax.Array,
    *,
    train: bool,
    contrastive: bool = False,
  ):
    """Loss terms of a new 2-leaf subtree under a node at ``depth``.

    Args:
      variables: the split's own variables, ``{"params": {"p_router", "q_router", "left",
        "right"}, "batch_stats": …}`` (see :func:`split_variables`).
      depth: depth of the split node.
      x: the images ``[B, H, W, C]``.
      frozen: the output of :meth:`frozen_path`.
      key: PRNG key of the children's latent samples.
      train: BatchNorm with batch statistics.
      contrastive: add the router InfoNCE of the split.
    """
    run = Runner(variables, train, dtype=self.dtype)
    prob, z_par = frozen["prob"], frozen["z_parent"]
    pi_p = self.router_probs(run, [(P_ROUTER,)], depth, P_ROUTER, z_par[None], 0)[0]
    pi_q = self.router_probs(run, [(Q_ROUTER,)], depth, Q_ROUTER, frozen["d_parent"], None)[0]
    kl_dec = prob * losses.bernoulli_kl(pi_q, pi_p)
    p_c = jnp.stack([prob * pi_q, prob * (1.0 - pi_q)])  # [2, B]
    sides = [("left",), ("right",)]
    zs, kls = self.latents(run, sides, depth + 1, frozen["d_child"], jnp.stack([z_par, z_par]), key)
    outs = self.decode(run, sides, depth + 1, zs)
    rec_c = jax.vmap(lambda o: losses.reconstruction_loss(x, o, self.output))(outs)
    aug = losses.router_infonce(pi_q, prob) if contrastive else jnp.zeros((), x.dtype)
    b = x.shape[0]
    # No per-sample clip of the children's KLs in the small tree.
    result = dict(
      rec=(p_c * rec_c).sum(0),
      kl_root=jnp.zeros((b,), x.dtype),
      kl_nodes=(p_c * kls).sum(0),
      kl_decisions=kl_dec,
      aug=aug,
      leaf_probs=p_c.T,
    )
    return result, run.batch_stats()

  def leaf_probabilities(self, variables: Variables, tree: Tree, x: jax.Array) -> jax.Array:
    """``[B, K]`` soft cluster assignments: products of q-router decisions (eval mode, no sampling).

    ``x``: images ``[B, H, W, C]`` in [0, 1] (floats; see :mod:`tree_diffusion.inputs`).
    """
    self.check_call(variables, tree, x)
    run = Runner(variables, train=False, dtype=self.dtype)
    ds = self.bottom_up(run, x)
    prob = {0: jnp.ones((x.shape[0],), x.dtype)}
    for depth, nodes in enumerate(tree.levels):
      internal = tuple(n for n in nodes if tree.is_internal(n))
      if internal:
        pi_q = self.router_probs(
          run,
          [(node_key(n), Q_ROUTER) for n in internal],
          depth,
          Q_ROUTER,
          ds[self.max_depth - depth],
          None,
        )
        route(tree, prob, internal, pi_q)
      route(tree, prob, [n for n in nodes if tree.is_passthrough(n)], None)
    return jnp.stack([prob[n] for n in tree.leaves], axis=1)

  def generate(
    self, variables: Variables, tree: Tree, key: jax.Array, num: int, decode: bool = True
  ):
    """Prior samples: root ``z ~ N(0, I)``, children from their priors, p-router routing.

    Returns:
      dict with ``images`` ``[K, num, H, W, C]`` (every leaf decoded; ``None`` when not
      ``decode``), ``leaf_probs`` ``[num, K]`` (products of p-router decisions) and ``z`` (node
      id → latent sample).
    """
    self.check_call(variables, tree, key=key, num=num)
    if decode:
      inputs.fits_memory(
        4 * tree.num_leaves * num * int(np.prod(self.image_shape)),
        f"generate(num={num}): images [{tree.num_leaves}, {num}, "
        f"{', '.join(map(str, self.image_shape))}]",
        "generate in smaller batches (fold_in the key per batch)",
      )
    run = Runner(variables, train=False, dtype=self.dtype)
    z = {0: jax.random.normal(jax.random.fold_in(key, 0), (num,) + self.latent_shape(0))}
    key = jax.random.fold_in(key, 1)
    prob = {0: jnp.ones((num,), jnp.float32)}
    for depth, nodes in enumerate(tree.levels):
      if depth > 0:
        mu_p, var_p = run.many(
          [(node_key(n), TRANSFORM) for n in nodes],
          self.component_def(TRANSFORM, depth),
          (jnp.stack([z[(n - 1) // 2] for n in nodes]),),
          (0,),
        )
        zs = losses.sample_gaussian(jax.random.fold_in(key, depth), mu_p, var_p)
        z.update({n: zs[i] for i, n in enumerate(nodes)})
      internal = tuple(n for n in nodes if tree.is_internal(n))
      if internal:
        pi_p = self.router_probs(
          run,
          [(node_key(n), P_ROUTER) for n in internal],
          depth,
          P_ROUTER,
          jnp.stack([z[n] for n in internal]),
          0,
        )
        route(tree, prob, internal, pi_p)
      route(tree, prob, [n for n in nodes if tree.is_passthrough(n)], None)
    leaf_probs = jnp.stack([prob[n] for n in tree.leaves], 1)
    if not decode:
      return dict(images=None, leaf_probs=leaf_probs, z=z)
    images = {}
    for group in self.decoder_groups(tree.leaves):
      outs = self.decode(
        run, [(node_key(n),) for n in group], depth_of(group[0]), jnp.stack([z[n] for n in group])
      )
      images.update({n: losses.output_image(outs[i], self.output) for i, n in enumerate(group)})
    return dict(images=jnp.stack([images[n] for n in tree.leaves]), leaf_probs=leaf_probs, z=z)


# ----------------------------------------------------------------------------------- helpers


def _init_module(module: nn.Module, key: jax.Array, x: jax.Array) -> Variables:
  """Variables of one module with PyTorch's default initialisation, drawn with NumPy.

  Shapes come from ``jax.eval_shape`` (a trace, no compilation); values from a NumPy generator
  seeded by the JAX key and the parameter's path. A tree has hundreds of small arrays of distinct
  shapes and ``jax.random`` compiles a kernel per shape: eager Flax initialisation took ~30 s on
  CPU, this takes milliseconds. Weights (``kernel``) are uniform(±1/sqrt(fan_in)) as PyTorch's
  Kaiming-uniform(a=√5); transposed convolutions (``convt*``, ``up*``) take their fan-in from the
  output channels, as PyTorch does; biases and BatchNorm shifts are 0, BatchNorm scales 1, running
  statistics (0, 1).
  """
  kwargs = {} if isinstance(module, networks.GaussianHead) else {"train": False}
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, **kwargs))
  seed = [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]

  def fill(path, leaf):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    shape, name = leaf.shape, names[-1]
    if names[0] == "batch_stats":
      return jnp.zeros(shape, leaf.dtype) if name == "mean" else jnp.ones(shape, leaf.dtype)
    if name == "scale":
      return jnp.ones(shape, leaf.dtype)
    if name != "kernel":
      return jnp.zeros(shape, leaf.dtype)
    transposed = any(n.startswith(("convt", "up")) for n in names[:-1])
    fan_in = int(np.prod(shape[:-2])) * (shape[-1] if transposed else shape[-2])
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    rng = np.random.default_rng(seed + [zlib.crc32("/".join(names).encode())])
    return jnp.asarray(rng.uniform(-bound, bound, shape), leaf.dtype)

  v = jax.tree_util.tree_map_with_path(fill, dict(shapes))
  return {col: copy_dicts(dict(tree)) for col, tree in v.items()}


def _merge_into(out: Variables, v, path: tuple[str, ...]):
  for col in ("params", "batch_stats"):
    if col in v and v[col]:
      node = out.setdefault(col, {})
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node.setdefault(path[-1], {}).update(copy_dicts(dict(v[col])))


def route(tree: Tree, prob: dict, nodes, pi) -> None:
  """Passes path probabilities one level down, in place: an internal node's children get
  ``prob[n] · π`` (left) and ``prob[n] · (1 − π)`` (right), with ``pi`` the nodes' router
  probabilities (in ``nodes`` order); a pass-through node's (``pi`` None) only child gets
  ``prob[n]``."""
  for i, n in enumerate(nodes):
    if pi is None:
      prob[tree.children(n)[0]] = prob[n]
    else:
      prob[2 * n + 1] = prob[n] * pi[i]
      prob[2 * n + 2] = prob[n] * (1.0 - pi[i])


# ----------------------------------------------------------------------------------- surgery


def grow_variables(
  model: TreeVAE, variables: Variables, tree: Tree, leaf: int, key: jax.Array
) -> tuple[Tree, Variables]:
  """Grows ``leaf`` into an internal node with two fresh leaves; old parameters are untouched.

  The leaf loses its decoder and gains fresh routers; its children get fresh transformation,
  bottom-up head and decoder.
  """
  new_tree = tree.grow(leaf)
  model.check_tree(new_tree)
  out = copy_dicts(variables)
  for col in out:
    out[col].get(node_key(leaf), {}).pop(DECODER, None)
  _merge_into(out, model.init_components(key, leaf, (P_ROUTER, Q_ROUTER)), (node_key(leaf),))
  for c in new_tree.children(leaf):
    _merge_into(out, model.init_components(key, c, node_components(new_tree, c)), (node_key(c),))
  return new_tree, out


def _split_layout(tree: Tree, parent: int):
  """Pairs (path in the split's own pytree, path in the tree's variables) of a split."""
  left, right = tree.children(parent)
  return [((comp,), (node_key(parent), comp)) for comp in (P_ROUTER, Q_ROUTER)] + [
    (("left",), (node_key(left),)),
    (("right",), (node_key(right),)),
  ]


def split_variables(variables: Variables, tree: Tree, parent: int) -> Variables:
  """The variables of the split under ``parent`` as their own pytree (for :meth:`apply_split`)."""
  out = {}
  for col, v in variables.items():
    out[col] = {}
    for (own,), tree_path in _split_layout(tree, parent):
      value = get_path(v, tree_path)
      if value is not None:
        out[col][own] = value
  return out


def frozen_path_variables(variables: Variables, tree: Tree, parent: int) -> Variables:
  """What :meth:`TreeVAE.frozen_path` reads: shared networks and the nodes on the path to ``parent``.

  The split's own variables (``parent``'s routers, its children) are left out, so the frozen
  inputs never alias the arrays that the split's train step updates (and donates).
  """
  on_path = {node_key(n) for n in tree.path(parent)}
  out = {}
  for col, v in variables.items():
    out[col] = {}
    for k, val in v.items():
      if not k.startswith("node_"):
        out[col][k] = val
      elif k in on_path:
        drop = (P_ROUTER, Q_ROUTER) if k == node_key(parent) else ()
        out[col][k] = {c: x for c, x in val.items() if c not in drop}
  return out


def merge_split_variables(
  variables: Variables, tree: Tree, parent: int, split: Variables
) -> Variables:
  """Writes a trained split back into the tree's variables (inverse of :func:`split_variables`)."""
  out = copy_dicts(variables)
  for col, v in split.items():
    for (own,), tree_path in _split_layout(tree, parent):
      if own in v:
        node = out[col]
        for p in tree_path[:-1]:
          node = node.setdefault(p, {})
        node[tree_path[-1]] = v[own]
  return out


def prune_variables(variables: Variables, new_tree: Tree) -> Variables:
  """Drops the variables of removed nodes and the routers of nodes that became passthrough."""
  out = {}
  for col, tree_vars in variables.items():
    out[col] = {}
    for k, v in tree_vars.items():
      if not k.startswith("node_"):
        out[col][k] = v
        continue
      n = int(k[len("node_") :])
      if n in new_tree:
        keep = set(node_components(new_tree, n))
        kept = {c: cv for c, cv in v.items() if c in keep}
        if kept:  # a node left with nothing in a collection has no entry, as init gives it
          out[col][k] = kept
  return out


def check_variables(tree: Tree, variables: Variables):
  """Raises if the node variables do not match the tree (missing or extra components)."""
  params = variables["params"]
  for n in tree.nodes:
    have = set(params.get(node_key(n), {}))
    want = set(node_components(tree, n))
    if have != want:
      raise ValueError(f"node {n}: variables hold {sorted(have)}, the tree needs {sorted(want)}")
  extra = {k for k in params if k.startswith("node_")} - {node_key(n) for n in tree.nodes}
  if extra:
    raise ValueError(f"variables hold nodes not in the tree: {sorted(extra)}")
