"""The stage-2 train state (parameters, their EMA, Adam), its static step settings and the
abstract state a checkpoint is restored into.

Training builds the state; sampling and evaluation only restore it, so it lives below
``train.py``: a reader of checkpoints never imports training code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tree_diffusion.diffusion.conditioning import Denoiser, PathTables, make_condition
from tree_diffusion.diffusion.process import Process
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE

PyTree = Any
LOSSES = ("l2", "l1")


@flax.struct.dataclass
class DiffusionState:
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable)."""

  process: Process = Process()
  loss: str = "l2"
  lr: float = 2e-4
  warmup_steps: int = 5000
  grad_clip: float = 1.0
  ema_decay: float = 0.9999
  cfg_drop_rate: float = 0.0

  @classmethod
  def from_config(cls, c) -> "StepConfig":
    if c.loss not in LOSSES:
      raise ConfigError(f"unknown diffusion loss {c.loss!r}; use one of {LOSSES}")
    if not 0.0 <= c.cfg_drop_rate < 1.0:
      raise ConfigError(f"diffusion.cfg_drop_rate must be in [0, 1), got {c.cfg_drop_rate}")
    return cls(
      process=Process.from_config(c),
      loss=c.loss,
      lr=c.lr,
      warmup_steps=c.warmup_steps,
      grad_clip=c.grad_clip,
      ema_decay=c.ema_decay,
      cfg_drop_rate=c.cfg_drop_rate,
    )


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  """Clip by global norm, then Adam at ``lr · min(step / warmup, 1)`` (the first update uses 0)."""
  warm = max(cfg.warmup_steps, 1)
  lr = lambda count: cfg.lr * jnp.minimum(count / warm, 1.0) if cfg.warmup_steps else cfg.lr
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(lr))


def learning_rate(cfg: StepConfig, count: int) -> float:
  """The schedule of :func:`make_optimizer` on the host: the rate of the update that takes the
  state from step ``count`` to ``count + 1``."""
  if not cfg.warmup_steps:
    return float(cfg.lr)
  return float(cfg.lr * min(count / cfg.warmup_steps, 1.0))


def init_state(
  denoiser: Denoiser, cfg: StepConfig, key: jax.Array, example_cond: dict, image_shape
) -> DiffusionState:
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  init = jax.jit(
    lambda k: denoiser.init({"params": k, "dropout": k}, x, t, example_cond, train=False)["params"]
  )
  params = init(key)
  return DiffusionState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree_util.tree_map(jnp.copy, params),
    opt_state=make_optimizer(cfg).init(params),
  )


def example_condition(denoiser: Denoiser, model: TreeVAE, tree: Tree) -> dict:
  """A batch-1 condition with the right shapes (for ``init``)."""
  tables = PathTables.from_tree(tree)
  z_dim = max(int(np.prod(model.latent_shape(d))) for d in range(tree.depth + 1))
  z_all = jnp.zeros((1, len(tree.nodes), z_dim), jnp.float32)
  images = jnp.zeros((tree.num_leaves, 1) + model.image_shape, jnp.float32)
  return make_condition(denoiser.conditioning, tables, z_all, jnp.zeros((1,), jnp.int32), images)


def abstract_state(denoiser: Denoiser, cfg: StepConfig, model: TreeVAE, tree: Tree):
  cond = example_condition(denoiser, model, tree)
  return jax.eval_shape(
    lambda: init_state(denoiser, cfg, jax.random.key(0), cond, model.image_shape)
  )
