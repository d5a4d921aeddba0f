"""Flax linen building blocks of the CNN-TreeVAE.

Every latent and every bottom-up feature is a small feature map ``[B, R, R, C]`` (NHWC). Layers
follow PyTorch semantics where they matter for shapes: transposed convolutions use explicit padding
``k - 1 - p`` on the dilated input (PyTorch ``ConvTranspose2d(padding=p)``), BatchNorm uses
momentum 0.9 / eps 1e-5 (PyTorch momentum 0.1) and, as PyTorch, updates the running variance
with the unbiased batch variance (:class:`BatchNorm`). Weights are initialised as PyTorch does
(uniform ±1/sqrt(fan_in), applied by ``TreeVAE.init``); biases start at zero (PyTorch draws them
uniformly; a deliberate, documented simplification).

Deliberate omission: the bottom-up ``Conv`` blocks of the reference also build mu/var heads that no
loss ever reads; :class:`ConvBlock` builds heads only when asked.

Why one long module: the per-node blocks (``ConvBlock``, ``GaussianHead``, ``Router``,
``ContrastiveProjection``), two encoder/decoder families (``cnn1`` for the grey datasets,
``cnn2``, the ResNet of the colour ones) and the PyTorch layer semantics they share (``RowConv``
and the padding rules); each is a few short classes, kept side by side because they are read
together when matching the reference layer by layer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Modules keep Flax's default initialisers; TreeVAE.init (model.py, ``_init_module``) replaces
# every weight by PyTorch's default init, drawn with NumPy.


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "swish": nn.swish,
  "relu": nn.relu,
  "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.3),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class BatchNorm(nn.Module):
  """PyTorch's ``BatchNorm1d``/``BatchNorm2d`` over the last axis, with Flax's variable names.

  Training normalises with the batch mean and the biased batch variance, and moves the running
  statistics towards the batch's: ``mean ← m·mean + (1−m)·μ``, ``var ← m·var + (1−m)·σ²·n/(n−1)``
  with ``n`` the values per channel in the batch (batch × height × width). The running variance
  takes the unbiased estimate, as PyTorch's does; Flax's ``nn.BatchNorm`` takes the biased one.
  Evaluation normalises with the running statistics. Statistics are computed in float32 (two-pass
  variance) and the output is float32, whatever the input's dtype.

  Variables: ``params/{scale, bias}`` (1 and 0) and ``batch_stats/{mean, var}`` (0 and 1), the
  names ``nn.BatchNorm`` uses, so checkpoints written before this layer load unchanged.
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = x.size // features
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


def _bn(train: bool, name: str | None = None) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  padding: int = 1,
  bias: bool = False,
  name: str | None = None,
) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    use_bias=bias,
    name=name,
  )


def conv_transpose(
  features: int, kernel: int, stride: int, padding: int, bias: bool = False, name: str | None = None
) -> nn.ConvTranspose:
  """PyTorch ``ConvTranspose2d(k, stride, padding)``: output ``(n−1)·s − 2p + k``."""
  pad = kernel - 1 - padding
  return nn.ConvTranspose(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=bias,
    name=name,
  )


def dense(features: int, bias: bool = True, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, name=name)


