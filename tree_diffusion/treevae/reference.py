"""TreeVAEs trained by the reference PyTorch code, as this package's model, tree and variables.

The reference saves ``model.state_dict()`` (``model_weights.pt``) next to its YAML config. Its
modules sit in lists indexed by a node's position in breadth-first order over the tree as it
stands (pass-through nodes included; a ``None`` entry leaves no key):

==================================  ==========================================================
reference key prefix                here
==================================  ==========================================================
``bottom_up.0``                     ``encoder``
``bottom_up.j`` (j ≥ 1)             ``bottom_up_j`` (its ``mu``/``sigma`` heads are dropped:
                                    no loss reads them)
``contrastive_mlp.j``               ``proj_j`` (``sigma`` dropped: only the mean is used)
``denses.i``                        ``node_k/dense``
``transformations.i``               ``node_k/transform``
``decisions.i``, ``decisions_q.i``  ``node_k/p_router``, ``node_k/q_router``
``decoders.i``                      ``node_k/decoder``
==================================  ==========================================================

``i`` is the breadth-first position and ``k`` the node's heap id. The tree comes from which
positions own routers (two children), a decoder (a leaf) or neither (a pass-through node with one
child); a pass-through node's child is put on the left, which changes no output (the child gets
the whole path probability either way, and the diffusion model reads breadth-first positions).

Arrays: convolution kernels OIHW → HWIO; transposed-convolution kernels (``in, out, kH, kW``) →
HWIO and flipped in both spatial axes (PyTorch's transposed convolution is the gradient of a
convolution; Flax's and :class:`~tree_diffusion.treevae.networks.RowConv`'s apply the kernel
unflipped on the dilated input); linear weights transposed; BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` → ``scale``/``bias``/``mean``/``var``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import jax
import numpy as np

from tree_diffusion.errors import ConfigError
from tree_diffusion.runs import RunDir, save_config
from tree_diffusion.torch_files import read_torch_tensors
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.export import export_treevae
from tree_diffusion.treevae.model import TreeVAE
from tree_diffusion.treevae.step import make_model

# Our component → the reference's module list.
_LISTS = {
  "dense": "denses",
  "transform": "transformations",
  "p_router": "decisions",
  "q_router": "decisions_q",
  "decoder": "decoders",
}
_CONV_BLOCK = {"conv0": "conv0", "conv1": "conv1", "conv2": "conv2", "mu": "mu", "var": "sigma"}
_CONV_BLOCK.update({f"bn{i}": f"bn{i}" for i in range(3)})
_ROUTER = {
  "conv": "conv1",
  "fc0": "dense1",
  "bn0": "bn1",
  "fc1": "dense2",
  "bn1": "bn2",
  "out": "dense3",
}
_PROJECTION = {"conv": "conv1", "fc": "dense1", "bn": "bn1", "mu": "mu"}
_RES_BLOCK = {"conv0": "conv_0", "conv1": "conv_1", "conv2": "conv_2", "shortcut": "conv_s"}
_RES_BLOCK.update({f"bn{i}": f"bn{i}" for i in range(3)})
_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Reference keys that have no counterpart here, on purpose.
_DROPPED = (
  re.compile(r"bottom_up\.[1-9]\d*\.(mu|sigma)\.weight"),  # heads no loss reads
  re.compile(r"contrastive_mlp\.\d+\.sigma\.(weight|bias)"),  # only the mean is used
  re.compile(r".*\.num_batches_tracked"),  # BatchNorm's counter (momentum is fixed)
)


def config_updates(reference_config: Mapping[str, Any]) -> dict[str, Any]:
  """This package's config values (dotted keys) for the TreeVAE a reference YAML config builds.

  ``reference_config``: the parsed YAML (its ``training`` section is read). The result sets
  ``data.image_size``/``data.channels``, the ``treevae`` architecture and the stage-1
  augmentation settings that decide the contrastive heads; ``make_model`` then builds the model.

  Raises:
    ConfigError: a setting this package does not build (the ``mlp``/``cnn_omni`` encoders,
      average-pool down-sampling, spectral normalisation), named with the key to change.
  """
  c = reference_config.get("training", reference_config)
  missing = [
    k
    for k in ("encoder", "inp_shape", "inp_channels", "latent_channels", "bottom_up_channels")
    if k not in c
  ]
  if missing:
    raise ConfigError(
      f"the reference config has no training.{missing[0]}: pass the YAML the model was trained "
      f"with (e.g. the reference's configs/mnist.yml)"
    )
  if c["encoder"] not in ("cnn1", "cnn2"):
    raise ConfigError(
      f"training.encoder {c['encoder']!r}: only the reference's cnn1 and cnn2 networks are built"
    )
  if c["encoder"] == "cnn2" and not c.get("dim_mod_conv", False):
    raise ConfigError(
      "training.dim_mod_conv is False: that cnn2 down- and up-samples by average pooling and "
      "bilinear resizing, which this package does not build (the reference's configs set True)"
    )
  if c.get("spectral_norm", False):
    raise ConfigError("training.spectral_norm is True: spectral normalisation is not built here")
  method = c.get("augmentation_method", "simple")
  return {
    "data.image_size": int(c["inp_shape"]),
    "data.channels": int(c["inp_channels"]),
    "treevae.encoder": str(c["encoder"]),
    "treevae.latent_channels": tuple(int(v) for v in c["latent_channels"]),
    "treevae.bottom_up_channels": tuple(int(v) for v in c["bottom_up_channels"]),
    "treevae.representation_dim": int(c.get("representation_dim", 2)),
    "treevae.res_connections": bool(c.get("res_connections", False)),
    "treevae.act": str(c.get("act_function", "swish")),
    "treevae.output": str(c.get("activation", "sigmoid")),
    "treevae.dropout_router": float(c.get("dropout_router", 0.0)),
    "stage1.augment": bool(c.get("augment", False)),
    "stage1.augmentation_method": method if isinstance(method, str) else ",".join(method),
  }


def _positions(state: Mapping[str, np.ndarray], module_list: str) -> set[int]:
  pattern = re.compile(rf"{module_list}\.(\d+)\.")
  return {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}


def tree_from_state_dict(state: Mapping[str, np.ndarray]) -> tuple[Tree, dict[int, int]]:
  """The tree a reference state dict holds, and each heap id's breadth-first position.

  Raises:
    ConfigError: the keys do not describe a tree (a position without a bottom-up head, a node
      with both routers and a decoder).
  """
  n = len(_positions(state, "denses"))
  if n == 0 or _positions(state, "denses") != set(range(n)):
    raise ConfigError(
      "the state dict has no denses.0 … denses.N-1: it is not a reference TreeVAE's "
      "model_weights.pt (keys such as 'denses.0.mu.weight' are expected)"
    )
  internal = _positions(state, "decisions")
  leaves = _positions(state, "decoders")
  if internal & leaves or (internal | leaves) - set(range(n)):
    raise ConfigError("the state dict's routers and decoders do not describe a tree")
  heap = {0: 0}  # breadth-first position → heap id
  queue, nxt = [0], 1
  while queue:
    pos = queue.pop(0)
    children = 2 if pos in internal else 0 if pos in leaves else 1
    for side in range(children):
      if nxt >= n:
        raise ConfigError(f"the state dict's tree needs more than its {n} nodes")
      heap[nxt] = 2 * heap[pos] + 1 + side
      queue.append(nxt)
      nxt += 1
  if nxt != n:
    raise ConfigError(f"the state dict holds {n} nodes but its tree reaches only {nxt}")
  tree = Tree(tuple(heap.values()))
  return tree, {h: p for p, h in heap.items()}


def _module_name(path: tuple[str, ...], encoder: str, levels: int) -> str:
  """The reference's dotted module name for one of our module paths (without the leaf)."""
  top, rest = path[0], list(path[1:])

  def rename(table, names):
    return [table[names[0]]] + names[1:] if names and names[0] in table else None

  if top == "encoder":
    if encoder == "cnn1":
      out = [re.sub(r"^conv(\d)$", r"cnn\1", rest[0])] + rest[1:]
    else:
      out = _cnn2(rest, decoder=False, levels=levels)
    return "bottom_up.0." + ".".join(out)
  if top.startswith("bottom_up_"):
    return f"bottom_up.{top[len('bottom_up_') :]}." + ".".join(rename(_CONV_BLOCK, rest))
  if top.startswith("proj_"):
    return f"contrastive_mlp.{top[len('proj_') :]}." + ".".join(rename(_PROJECTION, rest))
  raise KeyError(top)


