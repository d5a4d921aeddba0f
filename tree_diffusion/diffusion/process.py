"""The forward process a denoiser is trained on and sampled with: noise schedule, what the network
predicts, and the range the images live in.

The reference (and the paper's configs) use one point of this space: a linear β schedule over
``T = 1000`` steps, ε-prediction, images in [0, 1]. Three extensions, off by default, are offered
for small training budgets (the offline demo uses them; ``configs/demo.py`` says why):

* ``schedule="cosine"``: ``ᾱ(t) = f(t) / f(0)``, ``f(t) = cos²((t/T + s) / (1 + s) · π/2)`` with
  ``s = 0.008`` and ``β`` capped at 0.999 (Nichol & Dhariwal 2021, eq. 17). ``beta_1``/``beta_T``
  are then unused.
* ``prediction``: the network's output is read as ``"eps"`` (the noise ε, the reference),
  ``"x0"`` (the clean image) or ``"v"`` (``v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0``, Salimans & Ho 2022);
  the loss regresses that quantity.
* ``center_data``: the chain runs on ``2x − 1`` (in [−1, 1], the range the sampler's clip of
  ``x̃0`` assumes) instead of the reference's ``x`` in [0, 1]; samples are mapped back.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion.diffusion import schedule
from tree_diffusion.diffusion.ddim import predict_x0
from tree_diffusion.errors import ConfigError

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")


def cosine_alpha_bars(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """``ᾱ_t`` (float64 ``[T]``) of the cosine schedule at ``t = 1 … T`` (index ``t − 1``)."""
  f = lambda t: np.cos((t / T + s) / (1.0 + s) * math.pi / 2) ** 2
  t = np.arange(T + 1, dtype=np.float64)
  betas = np.minimum(1.0 - f(t[1:]) / f(t[:-1]), max_beta)
  return schedule.alpha_bars(betas)


@dataclasses.dataclass(frozen=True)
class Process:
  """The diffusion process (hashable, so it can be a static argument)."""

  T: int = 1000
  beta_1: float = 1e-4
  beta_T: float = 0.02
  schedule: str = "linear"
  prediction: str = "eps"
  center_data: bool = False

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ConfigError(
        f"unknown noise schedule {self.schedule!r}; use one of {SCHEDULES} "
        f"(--config.diffusion.schedule)"
      )
    if self.prediction not in PREDICTIONS:
      raise ConfigError(
        f"unknown prediction target {self.prediction!r}; use one of "
        f"{PREDICTIONS} (--config.diffusion.prediction)"
      )

  @classmethod
  def from_config(cls, c) -> "Process":
    """From the config's ``diffusion`` section."""
    return cls(
      T=c.T,
      beta_1=c.beta_1,
      beta_T=c.beta_T,
      schedule=c.schedule,
      prediction=c.prediction,
      center_data=bool(c.center_data),
    )

  def alpha_bar(self) -> np.ndarray:
    """``ᾱ_t`` for ``t = 0 … T−1`` (float64)."""
    if self.schedule == "cosine":
      return cosine_alpha_bars(self.T)
    return schedule.alpha_bars(schedule.linear_betas(self.T, self.beta_1, self.beta_T))

  def encode(self, x: jax.Array) -> jax.Array:
    """Images in [0, 1] → the space the chain runs in."""
    return 2.0 * x - 1.0 if self.center_data else x

  def decode(self, x: jax.Array) -> jax.Array:
    """The chain's space → images in [0, 1] (unclipped)."""
    return (x + 1.0) * 0.5 if self.center_data else x

  def target(self, x0: jax.Array, eps: jax.Array, alpha_bar_t) -> jax.Array:
    """What the network is trained to output at ``x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε``."""
    if self.prediction == "eps":
      return eps
    if self.prediction == "x0":
      return x0
    return jnp.sqrt(alpha_bar_t) * eps - jnp.sqrt(1.0 - alpha_bar_t) * x0

  def x0_and_eps(
    self, pred: jax.Array, x_t: jax.Array, alpha_bar_t, clip: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    """``(x̃0, ε̂)`` from the network's output at ``x_t``; ``x̃0`` clipped to [−1, 1] if ``clip``.

    ε-prediction keeps the *unclipped* ``ε̂`` as the reference does; x0-prediction derives ``ε̂``
    from the clipped ``x̃0`` (so the update stays on the line through ``x_t`` and ``x̃0``);
    v-prediction takes both from ``v`` and clips ``x̃0`` only.
    """
    a = alpha_bar_t
    if self.prediction == "eps":
      x0, eps = predict_x0(x_t, pred, a, clip=False), pred
    elif self.prediction == "x0":
      x0 = pred
      eps = None
    else:
      x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * pred
      eps = jnp.sqrt(1.0 - a) * x_t + jnp.sqrt(a) * pred
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    if eps is None:
      eps = (x_t - jnp.sqrt(a) * x0) * jax.lax.rsqrt(1.0 - a)
    return x0, eps
