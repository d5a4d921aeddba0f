"""The denoiser: the OpenAI-style UNet of DiffuseVAE/TreeDiffusion, NHWC.

Layer order, widths and zero-initialisations follow the reference so that parameter counts match
exactly (tested against the counts of the reference built from its configs). Two details are easy
to get wrong and matter for fidelity:

* ``attn_resolutions`` are **downsampling factors** (1, 2, 4, …), not pixel sizes: the MNIST
  config's ``(16,)`` never fires, so its only attention is in the middle block.
* stride-2 convolutions pad (1, 1) explicitly (Flax's ``"SAME"`` pads (0, 1) and shifts the grid),
  GroupNorm uses eps 1e-5, and the timestep sinusoid is ``[cos, sin]``.

Kernels are initialised like PyTorch's default (uniform ±1/sqrt(fan_in)); biases start at zero
(PyTorch draws them uniformly: a deliberate, harmless difference).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """``[cos(t f), sin(t f)]`` with ``f_k = exp(−ln(max_period) k / (dim/2))``; ``t`` unscaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def conv(
  features: int,
  kernel: int = 3,
  stride: int = 1,
  zero: bool = False,
  dtype=jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    kernel_init=zeros if zero else torch_uniform,
    dtype=dtype,
    name=name,
  )


class GroupNorm(nn.Module):
  """PyTorch's ``GroupNorm32``: statistics in float32, eps 1e-5."""

  groups: int = 32

  @nn.compact
  def __call__(self, x):
    dtype = x.dtype
    y = nn.GroupNorm(num_groups=min(self.groups, x.shape[-1]), epsilon=1e-5, dtype=jnp.float32)(
      x.astype(jnp.float32)
    )
    return y.astype(dtype)


class ResBlock(nn.Module):
  """GN → SiLU → conv, the embedding added (or AdaGN ``GN(h)(1+s)+b``), GN → SiLU → dropout → zero conv."""

  out_channels: int
  dropout: float
  scale_shift: bool
  groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    c = self.out_channels
    h = conv(c, dtype=self.dtype)(nn.silu(GroupNorm(self.groups)(x)))
    e = nn.Dense(2 * c if self.scale_shift else c, kernel_init=torch_uniform, dtype=self.dtype)(
      nn.silu(emb)
    )[:, None, None, :]
    norm = GroupNorm(self.groups)
    if self.scale_shift:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm(h) * (1.0 + scale) + shift
    else:
      h = norm(h + e)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(c, zero=True, dtype=self.dtype)(h)
    skip = x if x.shape[-1] == c else conv(c, kernel=1, dtype=self.dtype, name="skip")(x)
    return skip + h


class AttentionBlock(nn.Module):
  """Self-attention over the ``H·W`` positions, the "legacy" head layout, zero-initialised output."""

  heads: int
  groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    if c % self.heads:
      raise ValueError(f"attention width {c} is not divisible by {self.heads} heads")
    d = c // self.heads
    qkv = conv(3 * c, kernel=1, dtype=self.dtype)(GroupNorm(self.groups)(x))
    # Legacy layout: each head's 3d channels are [q | k | v] (matters only for weight import).
    q, k, v = jnp.split(qkv.reshape(b, hh * ww, self.heads, 3 * d), 3, axis=-1)
    s = d**-0.25
    logits = jnp.einsum("bthd,bshd->bhts", q * s, k * s)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", w, v).reshape(b, hh, ww, c)
    return x + conv(c, kernel=1, zero=True, dtype=self.dtype)(out)


def _padded_size(n: int) -> int:
  """The reference pads sides other than 32/64/128 (e.g. 28) to the next power of two."""
  return 1 << (n - 1).bit_length()


class UNet(nn.Module):
  """ε-prediction UNet.

  Attributes:
    out_channels: channels of the predicted noise (the image's channels).
    ch: base width; the embedding width is ``4 ch``.
    ch_mults: width multiplier per level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attn_resolutions: downsampling factors at which ResBlocks are followed by attention.
    num_heads: attention heads.
    dropout: dropout rate inside the ResBlocks.
    scale_shift: AdaGN conditioning (the reference switches it on exactly when a cluster signal is
      used); otherwise the embedding is added before the second GroupNorm.
    norm_groups: GroupNorm groups (32 in the reference; at most the width).
    dtype: computation dtype (parameters stay float32).
  """

  out_channels: int
  ch: int = 64
  ch_mults: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 8
  dropout: float = 0.1
  scale_shift: bool = True
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    return 4 * self.ch

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool):
    """``x``: ``[B, H, W, C_in]`` (image condition already concatenated); ``t``: int ``[B]``
    (original step indices); ``y``: optional ``[B, 4 ch]`` added to the time embedding."""
    size = x.shape[1]
    pad = (_padded_size(size) - size) // 2
    if pad:
      x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    e = self.embed_dim
    emb = nn.Dense(e, kernel_init=torch_uniform, dtype=self.dtype)(timestep_embedding(t, self.ch))
    emb = nn.Dense(e, kernel_init=torch_uniform, dtype=self.dtype)(nn.silu(emb))
    if y is not None:
      emb = emb + y.astype(emb.dtype)
    res = lambda c: ResBlock(c, self.dropout, self.scale_shift, self.norm_groups, self.dtype)
    attn = lambda: AttentionBlock(self.num_heads, self.norm_groups, self.dtype)

    h = conv(self.ch, dtype=self.dtype)(x.astype(self.dtype))
    skips = [h]
    ds = 1
    for level, mult in enumerate(self.ch_mults):
      for _ in range(self.num_res_blocks):
        h = res(self.ch * mult)(h, emb, train)
        if ds in self.attn_resolutions:
          h = attn()(h)
        skips.append(h)
      if level < len(self.ch_mults) - 1:
        h = conv(h.shape[-1], stride=2, dtype=self.dtype)(h)  # explicit (1, 1) padding
        skips.append(h)
        ds *= 2
    h = res(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = res(h.shape[-1])(h, emb, train)
    for level in reversed(range(len(self.ch_mults))):
      for i in range(self.num_res_blocks + 1):
        h = res(self.ch * self.ch_mults[level])(jnp.concatenate([h, skips.pop()], -1), emb, train)
        if ds in self.attn_resolutions:
          h = attn()(h)
        if level and i == self.num_res_blocks:
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest ×2
          h = conv(h.shape[-1], dtype=self.dtype)(h)
          ds //= 2
    h = nn.silu(GroupNorm(self.norm_groups)(h))
    out = conv(self.out_channels, zero=True, dtype=self.dtype)(h).astype(jnp.float32)
    if pad:
      out = out[:, pad:-pad, pad:-pad, :]
    return out