def _cnn2(names: list[str], decoder: bool, levels: int) -> list[str]:
  """cnn2 encoder/decoder module names: ``resnet.i`` is the i-th block of its Sequential."""
  head, rest = names[0], names[1:]
  if head in ("bn_out",):
    return ["bn0"] + rest
  if head in ("conv_img", "conv_out"):
    return ["conv_img"] + rest
  m = re.fullmatch(r"(res|down|up)(\d+)|res_(in|out)", head)
  if m is None:
    raise KeyError(head)
  if m.group(3) == "in":
    index = 0
  elif m.group(3) == "out":
    index = 2 * levels
  else:
    i = int(m.group(2))
    index = {"down": 1 + 2 * i, "up": 2 * i + 1}.get(m.group(1), 2 * i if decoder else 2 + 2 * i)
  if m.group(1) in ("down", "up"):
    return [f"resnet.{index}"] + rest
  return [f"resnet.{index}", _RES_BLOCK[rest[0]]] + rest[1:]


def _component_name(comp: str, rest: list[str], encoder: str, levels: int) -> str:
  if comp in ("dense", "transform"):
    return ".".join([_CONV_BLOCK[rest[0]]] + rest[1:])
  if comp in ("p_router", "q_router"):
    return ".".join([_ROUTER[rest[0]]] + rest[1:])
  if encoder == "cnn1":
    return ".".join([re.sub(r"^convt(\d)$", r"cnn\1", rest[0])] + rest[1:])
  return ".".join(_cnn2(rest, decoder=True, levels=levels))