def _row_placement(
  k: int, n_in: int, n_out: int, stride: int, pad: int, transpose: bool
) -> np.ndarray:
  """0/1 tensor ``S[d, i, o]``: kernel tap ``d`` links input column ``i`` to output column ``o``."""
  s = np.zeros((k, n_in, n_out), np.float32)
  for d in range(k):
    for o in range(n_out):
      if transpose:  # lax.conv_transpose (no kernel flip): input i sits at (k-1-pad) + i*stride
        j = o + d - (k - 1 - pad)
        if j % stride == 0 and 0 <= j // stride < n_in:
          s[d, j // stride, o] = 1.0
      else:
        i = o * stride - pad + d
        if 0 <= i < n_in:
          s[d, i, o] = 1.0
  return s


def _out_size(n: int, k: int, stride: int, pad: int, transpose: bool) -> int:
  return (n - 1) * stride - 2 * pad + k if transpose else (n + 2 * pad - k) // stride + 1


def _tap_index(k: int, n_in: int, n_out: int, stride: int, pad: int, transpose: bool) -> np.ndarray:
  """``[n_in, n_out]`` kernel tap linking input ``i`` to output ``o`` along one axis (``k``: none).

  Each (input, output) pair is linked by at most one tap, for any stride.
  """
  s = _row_placement(k, n_in, n_out, stride, pad, transpose)
  idx = np.full((n_in, n_out), k, np.int32)
  d, i, o = np.nonzero(s)
  idx[i, o] = d
  return idx


def _width_toeplitz(
  kernel: jax.Array, w: int, w_out: int, stride: int, pad: int, transpose: bool
) -> jax.Array:
  """``[k, W·C, W_out·C_out]``: per kernel row, the matrix that applies it along the width."""
  k, _, c, cout = kernel.shape
  placement = jnp.asarray(_row_placement(k, w, w_out, stride, pad, transpose), kernel.dtype)
  return jnp.einsum("ydio,dab->yaibo", kernel, placement).reshape(k, w * c, w_out * cout)


def conv2d_dense(
  x: jax.Array, kernel: jax.Array, stride: int, pad: int, transpose: bool = False
) -> jax.Array:
  """A 2-D (transposed) convolution on a small map as one dense matmul ``[B, H·W·C] @ M``.

  ``M`` (``[H·W·C, H_out·W_out·C_out]``, independent of the batch) holds, for every pair of
  input and output rows, the width Toeplitz matrix of the kernel row that links them (a gather
  of :func:`_width_toeplitz` blocks) or zeros. On maps of a few hundred pixels whose kernels
  cover most of the input (the ``cnn1`` decoders: 12×12 kernels on 10×10 and 19×19 maps) this
  does about the FLOPs of :func:`conv2d_rows` without copying ``k`` input rows per output row,
  and the matmul has the whole batch as its rows.
  """
  b, h, w, c = x.shape
  k, _, _, cout = kernel.shape
  h_out, w_out = _out_size(h, k, stride, pad, transpose), _out_size(w, k, stride, pad, transpose)
  t = _width_toeplitz(kernel, w, w_out, stride, pad, transpose)
  t = jnp.concatenate([t, jnp.zeros_like(t[:1])])  # tap k: no link (zeros)
  idx = jnp.asarray(_tap_index(k, h, h_out, stride, pad, transpose))[..., None]
  # m[a, :, o, :] = t[idx[a, o]], gathered straight into the [H, W·C, H_out, W_out·C_out] layout.
  dims = jax.lax.GatherDimensionNumbers(
    offset_dims=(1, 3), collapsed_slice_dims=(0,), start_index_map=(0,)
  )
  m = jax.lax.gather(t, idx, dims, (1,) + t.shape[1:], mode="promise_in_bounds")
  m = m.reshape(h * w * c, h_out * w_out * cout)
  return (x.reshape(b, h * w * c) @ m).reshape(b, h_out, w_out, cout)


def conv2d_rows(
  x: jax.Array, kernel: jax.Array, stride: int, pad: int, transpose: bool = False
) -> jax.Array:
  """A 2-D (transposed) convolution written as one matmul per image row band.

  Same result as ``lax.conv_general_dilated`` (or ``lax.conv_transpose`` with PyTorch padding
  ``pad``) with an ``HWIO`` kernel, but expressed as: stack the ``k`` input rows each output row
  reads, and multiply by a block-Toeplitz matrix that applies the kernel along the width. XLA's CPU
  convolutions are slow for the large kernels (12×12) and strides (5) of the ``cnn1`` networks —
  the backward passes of strided and transposed convolutions in particular — while matmuls run
  near peak; this form is 5–10× faster there. Used for small images only (the Toeplitz matrix
  grows with the width).
  """
  b, h, w, c = x.shape
  k, _, _, cout = kernel.shape
  h_out, w_out = _out_size(h, k, stride, pad, transpose), _out_size(w, k, stride, pad, transpose)
  if transpose:
    if stride > 1:  # dilate the rows; the width is handled by the Toeplitz matrix
      x = jnp.zeros((b, (h - 1) * stride + 1, w, c), x.dtype).at[:, ::stride].set(x)
    x = jnp.pad(x, ((0, 0), (k - 1 - pad, k - 1 - pad), (0, 0), (0, 0)))
    row_stride = 1
  else:
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0)))
    row_stride = stride
  toeplitz = _width_toeplitz(kernel, w, w_out, stride, pad, transpose).reshape(
    k * w * c, w_out * cout
  )
  x = x.reshape(b, x.shape[1], w * c)
  bands = jnp.stack(
    [x[:, dy : dy + row_stride * (h_out - 1) + 1 : row_stride] for dy in range(k)], axis=2
  )  # [B, H_out, k, W*C]
  return (bands.reshape(b, h_out, k * w * c) @ toeplitz).reshape(b, h_out, w_out, cout)


# RowConv uses conv2d_dense where its matmul FLOPs are at most this many times conv2d_rows': the
# dense form copies no input rows into bands, which cost about as much as the extra FLOPs below
# this ratio. On the MNIST model (depth-3 tree, batch 256, 2-core CPU) ratios 1, 2 and 4 (all
# dense) gave 318, 384 and 376 images/s for the stage-1 step; the banded form alone 260.
DENSE_FLOP_RATIO = 2.0


