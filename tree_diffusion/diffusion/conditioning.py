"""How the denoiser is conditioned on the TreeVAE, one code path.

A conditioning name is a ``+``-joined set of parts:

* an image part (at most one): ``image`` = the chosen leaf's TreeVAE decoding concatenated as extra
  input channels (DiffuseVAE "form1"), or ``form2`` = concatenated *and* shifting the mean of the
  forward process (``x_t = sqrt(ᾱ) x0 + x̂0 + sqrt(1−ᾱ) ε``);
* a cluster signal (at most one): ``path`` = ``Σ_{i ∈ root→leaf} MLP_lat(z_i) + MLP_id(i)`` (the
  path encoder; ``i`` is the node's BFS index as a raw float), ``leaf_id`` = ``MLP_id(l)`` with
  ``l`` the leaf's index, ``leaf_latent`` = ``MLP_lat(z_l)``, ``leaf_id+latent`` = both.

So ``path`` is the paper's final TreeDiffusion, ``image+path`` the reference repository's default,
``image`` the "TreeVAE + Diffusion" baseline, and ``leaf_id``/``leaf_latent``/``leaf_id+latent``
the ablations of the paper's Table 3 (add ``image+`` for their image-conditioned rows).

Every signal is the same masked sum over a fixed-size ``[B, D]`` array of (latent, id) entries: a
path is padded to the tree's depth with a zero mask, a leaf signal is one entry. There is no loop
over the batch. With a signal the ResBlocks use AdaGN, without one additive conditioning, exactly
as the reference ties them.

Classifier-free guidance drops the condition of a sample by zeroing its mask (the null path
embedding is ``y = 0``) and its image condition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion import inputs, precision
from tree_diffusion.diffusion.unet import UNet, torch_uniform
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree

IMAGE_PARTS = ("image", "form2")
SIGNALS = ("path", "leaf_id", "leaf_latent", "leaf_id+latent")
NAMES = (
  "path",
  "image+path",
  "image",
  "leaf_id",
  "leaf_latent",
  "leaf_id+latent",
  "form2",
  "form2+path",
  "image+leaf_id",
  "image+leaf_latent",
  "image+leaf_id+latent",
)


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """A parsed conditioning name (hashable: part of jit cache keys)."""

  image: str | None  # None, "image" (form1) or "form2"
  signal: str | None  # None or one of SIGNALS

  @classmethod
  def parse(cls, name: str) -> "Conditioning":
    parts = [p.strip() for p in str(name).split("+") if p.strip()]
    if parts[-2:] == ["leaf_id", "latent"]:
      parts = parts[:-2] + ["leaf_id+latent"]
    image = [p for p in parts if p in IMAGE_PARTS]
    signal = [p for p in parts if p in SIGNALS]
    if not parts or len(image) > 1 or len(signal) > 1 or len(image) + len(signal) != len(parts):
      raise ConfigError(
        f"unknown conditioning {name!r}; use one of {', '.join(NAMES)} "
        f"(e.g. --config.diffusion.conditioning=path)"
      )
    return cls(image[0] if image else None, signal[0] if signal else None)

  @property
  def name(self) -> str:
    return "+".join(p for p in (self.image, self.signal) if p)

  @property
  def uses_latent(self) -> bool:
    return self.signal in ("path", "leaf_latent", "leaf_id+latent")

  @property
  def uses_id(self) -> bool:
    return self.signal in ("path", "leaf_id", "leaf_id+latent")

  @property
  def form2(self) -> bool:
    return self.image == "form2"


class MLP(nn.Module):
  """``Linear → SiLU → Linear`` (the reference's projection block)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u):
    u = nn.Dense(self.features, kernel_init=torch_uniform, dtype=self.dtype)(u)
    return nn.Dense(self.features, kernel_init=torch_uniform, dtype=self.dtype)(nn.silu(u))


class SignalEncoder(nn.Module):
  """``y_b = Σ_d mask[b, d] (MLP_lat(latents[b, d]) + MLP_id(ids[b, d]))``: the path encoder and the
  leaf signals (one entry) in one masked sum."""

  features: int
  use_latent: bool
  use_id: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents, ids, mask):
    terms = 0.0
    if self.use_latent:
      terms = terms + MLP(self.features, self.dtype, name="latent")(latents)
    if self.use_id:
      terms = terms + MLP(self.features, self.dtype, name="node_id")(ids[..., None])
    return jnp.einsum("bd,bde->be", mask.astype(jnp.float32), terms.astype(jnp.float32))


class Denoiser(nn.Module):
  """The UNet with its condition: ``eps = Denoiser(x_t, t, cond)``.

  ``cond`` holds ``image`` ``[B, H, W, C]`` (image-conditioned variants) and ``latents``
  ``[B, D, z_dim]``, ``ids`` ``[B, D]``, ``mask`` ``[B, D]`` (signal variants); see
  :func:`make_condition`.
  """

  conditioning: Conditioning
  unet: dict  # UNet hyper-parameters (hashable items)
  dtype: Any = jnp.float32  # compute dtype (parameters stay float32; the output is float32)

  @nn.compact
  def __call__(self, x_t, t, cond: dict, *, train: bool):
    unet = UNet(
      out_channels=x_t.shape[-1],
      scale_shift=self.conditioning.signal is not None,
      dtype=self.dtype,
      **dict(self.unet),
    )
    y = None
    if self.conditioning.signal is not None:
      y = SignalEncoder(
        unet.embed_dim,
        self.conditioning.uses_latent,
        self.conditioning.uses_id,
        self.dtype,
        name="signal",
      )(cond["latents"], cond["ids"], cond["mask"])
    x = x_t
    if self.conditioning.image is not None:
      x = jnp.concatenate([x_t, cond["image"].astype(x_t.dtype)], axis=-1)
    return unet(x, t, y, train=train)


