"""What stage 2 and the evaluation need from a trained TreeVAE, below any training code.

Leaf probabilities of a dataset (fixed-shape padded batches, so one compile serves every size),
the test images each leaf receives, and prior samples through every leaf. Stage-1 training uses
the same functions for its progress logs, its growing decisions and its tree figure.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from tree_diffusion import data as data_lib
from tree_diffusion import inputs, sharding
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE


@functools.partial(jax.jit, static_argnames=("model", "tree"))
def leaf_probabilities(variables, images, *, model: TreeVAE, tree: Tree):
  return model.leaf_probabilities(variables, tree, images)


@functools.partial(jax.jit, static_argnames=("model", "tree", "num"))
def generate(variables, key, *, model: TreeVAE, tree: Tree, num: int):
  return model.generate(variables, tree, key, num)


def predict_leaf_probs(
  model: TreeVAE, variables, tree: Tree, arrays: data_lib.Arrays, batch_size: int
) -> np.ndarray:
  """``[N, K]`` leaf probabilities of every row of ``arrays`` (padded fixed-shape batches)."""
  outs = []
  for batch in data_lib.batches(arrays, batch_size, shuffle=False, drop_remainder=False, pad=True):
    p = leaf_probabilities(variables, batch["image"], model=model, tree=tree)
    outs.append(np.asarray(p)[batch["mask"]])
  return np.concatenate(outs) if outs else np.zeros((0, tree.num_leaves), np.float32)


def assign(
  model: TreeVAE,
  variables,
  tree: Tree,
  images,
  batch_size: int = 256,
  mesh=None,
  progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Places images into the learned tree.

  Args:
    images: floats ``[N, H, W, C]`` in [0, 1] of the model's shape (uint8 images: convert them
      with :func:`tree_diffusion.inputs.to_unit_range`).
    batch_size: images per compiled call; every batch, the last included, is padded to it, so one
      compile serves every call with this batch size (``TrainedRun.assign_files`` calls once per
      batch of files).
    mesh: a one-process :func:`sharding.make_mesh` to split each batch over its devices (the
      batch is rounded up to a multiple of the device count); ``None``: the default device.
    progress: called with ``(done, total)`` after each batch.

  Returns:
    ``(leaves, probs)``: each image's most probable leaf as a node id, ``[N]`` int, and the leaf
    probabilities ``[N, K]`` (columns in ``tree.leaves`` order).
  """
  model.check_call(variables, tree, images)
  batch_size = inputs.count(batch_size, "batch_size")
  images = np.asarray(images, np.float32)
  n = len(images)
  b = batch_size
  if mesh is not None:
    devices = mesh.devices.size
    b = -(-b // devices) * devices
    variables = sharding.replicate(variables, mesh)
  outs = []
  for start in range(0, n, b):
    chunk = images[start : start + b]
    padded = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.float32)])
    if mesh is not None:
      padded = jax.device_put(padded, sharding.data_sharded(mesh))
    outs.append(
      np.asarray(leaf_probabilities(variables, padded, model=model, tree=tree))[: len(chunk)]
    )
    if progress is not None:
      progress(start + len(chunk), n)
  probs = np.concatenate(outs)
  return np.asarray(tree.leaves)[probs.argmax(1)], probs


def test_examples(
  model: TreeVAE, variables, tree: Tree, arrays: data_lib.Arrays, num: int, batch_size: int
):
  """Each leaf's share of ``arrays`` (argmax of the leaf probabilities) and up to ``num`` of its
  images, ``[K, num, H, W, C]`` in [0, 1] with NaN where a leaf has fewer (blank figure slots)."""
  return leaf_examples(predict_leaf_probs(model, variables, tree, arrays, batch_size), arrays, num)


def leaf_examples(probs: np.ndarray, arrays: data_lib.Arrays, num: int):
  """:func:`test_examples` from leaf probabilities ``[N, K]`` already computed for ``arrays``."""
  k_leaves = probs.shape[1]
  assign = probs.argmax(1)
  share = np.bincount(assign, minlength=k_leaves) / max(len(assign), 1)
  real = np.full((k_leaves, num) + arrays.images.shape[1:], np.nan, np.float32)
  for k in range(k_leaves):
    rows = np.flatnonzero(assign == k)[:num]
    real[k, : len(rows)] = arrays.images[rows] / 255.0
  return share, real