def _dense_is_cheaper(shape, k: int, cout: int, stride: int, pad: int, transpose: bool) -> bool:
  _, h, w, c = shape
  h_out, w_out = _out_size(h, k, stride, pad, transpose), _out_size(w, k, stride, pad, transpose)
  dense = h * w * c * h_out * w_out * cout
  rows = h_out * k * w * c * w_out * cout
  return dense <= DENSE_FLOP_RATIO * rows


class RowConv(nn.Module):
  """Conv / transposed conv (PyTorch padding semantics) as matmuls: on a CPU :func:`conv2d_dense`
  where it costs at most ``DENSE_FLOP_RATIO`` × the FLOPs of :func:`conv2d_rows`, otherwise (and
  on GPUs and TPUs, whose programs stay as they were measured) the banded form. Same parameters
  and the same result either way, to float32 rounding. The platform is the default backend's,
  read when the module is traced."""

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  transpose: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (self.kernel, self.kernel, x.shape[-1], self.features),
    )
    dense = jax.default_backend() == "cpu" and _dense_is_cheaper(
      x.shape, self.kernel, self.features, self.stride, self.padding, self.transpose
    )
    conv = conv2d_dense if dense else conv2d_rows
    y = conv(x, kernel, self.stride, self.padding, self.transpose)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


def map_conv(features: int, name: str) -> RowConv:
  """3×3, padding 1, no bias, on the small R×R latent/feature maps (a dense matmul there).

  Per-node modules are vmapped over the nodes of a depth; a vmapped ``lax.conv`` becomes a
  grouped convolution that XLA compiles and runs slowly, a vmapped matmul is a batched matmul.
  """
  return RowConv(features, 3, 1, 1, name=name)


class ConvBlock(nn.Module):
  """The reference's ``Conv`` block: 3 × (3×3 conv → BN → act), optional residual, mu/var heads.

  Used for bottom-up steps (``heads=False``, only the features are read) and for the per-node
  top-down transformations (``heads=True``, the prior ``N(mu, var)`` of the node given its parent).
  """

  in_channels: int
  out_channels: int
  latent_channels: int
  residual: bool = False
  act: str = "swish"
  heads: bool = True

  @nn.compact
  def __call__(self, u: jax.Array, train: bool):
    act = activation(self.act)
    a = u
    for i, c in enumerate((self.in_channels, self.in_channels, self.out_channels)):
      a = act(_bn(train, f"bn{i}")(map_conv(c, f"conv{i}")(a)))
    # The reference silently skips the residual when the channel counts differ.
    if self.residual and self.in_channels == self.out_channels:
      a = a + u
    if not self.heads:
      return a
    mu = map_conv(self.latent_channels, "mu")(a)
    var = nn.softplus(map_conv(self.latent_channels, "var")(a))
    return mu, var


class GaussianHead(nn.Module):
  """The reference's ``Dense``: two 3×3 convs giving the bottom-up proposal ``(mû, vâr)``."""

  latent_channels: int

  @nn.compact
  def __call__(self, d: jax.Array):
    mu = map_conv(self.latent_channels, "mu")(d)
    var = nn.softplus(map_conv(self.latent_channels, "var")(d))
    return mu, var


class Router(nn.Module):
  """Probability of going left: 3×3 conv to one channel → flatten → 2 × (linear, BN, act) → sigmoid."""

  hidden: int
  act: str = "swish"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, u: jax.Array, train: bool):
    act = activation(self.act)
    h = map_conv(1, "conv")(u).reshape(u.shape[0], -1)  # [B, R*R]
    for i in range(2):
      h = act(_bn(train, f"bn{i}")(dense(self.hidden, bias=False, name=f"fc{i}")(h)))
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.sigmoid(dense(1, name="out")(h))[:, 0]  # [B]


class ContrastiveProjection(nn.Module):
  """Projection head of one bottom-up level for the NT-Xent term (10-d embedding)."""

  act: str = "swish"
  hidden: int = 128
  features: int = 10

  @nn.compact
  def __call__(self, d: jax.Array, train: bool):
    h = map_conv(1, "conv")(d).reshape(d.shape[0], -1)
    h = activation(self.act)(_bn(train, "bn")(dense(self.hidden, bias=False, name="fc")(h)))
    return dense(self.features, name="mu")(h)


def _linspace_int(a: float, b: float, n: int) -> list[int]:
  # Integer truncation of numpy's linspace, as the reference computes channel and size ladders.
  return [int(v) for v in np.linspace(a, b, n)]


