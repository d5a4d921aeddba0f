"""The frozen stage-1 TreeVAE as stage 2 sees it: the export loaded
after checking it against the config, and the two passes stage 2 runs through it.

Both passes run the TreeVAE in eval mode (running BatchNorm statistics) under ``stop_gradient``;
its variables are an input, never part of stage 2's optimiser. Latents are still *sampled* (the
reference samples them in eval mode too), so the condition changes from step to step.

The ``per_example`` variants draw each example's randomness from its own key: a sample then
depends only on (seed, example id), not on the batch it was computed in or on the device count.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion.diffusion.conditioning import stack_latents
from tree_diffusion.errors import ConfigError
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.model import TreeVAE


# ---------------------------------------------------------------------- loading the export


def export_path(diffusion_config, workdir: str) -> str:
  """The stage-1 export stage 2 conditions on: ``diffusion.treevae_export`` (``diffusion_config``
  is ``config.diffusion``) or ``WORKDIR/export``."""
  return diffusion_config.treevae_export or RunDir(workdir).export


def check_export(data_config, path: str, meta: dict):
  """Checks a stage-1 export's meta against ``data_config`` (``config.data``) before anything is
  loaded.

  Where the export records its dataset's identity, the folder of a folder dataset
  (``data.folder``) may differ: a moved or copied folder is the same dataset when its content and
  split are, which :func:`check_export_data` compares once the images are loaded.

  Raises:
    ConfigError: the export was trained on images of another shape or on another dataset (its
      config; the data itself is compared by :func:`check_export_data`).
  """
  m = meta["model"]
  got = (m["image_size"], m["image_size"], m["channels"])
  want = (data_config.image_size, data_config.image_size, data_config.channels)
  if got != want:
    raise ConfigError(
      f"the stage-1 export {path} was trained on {'x'.join(map(str, got))} images but "
      f"config.data ({data_config.name}) has {'x'.join(map(str, want))}: point "
      f"--config.diffusion.treevae_export at an export of this dataset (or use its config)"
    )
  saved = (meta.get("config") or {}).get("data")
  if saved is not None:
    current = json.loads(data_config.to_json_best_effort())
    by_content = (meta.get("data") or {}).get("identity") is not None
    ignore = ("data.data_dir",) + (("data.folder",) if by_content else ())
    diffs = ckpt_lib.config_differences({"data": saved}, {"data": current}, ignore)
    if diffs:
      raise ConfigError(
        f"the stage-1 export {path} was trained on other data ({'; '.join(diffs)}): "
        f"use the config of that stage-1 run, or point --config.diffusion.treevae_export at an "
        f"export of this data"
      )


def check_export_data(path: str, meta: dict, identity: dict, data_config=None):
  """Refuses data that changed since the export was trained (images added, removed or edited).
  Given ``data_config`` (``config.data``), logs where a folder dataset of the same content moved.

  Raises:
    ConfigError: the export records another dataset identity; the message says what changed.
  """
  saved = (meta.get("data") or {}).get("identity")
  change = None if saved is None else data_lib.identity_change(saved, identity)
  if change:
    raise ConfigError(
      f"the dataset changed since the stage-1 export {path} was trained ({change}): put the "
      f"images back as they were, or train stage 1 again on them in a new --workdir"
    )
  moved = (
    None
    if saved is None
    else data_lib.moved_folder((meta.get("config") or {}).get("data"), data_config)
  )
  if moved:
    logging.info(
      "the stage-1 export %s was trained on the images in %s; they are now read from "
      "%s (the same images, labels and split)",
      path,
      *moved,
    )


def load_stage1(config, workdir: str):
  """Loads and checks the stage-1 export for this config.

  Returns:
    ``(model, variables, tree, path, fingerprint, meta)``.

  Raises:
    CheckpointError: missing export, a training workdir instead of its export.
    ConfigError: the export's images or dataset differ from this config's.
  """
  path = export_lib.resolve_export(export_path(config.diffusion, workdir))
  meta = export_lib.read_export_meta(path)
  check_export(config.data, path, meta)
  model, variables, tree = export_lib.load_treevae(path)
  return model, variables, tree, path, export_lib.export_fingerprint(path), meta


# ------------------------------------------------------------------------------ the passes


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
