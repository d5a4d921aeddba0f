"""One DDIM update (Song et al. 2021, eq. 12) as the reference applies it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normal_like(key: jax.Array, x: jax.Array) -> jax.Array:
  """Standard normal noise shaped like ``x``.

  ``key`` is one key, or a batch of keys ``[B]`` (one per example, ``B = x.shape[0]``): then row
  ``b`` depends only on ``key[b]``, so an example's noise does not depend on the batch it is in or
  on how the batch is split over devices.
  """
  if key.shape == ():
    return jax.random.normal(key, x.shape, x.dtype)
  if key.shape != x.shape[:1]:
    raise ValueError(f"need one key or one key per example ({x.shape[0]}), got keys {key.shape}")
  return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)


def predict_x0(x_t: jax.Array, eps: jax.Array, alpha_bar_t, clip: bool = True) -> jax.Array:
  """``x̃0 = x_t / sqrt(ᾱ_t) − sqrt(1/ᾱ_t − 1) ε̂``, clipped to [−1, 1] like the reference.

  (The data live in [0, 1] while the clip is to [−1, 1]: the reference's convention.)
  """
  x0 = x_t * jax.lax.rsqrt(alpha_bar_t) - jnp.sqrt(1.0 / alpha_bar_t - 1.0) * eps
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def ddim_step(
  x_t: jax.Array,
  eps: jax.Array,
  alpha_bar_t,
  alpha_bar_prev,
  eta=0.0,
  key: jax.Array | None = None,
  *,
  clip: bool = True,
  x0: jax.Array | None = None,
) -> jax.Array:
  """``x_{t'}`` from ``x_t`` and the predicted noise ``eps`` (DDIM eq. 12).

  ``x' = sqrt(ᾱ') x̃0 + sqrt(1 − ᾱ' − σ²) ε̂ + σ ξ`` with
  ``σ = η sqrt((1 − ᾱ')/(1 − ᾱ)) sqrt(1 − ᾱ/ᾱ')``. ``x̃0`` is clipped (see :func:`predict_x0`) but
  the *unclipped* ``ε̂`` is reused in the update, as the reference does. ``η = 0`` is deterministic
  and needs no key; at the last step (``ᾱ' = 1``) the result is ``x̃0``.

  Args:
    x_t: the current sample.
    eps: the network's noise prediction for ``x_t``.
    alpha_bar_t: ``ᾱ`` of the current step (DDPM's cumulative product).
    alpha_bar_prev: ``ᾱ`` of the step being moved to (1 after the last step).
    eta: 0 for DDIM, 1 for the DDPM-like variance.
    key: one key or one per example (see :func:`normal_like`); needed when ``eta > 0``.
    clip: clip ``x̃0`` to [−1, 1].
    x0: ``x̃0`` when the caller has it already (other prediction targets,
      :meth:`~tree_diffusion.diffusion.process.Process.x0_and_eps`); ``clip`` is then unused.
  """
  if x0 is None:
    x0 = predict_x0(x_t, eps, alpha_bar_t, clip)
  sigma = (
    eta
    * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t))
    * jnp.sqrt(1.0 - alpha_bar_t / alpha_bar_prev)
  )
  x = (
    jnp.sqrt(alpha_bar_prev) * x0
    + jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
  )
  if key is not None:
    x = x + sigma * normal_like(key, x_t)
  elif not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError("ddim_step with eta > 0 needs a key")
  return x
