"""The stage-2 train step: the path-conditioned denoiser's loss and one optimiser step.

Each step runs the frozen TreeVAE on the batch (posterior samples, q-router leaf probabilities),
draws one leaf per sample from those probabilities, builds the condition, noises the images at a
uniform ``t`` and regresses ε (L2, or L1; or x0 or v, see ``process.py``). Adam with a linear
warm-up from 0, global-norm clipping and the EMA update all happen inside one jitted step that
donates the train state. :mod:`tree_diffusion.diffusion.train` runs it; the benchmark times it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tree_diffusion import xla_options
from tree_diffusion.diffusion import frozen
from tree_diffusion.diffusion.conditioning import Denoiser, PathTables, make_condition
from tree_diffusion.diffusion.state import DiffusionState, StepConfig, make_optimizer
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE


def diffusion_loss(params, denoiser: Denoiser, cfg: StepConfig, x0, cond, t, eps, dropout_key):
  """Mean over all elements of ``|y − ŷ|²`` (or ``|·|``) at ``x_t = sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε``
  (+ the image condition for form2), ``y`` the process's target (ε, x0 or v); ``x0`` and the
  image condition are already in the chain's space (:meth:`Process.encode`)."""
  ab = jnp.asarray(cfg.process.alpha_bar(), jnp.float32)[t][:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
  if denoiser.conditioning.form2:
    x_t = x_t + cond["image"]
  pred = denoiser.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": dropout_key})
  err = pred - cfg.process.target(x0, eps, ab)
  return jnp.mean(err**2) if cfg.loss == "l2" else jnp.mean(jnp.abs(err))


@xla_options.conv_net_jit(static_argnames=("denoiser", "model", "tree", "cfg"), donate_argnums=0)
def train_step(
  state: DiffusionState,
  tvae_vars,
  images: jax.Array,
  key: jax.Array,
  *,
  denoiser: Denoiser,
  model: TreeVAE,
  tree: Tree,
  cfg: StepConfig,
):
  """One optimiser step on a batch of images in [0, 1]; returns ``(state, metrics)``."""
  b = images.shape[0]
  keys = jax.random.split(jax.random.fold_in(key, state.step), 6)
  cond_kind = denoiser.conditioning
  proc = cfg.process
  z_all, probs, leaf_images = frozen.posterior(
    model, tree, tvae_vars, images, keys[0], decode=cond_kind.image is not None
  )
  if leaf_images is not None:
    leaf_images = proc.encode(leaf_images)
  leaf = jax.random.categorical(keys[1], jnp.log(jnp.maximum(probs, 1e-30))).astype(jnp.int32)
  keep = (jax.random.uniform(keys[2], (b,)) >= cfg.cfg_drop_rate) if cfg.cfg_drop_rate else None
  cond = make_condition(cond_kind, PathTables.from_tree(tree), z_all, leaf, leaf_images, keep)
  t = jax.random.randint(keys[3], (b,), 0, proc.T)
  eps = jax.random.normal(keys[4], images.shape, jnp.float32)
  loss, grads = jax.value_and_grad(diffusion_loss)(
    state.params, denoiser, cfg, proc.encode(images), cond, t, eps, keys[5]
  )
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  d = cfg.ema_decay
  ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
  return DiffusionState(
    step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
  ), metrics