def make_denoiser(
  conditioning: str | Conditioning, unet_config, dtype: str = "float32"
) -> Denoiser:
  """A :class:`Denoiser` from a conditioning name, the config's ``diffusion.unet`` section and the
  compute dtype (``diffusion.dtype``)."""
  cond = (
    conditioning if isinstance(conditioning, Conditioning) else Conditioning.parse(conditioning)
  )
  u = dict(unet_config)
  unknown = sorted(set(u) - set(UNET_KEYS))
  if unknown:
    raise TypeError(f"unknown U-Net setting(s) {unknown}; the U-Net takes {', '.join(UNET_KEYS)}")
  for k in ("ch", "num_res_blocks", "num_heads", "norm_groups"):
    if k in u:
      inputs.count(u[k], f"unet {k}")
  for k in ("ch_mults", "attn_resolutions"):
    if k in u:
      u[k] = tuple(inputs.count(v, f"each of unet {k}") for v in u[k])
  if not u.get("ch_mults", (1,)):
    raise ValueError("unet ch_mults needs at least one level, e.g. (1, 2)")
  return Denoiser(cond, FrozenItems(u), precision.compute_dtype(dtype, "diffusion.dtype"))


# The settings of the U-Net a config's ``diffusion.unet`` section may hold (the rest of
# :class:`UNet`'s fields come from the data and the conditioning).
UNET_KEYS = (
  "ch",
  "ch_mults",
  "num_res_blocks",
  "attn_resolutions",
  "num_heads",
  "dropout",
  "norm_groups",
)


class FrozenItems(dict):
  """A dict that hashes by its items (linen module fields must be hashable for jit)."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))


# ----------------------------------------------------------------------------------- tree tables


@dataclasses.dataclass(frozen=True)
class PathTables:
  """Static tables of a tree for building conditions.

  Attributes:
    nodes: node ids in BFS order (= ``tree.nodes``; a node's BFS index is its position here, as
      the reference numbers them, passthrough nodes included).
    path_pos: ``[K, D]`` BFS positions of the root→leaf path of every leaf (``tree.leaves`` order),
      padded with 0.
    path_mask: ``[K, D]`` 1 for real path entries.
    leaf_pos: ``[K]`` BFS positions of the leaves (``tree.leaves`` order).
  """

  nodes: tuple[int, ...]
  path_pos: np.ndarray
  path_mask: np.ndarray
  leaf_pos: np.ndarray

  @classmethod
  def from_tree(cls, tree: Tree) -> "PathTables":
    pos = {n: i for i, n in enumerate(tree.nodes)}
    paths = [tree.path(leaf) for leaf in tree.leaves]
    d = max(len(p) for p in paths)
    path_pos = np.zeros((len(paths), d), np.int32)
    path_mask = np.zeros((len(paths), d), np.float32)
    for k, p in enumerate(paths):
      path_pos[k, : len(p)] = [pos[n] for n in p]
      path_mask[k, : len(p)] = 1.0
    leaf_pos = np.asarray([pos[n] for n in tree.leaves], np.int32)
    return cls(tuple(tree.nodes), path_pos, path_mask, leaf_pos)


def stack_latents(z: dict, nodes) -> jax.Array:
  """``[B, N, z_dim]``: every node's latent flattened (NHWC order), zero-padded to the widest."""
  flat = [z[n].reshape(z[n].shape[0], -1) for n in nodes]
  width = max(f.shape[1] for f in flat)
  return jnp.stack([jnp.pad(f, ((0, 0), (0, width - f.shape[1]))) for f in flat], axis=1)


def make_condition(
  cond: Conditioning,
  tables: PathTables,
  z_all: jax.Array,
  leaf: jax.Array,
  leaf_images: jax.Array | None = None,
  keep: jax.Array | None = None,
) -> dict:
  """The denoiser's ``cond`` for leaf ``leaf[b]`` (index into ``tree.leaves``) of every sample.

  Args:
    cond: the conditioning variant.
    tables: the tree's :class:`PathTables`.
    z_all: ``[B, N, z_dim]`` latents of every node (:func:`stack_latents`).
    leaf: int ``[B]``.
    leaf_images: ``[K, B, H, W, C]`` TreeVAE decodings of every leaf (image variants).
    keep: optional bool ``[B]``; False drops the sample's condition (classifier-free guidance).
  """
  out = {}
  b = leaf.shape[0]
  if cond.image is not None:
    image = leaf_images[leaf, jnp.arange(b)]
    if keep is not None:
      image = jnp.where(keep[:, None, None, None], image, 0.0)
    out["image"] = image
  if cond.signal == "path":
    pos = jnp.asarray(tables.path_pos)[leaf]  # [B, D]
    out["latents"] = jnp.take_along_axis(z_all, pos[..., None], axis=1)  # [B, D, z]
    out["ids"] = pos.astype(jnp.float32)
    out["mask"] = jnp.asarray(tables.path_mask)[leaf]
  elif cond.signal is not None:
    out["latents"] = z_all[jnp.arange(b), jnp.asarray(tables.leaf_pos)[leaf]][:, None]  # [B, 1, z]
    out["ids"] = leaf.astype(jnp.float32)[:, None]
    out["mask"] = jnp.ones((b, 1), jnp.float32)
  if cond.signal is not None and keep is not None:
    out["mask"] = out["mask"] * keep[:, None].astype(jnp.float32)
  return out


def null_condition(cond: dict) -> dict:
  """The same condition with every sample dropped (guidance's unconditional branch)."""
  out = dict(cond)
  if "image" in out:
    out["image"] = jnp.zeros_like(out["image"])
  if "mask" in out:
    out["mask"] = jnp.zeros_like(out["mask"])
  return out
