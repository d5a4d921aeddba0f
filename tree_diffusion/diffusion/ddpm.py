"""One ancestral DDPM update with the reference's two variances: ``fixedlarge`` (β_t, the first
step's replaced by the posterior variance) or ``fixedsmall`` (the posterior variance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tree_diffusion.diffusion.ddim import normal_like, predict_x0


def ddpm_step(
  x_t: jax.Array,
  eps: jax.Array,
  alpha_bar_t,
  coef_x0,
  coef_xt,
  variance,
  key: jax.Array,
  *,
  last,
  clip: bool = True,
  x0: jax.Array | None = None,
) -> jax.Array:
  """``x_{t−1} ~ N(μ, v)`` with ``μ = c1 x̃0 + c2 x_t`` and ``x̃0`` from ``eps`` (clipped).

  Args:
    x_t: the current sample.
    eps: the network's noise prediction.
    alpha_bar_t: ``ᾱ`` of the current step.
    coef_x0, coef_xt: the posterior-mean coefficients ``c1``, ``c2`` of this step
      (:class:`~tree_diffusion.diffusion.schedule.Respaced`).
    variance: the step's variance (``Respaced.ddpm_variance``).
    key: one key or one per example (:func:`~tree_diffusion.diffusion.ddim.normal_like`).
    last: True at the final step (``t = 0``), where no noise is added.
    clip: clip ``x̃0`` to [−1, 1].
    x0: ``x̃0`` when the caller has it already (``eps`` is then unused, ``clip`` too).
  """
  if x0 is None:
    x0 = predict_x0(x_t, eps, alpha_bar_t, clip)
  mean = coef_x0 * x0 + coef_xt * x_t
  noise = jnp.sqrt(variance) * normal_like(key, x_t)
  return mean + jnp.where(last, 0.0, 1.0) * noise
