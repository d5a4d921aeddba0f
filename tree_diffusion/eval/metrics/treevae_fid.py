"""Stage 1: the TreeVAE's own FID of generations (``eval.num_samples`` prior samples) and of
reconstructions (``eval.recons_num`` test images, 0 = all), overall and per leaf, against the
test split, with their PNG grids in ``WORKDIR/eval``.

Each image's leaf is *drawn* from its leaf probabilities, as the diffusion modes do (the
reference's TreeVAE-only routine takes the argmax). Its entry is ``stage1["fid"]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion import files, inputs
from tree_diffusion.diffusion import generate
from tree_diffusion.eval import fid as fid_lib
from tree_diffusion.eval.metrics._common import Row, per_leaf
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE

STAGE = "stage1"
KEY = "fid"
SETTINGS = (
  "fid",
  "num_samples",
  "recons_num",
  "batch_size",
  "grid_images",
  "seed",
  "quantize",
  "treevae_leaf",
  "treevae_pixels",
)


def _leaf(leaf_probs: jax.Array, key: jax.Array, argmax: bool) -> jax.Array:
  """Each image's leaf: drawn from its leaf probabilities (``eval.treevae_leaf="draw"``, as the
  diffusion modes draw it), or the most probable one (``"argmax"``, the reference's TreeVAE rows)."""
  if argmax:
    return jnp.argmax(leaf_probs, axis=-1)
  logits = jnp.log(jnp.maximum(leaf_probs, 1e-30))
  return jax.random.categorical(jax.random.fold_in(key, 7), logits)


@functools.partial(jax.jit, static_argnames=("model", "tree", "num", "argmax"))
def _generate(variables, key, *, model: TreeVAE, tree: Tree, num: int, argmax: bool = False):
  out = model.generate(variables, tree, key, num)
  leaf = _leaf(out["leaf_probs"], key, argmax)
  return out["images"][leaf, jnp.arange(num)], leaf


@functools.partial(jax.jit, static_argnames=("model", "tree", "argmax"))
def _reconstruct(variables, x, key, *, model: TreeVAE, tree: Tree, argmax: bool = False):
  out, _ = model.apply(variables, tree, x, key, train=False, return_recon=True)
  leaf = _leaf(out["leaf_probs"], key, argmax)
  return out["recon"][leaf, jnp.arange(x.shape[0])], leaf


def _batched(fn, total: int, batch: int, rule: str = "round"):
  """Runs ``fn(i, n)`` → (images, leaves) for fixed-size batches; concatenates the first ``total``
  as uint8 pixels (``generate.to_uint8``'s ``rule``)."""
  imgs, leaves = [], []
  for i, start in enumerate(range(0, total, batch)):
    a, b = fn(i, batch)
    n = min(batch, total - start)
    imgs.append(generate.to_uint8(np.asarray(a)[:n], rule))
    leaves.append(np.asarray(b)[:n])
  return np.concatenate(imgs), np.concatenate(leaves)


def compute(ctx) -> dict:
  s = ctx.settings
  if not s.fid:
    return {}
  model, variables, tree = ctx.model, ctx.variables, ctx.tree
  key = jax.random.key(s.seed)
  argmax = s.treevae_leaf == "argmax"
  rule = "wrap" if s.treevae_pixels == "wrap" else s.quantize
  ref = ctx.reference()
  gen, gen_leaf = _batched(
    lambda i, b: _generate(
      variables,
      jax.random.fold_in(jax.random.fold_in(key, 2), i),
      model=model,
      tree=tree,
      num=b,
      argmax=argmax,
    ),
    s.num_samples,
    s.batch_size,
    rule,
  )
  n_rec = s.recons_num or len(ctx.test)
  x = inputs.to_unit_range(ctx.test.images[:n_rec])
  xp = np.concatenate([x, np.zeros((-len(x) % s.batch_size,) + x.shape[1:], np.float32)])
  rec, _ = _batched(
    lambda i, b: _reconstruct(
      variables,
      xp[i * b : (i + 1) * b],
      jax.random.fold_in(jax.random.fold_in(key, 3), i),
      model=model,
      tree=tree,
      argmax=argmax,
    ),
    n_rec,
    s.batch_size,
    rule,
  )
  features = ctx.evaluator.features
  g, r = features(gen, "TreeVAE samples"), features(rec, "TreeVAE reconstructions")
  out = {
    "gen": fid_lib.fid_from_features(g, ref),
    "rec": fid_lib.fid_from_features(r, ref),
    "num_gen": int(len(gen)),
    "num_rec": int(len(rec)),
    "reference": "test",
    "num_reference": int(len(ref)),
    "gen_per_leaf": fid_lib.per_group_fid(
      g, gen_leaf, ref, ctx.test_probs.argmax(1), tree.num_leaves
    ),
  }
  if ctx.evaluator.writes:
    for name, imgs in (("treevae_sample.png", gen), ("treevae_recons.png", rec)):
      grid = generate.image_grid(imgs[: s.grid_images] / 255.0, columns=8)
      files.save_png(files.join(ctx.out_dir, name), grid)
  ctx.evaluator.log(f"stage 1: TreeVAE FID gen {out['gen']:.2f}, rec {out['rec']:.2f}")
  return out


def rows(stage1: dict, step) -> list[Row]:
  entry = stage1.get("fid") or {}
  out = [
    Row("treevae_fid_gen", entry.get("gen"), step),
    Row("treevae_fid_rec", entry.get("rec"), step),
  ]
  return out + per_leaf("treevae_fid_gen", entry.get("gen_per_leaf"), step)


def columns(thresholds) -> list[str]:
  return ["treevae_fid_gen", "treevae_fid_rec"]
