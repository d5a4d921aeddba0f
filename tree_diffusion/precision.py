"""Mixed precision: the compute dtype of a stage (``stage1.dtype``, ``diffusion.dtype``).

Parameters, optimiser state, EMA and BatchNorm running statistics always stay float32; with
``"bfloat16"`` the convolutions and matmuls run in bfloat16 while normalisation statistics, the
softmax of attention, the latent Gaussians, router probabilities and every loss stay float32
(see ``TreeVAE.dtype`` and ``UNet.dtype``).
"""

from __future__ import annotations

import jax.numpy as jnp

from tree_diffusion.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, setting: str = "dtype"):
  """The JAX dtype for a config value ``"float32"`` or ``"bfloat16"``."""
  if name not in DTYPES:
    raise ConfigError(
      f"unknown compute dtype {name!r} for --config.{setting}; use one of {', '.join(DTYPES)}"
    )
  return DTYPES[name]
