"""The frozen stage-1 TreeVAE as stage 2 sees it (``treediffusion.md`` §2).

Both passes run the TreeVAE in eval mode (running BatchNorm statistics) under ``stop_gradient``;
its variables are an input, never part of stage 2's optimiser. Latents are still *sampled* (the
reference samples them in eval mode too), so the condition changes from step to step.

The ``per_example`` variants draw each example's randomness from its own key: a sample then
depends only on (seed, example id), not on the batch it was computed in or on the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tree_diffusion.diffusion.conditioning import stack_latents
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE


def posterior(model: TreeVAE, tree: Tree, variables, x: jax.Array, key: jax.Array, decode: bool):
  """``(z_all [B, N, z_dim], leaf_probs [B, K], leaf_images [K, B, H, W, C] | None)`` for images
  ``x`` in [0, 1]: posterior latent samples, q-router leaf probabilities and leaf decodings."""
  out, _ = model.apply(variables, tree, x, key, train=False, decode=decode, return_recon=decode)
  out = jax.lax.stop_gradient(out)
  return stack_latents(out["z"], tree.nodes), out["leaf_probs"], out.get("recon")


def prior(model: TreeVAE, tree: Tree, variables, key: jax.Array, num: int, decode: bool):
  """As :func:`posterior` for ``num`` prior samples (p-router leaf probabilities)."""
  out = jax.lax.stop_gradient(model.generate(variables, tree, key, num, decode=decode))
  return stack_latents(out["z"], tree.nodes), out["leaf_probs"], out["images"]


def posterior_per_example(model, tree, variables, x, keys, decode):
  """:func:`posterior` with one key per example (``keys`` ``[B]``)."""
  fn = lambda xi, k: posterior(model, tree, variables, xi[None], k, decode)
  z, p, img = jax.vmap(fn)(x, keys)
  return z[:, 0], p[:, 0], None if img is None else jnp.swapaxes(img[:, :, 0], 0, 1)


def prior_per_example(model, tree, variables, keys, decode):
  """:func:`prior` with one key per example (``keys`` ``[B]``, one sample each)."""
  z, p, img = jax.vmap(lambda k: prior(model, tree, variables, k, 1, decode))(keys)
  return z[:, 0], p[:, 0], None if img is None else jnp.swapaxes(img[:, :, 0], 0, 1)
