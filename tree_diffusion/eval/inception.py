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

This module holds the network, its preprocessing, the structure of its parameters and the
sharded :class:`FeatureExtractor`; where the weights come from (the torch files, their names, the
``.npz`` cache) is :mod:`tree_diffusion.eval.inception_weights`.
"""

from __future__ import annotations

import functools
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
LEAVES = ("kernel", "beta", "mean", "var")  # the parameters of each convolution

Params = dict[str, Any]


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
    y = lax.conv_general_dilated(
      x,
      kernel,
      (self.strides, self.strides),
      ((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )
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
    bd = [
      conv(384, **row, name="branch3x3dbl_3a")(bd),
      conv(384, **col, name="branch3x3dbl_3b")(bd),
    ]
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
    raise ValueError(
      f"expected uint8 images [N, H, W, 1 or 3] in 0..255, got {np.dtype(dtype)} {tuple(shape)}"
    )


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
# The parameters: names, shapes, validation.


def set_param(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
  """Puts ``value`` at ``path`` (``("Mixed_7c", "branch_pool", "kernel")``) in a nested dict."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
  """``"Mixed_7c/branch_pool/kernel"`` → shape, of every parameter of :class:`FIDInceptionV3`."""
  shapes = jax.eval_shape(
    FIDInceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  )["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def flatten_params(params: Params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
  params: Params = {}
  for name, value in flat.items():
    set_param(params, tuple(name.split("/")), value)
  return params


def check_params(params: Params) -> None:
  """Raises :class:`InceptionWeightsError` unless ``params`` has exactly the network's parameters,
  with their shapes, float32 and finite."""
  flat = flatten_params(params)
  shapes = param_shapes()
  if set(flat) != set(shapes):
    extra, missing = sorted(set(flat) - set(shapes)), sorted(set(shapes) - set(flat))
    raise InceptionWeightsError(
      f"parameter names differ from the network's: missing {missing[:3]}, unexpected {extra[:3]}"
    )
  for name, value in flat.items():
    if value.shape != shapes[name] or value.dtype != np.float32:
      raise InceptionWeightsError(
        f"parameter {name} is {value.dtype} {value.shape}, expected float32 {shapes[name]}"
      )
    if not np.isfinite(value).all():
      raise InceptionWeightsError(f"parameter {name} is not finite")


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

  In a multi-process job the mesh spans every process's devices: each process feeds its own rows
  of every batch, and every process receives all the features.
  """

  def __init__(
    self,
    params: Params,
    mesh=None,
    batch_size: int = 50,
    micro_batch: int | str | None = "auto",
    precision: str = "highest",
  ):
    check_params(params)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    n_dev = self.mesh.devices.size
    if micro_batch == "auto":
      micro_batch = 2 if self.mesh.devices.flat[0].platform == "cpu" else None
    self.micro_batch = micro_batch
    step = n_dev * (micro_batch or 1)
    self.batch_size = -(-batch_size // step) * step  # padded, never rejected
    self.model = FIDInceptionV3(precision=precision)
    rep, self._data = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    self.params = sharding.replicate(params, self.mesh)
    self.traces = 0
    self.network = jax.jit(
      self._forward,
      in_shardings=(rep, self._data),
      out_shardings=self._data,
      compiler_options=xla_options.conv_net_for_mesh(self.mesh),
    )
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
    xs = jax.lax.with_sharding_constraint(
      xs, NamedSharding(self.mesh, sharding.batch_spec(self.mesh, None))
    )
    ys = jax.lax.map(apply, xs)
    return ys.reshape(steps, n, mb, FEATURES).swapaxes(0, 1).reshape(b, FEATURES)

  def __call__(
    self, images: np.ndarray, progress: Callable[[int, int], None] | None = None
  ) -> np.ndarray:
    """uint8 ``[N, H, W, 1 or 3]`` (or grey ``[N, H, W]``) → float32 ``[N, 2048]``.
    ``progress(done, total)`` is called after each batch."""
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    _check_images(images.shape, images.dtype)
    return self._run(images, lambda b: self.features(self.params, b), progress)

  def _run(
    self,
    arr: np.ndarray,
    fn: Callable[[jax.Array], jax.Array],
    progress: Callable[[int, int], None] | None,
  ) -> np.ndarray:
    n, b = len(arr), self.batch_size
    out = np.empty((n, FEATURES), np.float32)
    pending = None  # one batch in flight while the next is dispatched

    def collect(item):
      start, k, feats = item
      out[start : start + k] = sharding.to_host(feats)[:k]  # gathered from every process
      if progress is not None:
        progress(start + k, n)

    for start in range(0, n, b):
      chunk = arr[start : start + b]
      k = len(chunk)
      if k < b:
        chunk = np.concatenate([chunk, np.zeros((b - k,) + chunk.shape[1:], chunk.dtype)])
      item = (start, k, fn(sharding.put_global(chunk, self.mesh)))  # this process's rows
      if pending is not None:
        collect(pending)
      pending = item
    if pending is not None:
      collect(pending)
    return out
