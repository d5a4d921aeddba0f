"""Stage-1 steps: the TreeVAE built from the config, the train state, and the jitted steps.

The steps are pure functions of ``(state, images, key, alpha, lr)`` jitted with the model, the tree
and a small :class:`StepConfig` as static arguments, so XLA retraces only when the tree (or the
phase kind) changes. :mod:`tree_diffusion.treevae.train` runs them in its schedule; the benchmark
times them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from tree_diffusion import augment as augment_lib
from tree_diffusion.loop import TrainState
from tree_diffusion.tree import Tree, depth_of
from tree_diffusion.treevae.model import TreeVAE, frozen_path_variables

PyTree = Any


def initial_tree(config) -> Tree:
  return Tree.complete(config.stage1.initial_depth)


def make_model(config) -> TreeVAE:
  c = config.stage1
  contrastive = bool(c.augment) and "instancewise_full" in c.augmentation_method
  return TreeVAE(
    encoder=config.treevae.encoder,
    image_size=config.data.image_size,
    channels=config.data.channels,
    latent_channels=tuple(config.treevae.latent_channels),
    bottom_up_channels=tuple(config.treevae.bottom_up_channels),
    representation_dim=config.treevae.representation_dim,
    res_connections=config.treevae.res_connections,
    act=config.treevae.act,
    output=config.treevae.output,
    dropout_router=config.treevae.dropout_router,
    contrastive=contrastive,
    dtype=c.dtype,
  )


def step_config(c) -> StepConfig:
  """The train step's static settings from the config's ``stage1`` section."""
  contrastive = bool(c.augment) and "InfoNCE" in c.augmentation_method
  aug = augment_lib.get(c.augmentation) if c.augment else None
  return StepConfig(
    weight_decay=c.weight_decay,
    contrastive=contrastive,
    aug_weight=c.aug_decisions_weight,
    augment=aug,
  )


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a train step (hashable: part of the jit cache key)."""

  weight_decay: float = 1e-5
  contrastive: bool = False  # [view1; view2] batches and the contrastive terms
  aug_weight: float = 1.0
  augment: augment_lib.AugmentConfig | None = None


# --------------------------------------------------------------------------------- optimiser


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  """Adam with coupled L2 (PyTorch ``Adam(weight_decay=…)``); the step applies the learning rate.

  It runs on the flattened parameter vector (see :func:`_apply_gradients`).
  """
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_adam())


def init_state(variables, cfg: StepConfig) -> TrainState:
  """A fresh train state (new optimiser, as every phase of the reference starts with)."""
  # Copies: the steps donate their state, which must not delete the caller's arrays.
  params = jax.tree_util.tree_map(jnp.copy, variables["params"])
  batch_stats = jax.tree_util.tree_map(jnp.copy, variables["batch_stats"])
  flat, _ = jax.flatten_util.ravel_pytree(params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=make_optimizer(cfg).init(flat),
  )


# --------------------------------------------------------------------------------- steps


def loss_terms(out: dict, alpha, aug_weight: float) -> dict:
  """Batch-mean ELBO terms and the total; ``alpha`` is the KL-annealing weight."""
  terms = dict(
    rec=out["rec"].mean(),
    kl_root=out["kl_root"].mean(),
    kl_nodes=jnp.clip(out["kl_nodes"].mean(), -10.0, 1e10),
    kl_decisions=out["kl_decisions"].mean(),
    aug=aug_weight * out["aug"],
  )
  terms["loss"] = (
    terms["rec"]
    + alpha * (terms["kl_root"] + terms["kl_nodes"] + terms["kl_decisions"])
    + terms["aug"]
  )
  return terms


def _inputs(images: jax.Array, key: jax.Array, cfg: StepConfig) -> jax.Array:
  """The batch the model sees: two augmented views, one augmented view, or the images."""
  if cfg.contrastive:
    return augment_lib.two_views(key, images, cfg.augment)
  if cfg.augment is not None:
    return augment_lib.augment(key, images, cfg.augment)
  return images


def _apply_gradients(state: TrainState, grads, stats, lr, cfg: StepConfig) -> TrainState:
  # The optimiser works on one flat vector: a tree has hundreds of small parameter arrays, and
  # per-array update ops made XLA compile thousands of tiny fusions.
  flat_params, unravel = jax.flatten_util.ravel_pytree(state.params)
  flat_grads, _ = jax.flatten_util.ravel_pytree(grads)
  updates, opt_state = make_optimizer(cfg).update(flat_grads, state.opt_state, flat_params)
  return TrainState(
    step=state.step + 1,
    params=unravel(flat_params - lr * updates),
    batch_stats=stats,
    opt_state=opt_state,
  )