class Cnn1Encoder(nn.Module):
  """28×28 grey images → ``[B, R, R, C]``: three convs whose sizes interpolate linearly."""

  image_size: int
  channels: int
  out_channels: int
  representation_dim: int
  act: str = "swish"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    act = activation(self.act)
    chans = _linspace_int(self.channels, self.out_channels, 4)
    sizes = _linspace_int(self.image_size, self.representation_dim, 4)
    h = x
    for i in range(3):
      s = max(sizes[i] // sizes[i + 1], 1)
      k = sizes[i] - s * (sizes[i + 1] - 1) + 2
      h = RowConv(chans[i + 1], k, s, 1, name=f"conv{i}")(h)
      h = act(_bn(train, f"bn{i}")(h))
    return h


class Cnn1Decoder(nn.Module):
  """Mirror of :class:`Cnn1Encoder` with transposed convs; the last one has no bias (as the reference)."""

  image_size: int
  channels: int
  latent_channels: int
  representation_dim: int
  act: str = "swish"

  @nn.compact
  def __call__(self, z: jax.Array, train: bool):
    act = activation(self.act)
    chans = _linspace_int(self.latent_channels, self.channels, 4)
    sizes = _linspace_int(self.image_size, self.representation_dim, 4)[::-1]
    h = z
    for i in range(3):
      s = max(sizes[i + 1] // sizes[i], 1)
      k = sizes[i + 1] - s * (sizes[i] - 1) + 2
      h = RowConv(chans[i + 1], k, s, 1, transpose=True, name=f"convt{i}")(h)
      if i < 2:
        h = act(_bn(train, f"bn{i}")(h))
    return h  # logits or linear output: the output activation is applied by the model


class ResBlock(nn.Module):
  """[FORK] pre-activation residual block with three 3×3 convs; ``out = shortcut + 0.1·dx``."""

  in_channels: int
  out_channels: int
  act: str = "swish"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    act = activation(self.act)
    hid = min(self.in_channels, self.out_channels)
    dx = x
    for i, c in enumerate((self.in_channels, hid, self.out_channels)):
      dx = conv(c, 3, bias=True, name=f"conv{i}")(act(_bn(train, f"bn{i}")(dx)))
    shortcut = x
    if self.in_channels != self.out_channels:
      shortcut = conv(self.out_channels, 1, padding=0, name="shortcut")(x)
    return shortcut + 0.1 * dx


class Cnn2Encoder(nn.Module):
  """Colour images (32 or 64 px) → ``[B, R, R, C]``: a ResNet with strided-conv down-sampling."""

  image_size: int
  channels: int
  out_channels: int
  representation_dim: int
  act: str = "swish"
  base_channels: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    n = int(round(np.log2(self.image_size / self.representation_dim)))
    chans = _linspace_int(self.base_channels, self.out_channels, n + 1)
    h = conv(self.base_channels, 3, bias=True, name="conv_img")(x)
    h = ResBlock(self.base_channels, self.base_channels, self.act, name="res_in")(h, train)
    for i in range(n):
      h = conv(chans[i], 3, 2, 1, bias=True, name=f"down{i}")(h)
      h = ResBlock(chans[i], chans[i + 1], self.act, name=f"res{i}")(h, train)
    return activation(self.act)(_bn(train, "bn_out")(h))


class Cnn2Decoder(nn.Module):
  """Mirror of :class:`Cnn2Encoder`: ResBlocks with transposed-conv ×2 up-sampling."""

  image_size: int
  channels: int
  latent_channels: int
  representation_dim: int
  act: str = "swish"
  base_channels: int = 8

  @nn.compact
  def __call__(self, z: jax.Array, train: bool):
    n = int(round(np.log2(self.image_size / self.representation_dim)))
    chans = _linspace_int(self.latent_channels, self.base_channels, n + 1)
    h = z
    for i in range(n):
      h = ResBlock(chans[i], chans[i + 1], self.act, name=f"res{i}")(h, train)
      h = conv_transpose(chans[i + 1], 4, 2, 1, name=f"up{i}")(h)
    h = ResBlock(self.base_channels, self.base_channels, self.act, name="res_out")(h, train)
    h = activation(self.act)(_bn(train, "bn_out")(h))
    return conv(self.channels, 3, bias=True, name="conv_out")(h)


ENCODERS = {"cnn1": Cnn1Encoder, "cnn2": Cnn2Encoder}
DECODERS = {"cnn1": Cnn1Decoder, "cnn2": Cnn2Decoder}


def param_count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


__all__: Sequence[str] = [
  "ConvBlock",
  "GaussianHead",
  "Router",
  "ContrastiveProjection",
  "Cnn1Encoder",
  "Cnn1Decoder",
  "Cnn2Encoder",
  "Cnn2Decoder",
  "ResBlock",
  "ENCODERS",
  "DECODERS",
  "activation",
  "param_count",
]