def flax_array(key: str, array: np.ndarray, kind: str, shape, what: str) -> np.ndarray:
  """A PyTorch parameter in Flax's layout, checked against the ``shape`` we need.

  ``kind``: ``conv`` (OIHW → HWIO), ``conv_transpose`` (``in, out, kH, kW`` → HWIO, flipped in
  both spatial axes), ``conv1d`` (``O, I, 1`` → a 1×1 HWIO kernel), ``linear`` (transposed) or
  ``as_is``. ``what`` names the model in the error (``the UNet``).

  Raises:
    ConfigError: the converted shape differs from ``shape``; the message names ``key``.
  """
  if kind == "conv":
    array = array.transpose(2, 3, 1, 0)
  elif kind == "conv_transpose":
    array = array[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
  elif kind == "conv1d":
    array = array[:, :, 0].T[None, None]
  elif kind == "linear":
    array = array.T
  if tuple(array.shape) != tuple(shape):
    raise ConfigError(
      f"{key} has shape {tuple(array.shape)} where {what} the reference config describes needs "
      f"{tuple(shape)}: pass the YAML config this model was trained with"
    )
  return np.ascontiguousarray(array, np.float32)


def apply_updates(config, updates: Mapping[str, Any]):
  """Sets the dotted keys of :func:`config_updates` (or the diffusion model's) on ``config``."""
  for dotted, value in updates.items():
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


def variables_from_state_dict(model: TreeVAE, state: Mapping[str, np.ndarray]) -> tuple[Any, Tree]:
  """``(variables, tree)`` of a reference state dict, for ``model`` (built from
  :func:`config_updates`).

  Every variable of the model is read from its reference key, shape-checked; a reference key that
  nothing reads (other than the heads the reference builds but never uses) is an error, so a
  state dict of another architecture cannot load silently.

  Raises:
    ConfigError: a key is missing or left over, or an array's shape differs.
  """
  tree, position = tree_from_state_dict(state)
  template = jax.device_get(model.init(jax.random.key(0), tree))
  levels = int(round(np.log2(model.image_size / model.representation_dim)))
  used: set[str] = set()

  def fill(collection: str, path: tuple[str, ...], ours: np.ndarray):
    *modules, leaf = path
    if modules[0].startswith("node_"):
      node, comp, *rest = modules
      pos = position[int(node[len("node_") :])]
      name = f"{_LISTS[comp]}.{pos}." + _component_name(comp, rest, model.encoder, levels)
    else:
      name = _module_name(tuple(modules), model.encoder, levels)
    key = f"{name}.{_LEAVES.get(leaf, 'weight')}"
    if key not in state:
      raise ConfigError(
        f"the state dict has no {key} (for {collection}/{'/'.join(path)}): it does not hold the "
        f"model the reference config describes"
      )
    used.add(key)
    array = np.asarray(state[key])
    kind = "as_is"
    if leaf == "kernel" and array.ndim == 4:
      transposed = re.fullmatch(r"convt\d|up\d+", modules[-1]) is not None
      kind = "conv_transpose" if transposed else "conv"
    elif leaf == "kernel" and array.ndim == 2:
      kind = "linear"
    return flax_array(key, array, kind, ours.shape, "the model")

  variables = {
    col: _map_with_path(tree_part, lambda p, a, col=col: fill(col, p, a))
    for col, tree_part in template.items()
  }
  dropped = list(_DROPPED)
  # The reference keeps the q-router of a node whose child was pruned (pruning clears only the
  # p-router), and builds projection heads for any "instancewise" method even without
  # augmentation; neither is read by the model.
  dropped += [re.compile(rf"decisions_q\.{position[n]}\..*") for n in tree.passthrough_nodes]
  if not model.contrastive:
    dropped.append(re.compile(r"contrastive_mlp\..*"))
  left = sorted(k for k in state if k not in used and not any(d.fullmatch(k) for d in dropped))
  if left:
    raise ConfigError(
      f"{len(left)} key(s) of the state dict are not used, e.g. {left[0]}: the reference config "
      f"does not describe this model (a contrastive model needs its augmentation settings)"
    )
  return variables, tree


def _map_with_path(tree: Mapping, fn, prefix: tuple[str, ...] = ()):
  return {
    k: _map_with_path(v, fn, prefix + (k,)) if isinstance(v, Mapping) else fn(prefix + (k,), v)
    for k, v in tree.items()
  }


def import_treevae(config, weights: str, workdir: str, source: Mapping[str, Any]) -> str:
  """Writes a reference TreeVAE's ``model_weights.pt`` as this run's stage 1: ``WORKDIR/export``
  (what stage 2, sampling and evaluation load) and ``WORKDIR/config.json``.

  ``config``: the run's config with :func:`config_updates` applied; ``source``: what the export
  records under ``imported_from`` (the files it came from). The export records no dataset
  identity (the reference's images are not at hand), so later commands check the data by
  config only. Returns the export's fingerprint.
  """
  model = make_model(config)
  variables, tree = variables_from_state_dict(model, read_torch_tensors(weights))
  run_dir = RunDir(workdir)
  save_config(run_dir.config, config)
  data = {
    "name": config.data.name,
    "image_shape": [config.data.image_size, config.data.image_size, config.data.channels],
    "normalisation": "float32 in [0, 1] (uint8 / 255)",
    "num_classes": source.get("num_classes"),
  }
  return export_treevae(
    run_dir.export,
    model,
    variables,
    tree,
    {
      "config": json.loads(config.to_json_best_effort()),
      "data": data,
      "imported_from": dict(source),
    },
  )