def _train_step(
  state: TrainState,
  images: jax.Array,
  key: jax.Array,
  alpha,
  lr,
  *,
  model: TreeVAE,
  tree: Tree,
  cfg: StepConfig,
):
  """One step of full-tree training (initial, intermediate and fine-tuning phases)."""
  key = jax.random.fold_in(key, state.step)
  aug_key, z_key = jax.random.split(key)
  x = _inputs(images, aug_key, cfg)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, stats = model.apply(variables, tree, x, z_key, train=True, contrastive=cfg.contrastive)
    terms = loss_terms(out, alpha, cfg.aug_weight)
    return terms["loss"], (terms, stats)

  (_, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  terms["grad_norm"] = optax.global_norm(grads)
  return _apply_gradients(state, grads, stats, lr, cfg), terms


def _frozen_inputs(
  frozen_variables,
  images: jax.Array,
  key: jax.Array,
  step,
  *,
  model: TreeVAE,
  tree: Tree,
  parent: int,
  cfg: StepConfig,
):
  """The small-tree batch and the frozen tree's part of it (eval-mode BatchNorm, sampled z)."""
  aug_key, frozen_key = jax.random.split(jax.random.fold_in(key, step))
  x = _inputs(images, aug_key, cfg)
  return x, model.frozen_path(frozen_variables, tree, parent, x, frozen_key)


def _split_step(
  state: TrainState,
  x: jax.Array,
  frozen: dict,
  key: jax.Array,
  alpha,
  lr,
  *,
  model: TreeVAE,
  depth: int,
  cfg: StepConfig,
):
  """One update of the split's own variables (``state``), given the frozen tree's outputs."""
  z_key = jax.random.fold_in(jax.random.fold_in(key, state.step), 1)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, stats = model.apply_split(
      variables, depth, x, frozen, z_key, train=True, contrastive=cfg.contrastive
    )
    terms = loss_terms(out, alpha, cfg.aug_weight)
    return terms["loss"], (terms, stats)

  (_, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  terms["grad_norm"] = optax.global_norm(grads)
  return _apply_gradients(state, grads, stats, lr, cfg), terms


train_step = jax.jit(_train_step, static_argnames=("model", "tree", "cfg"), donate_argnums=0)
# The small-tree step is two jitted functions: the frozen tree's forward (compiled per split) and
# the update of the split (compiled once per depth of the split node, shared by all splits there).
frozen_inputs = jax.jit(_frozen_inputs, static_argnames=("model", "tree", "parent", "cfg"))
_split_update = jax.jit(_split_step, static_argnames=("model", "depth", "cfg"), donate_argnums=0)


def split_step(
  state: TrainState,
  frozen_variables,
  images: jax.Array,
  key: jax.Array,
  alpha,
  lr,
  *,
  model: TreeVAE,
  tree: Tree,
  parent: int,
  cfg: StepConfig,
):
  """One small-tree step: only the split's own variables (``state``) train.

  The frozen tree runs in eval mode with sampled latents and is never differentiated; the split's
  parameters are their own pytree, so the frozen tree has no optimiser state and cannot move —
  the effect of an optax mask, without computing or storing anything for the frozen part.
  """
  x, frozen = frozen_inputs(
    frozen_path_variables(frozen_variables, tree, parent),
    images,
    key,
    state.step,
    model=model,
    tree=tree,
    parent=parent,
    cfg=cfg,
  )
  return _split_update(
    state,
    x,
    frozen,
    key,
    alpha,
    lr,
    model=model,
    depth=_canonical_split_depth(model, depth_of(parent)),
    cfg=cfg,
  )


def _canonical_split_depth(model: TreeVAE, depth: int) -> int:
  """The shallowest depth whose split has the same layer sizes (so it shares a compile)."""
  sizes = lambda k: (model.h(k), model.lz(k), model.h(k + 1), model.lz(k + 1))
  return min(k for k in range(depth + 1) if sizes(k) == sizes(depth))


@functools.partial(jax.jit, static_argnames=("model", "tree"))
def eval_terms(variables, images, key, *, model: TreeVAE, tree: Tree):
  """Per-sample negative-ELBO terms at α = 1 (eval mode), and leaf probabilities."""
  out, _ = model.apply(variables, tree, images, key, train=False)
  nelbo = out["rec"] + out["kl_root"] + out["kl_nodes"] + out["kl_decisions"]
  return dict(rec=out["rec"], nelbo=nelbo), out["leaf_probs"]
