"""The ELBO terms of TreeVAE as pure functions.

Conventions of the reference that these functions keep on purpose:

* Networks output *variances* (softplus); every Gaussian has std ``sqrt(var + EPS)``.
* KLs and reconstruction losses are **sums** over all latent / pixel dimensions, per sample.
* BCE is computed on the sigmoid output with each log term clamped at −100 (PyTorch's
  ``binary_cross_entropy``). We evaluate it from logits with ``log_sigmoid`` and the same clamp; the
  two agree except where float32 ``sigmoid`` saturates, where ours is the more accurate one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-7


def _sum_per_sample(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).sum(axis=-1)


def merge_gaussians(mu_hat, var_hat, mu_p, var_p):
  """Precision-weighted merge of the bottom-up proposal and the top-down prior (LadderVAE).

  ``var_q = 1 / (1/(vâr+ε) + 1/(var_p+ε))``, ``mu_q = (mû/(vâr+ε) + mu_p/(var_p+ε)) · var_q``.
  """
  prec_hat = 1.0 / (var_hat + EPS)
  prec_p = 1.0 / (var_p + EPS)
  var_q = 1.0 / (prec_hat + prec_p)
  mu_q = (mu_hat * prec_hat + mu_p * prec_p) * var_q
  return mu_q, var_q


def sample_gaussian(key, mu, var):
  """Reparameterised sample ``mu + sqrt(var + ε)·ε``."""
  return mu + jnp.sqrt(var + EPS) * jax.random.normal(key, mu.shape, mu.dtype)


def gaussian_kl(mu_q, var_q, mu_p, var_p) -> jax.Array:
  """KL(N(mu_q, var_q+ε) ‖ N(mu_p, var_p+ε)) summed over all but the batch axis → ``[B]``."""
  vq = var_q + EPS
  vp = var_p + EPS
  kl = 0.5 * (jnp.log(vp) - jnp.log(vq) + (vq + (mu_q - mu_p) ** 2) / vp - 1.0)
  return _sum_per_sample(kl)


def bernoulli_kl(pi_q, pi_p) -> jax.Array:
  """The reference's eps-protected KL(Bern(π_q) ‖ Bern(π_p)), elementwise."""
  return pi_q * jnp.log(EPS + pi_q / (pi_p + EPS)) + (1.0 - pi_q) * jnp.log(
    EPS + (1.0 - pi_q) / (1.0 - pi_p + EPS)
  )


def reconstruction_loss(x, out, kind: str) -> jax.Array:
  """Per-sample reconstruction loss ``[B]`` summed over pixels.

  Args:
    x: targets in [0, 1], ``[B, H, W, C]``.
    out: decoder output before the output activation (logits for ``sigmoid``).
    kind: ``"sigmoid"`` (BCE with log clamp −100) or ``"mse"`` (plain sum of squares, no ½).
  """
  if kind == "sigmoid":
    log_p = jnp.maximum(jax.nn.log_sigmoid(out), -100.0)
    log_1mp = jnp.maximum(jax.nn.log_sigmoid(-out), -100.0)
    return _sum_per_sample(-(x * log_p + (1.0 - x) * log_1mp))
  if kind == "mse":
    return _sum_per_sample((out - x) ** 2)
  raise ValueError(f"unknown output activation {kind!r}; use 'sigmoid' or 'mse'")


def gaussian_log_density(z, mu, var) -> jax.Array:
  """``log N(z; mu, var + ε)`` summed over all but the batch axis → ``[B]``."""
  v = var + EPS
  return _sum_per_sample(-0.5 * (jnp.log(2.0 * jnp.pi * v) + (z - mu) ** 2 / v))


def log_likelihood(x, out, kind: str) -> jax.Array:
  """``log p(x | z)`` per sample ``[B]`` of the decoder's observation model.

  ``sigmoid``: the Bernoulli whose negative log is the training BCE. ``mse``: ``N(x; out, ½ I)``,
  whose negative log is the training loss ``Σ (out − x)²`` plus the constant ``(D/2) log π`` that
  training drops (the reference's likelihood code for colour images is broken; this is the
  density its loss actually fits).
  """
  if kind == "mse":
    d = np.prod(x.shape[1:])
    return -reconstruction_loss(x, out, kind) - 0.5 * d * np.log(np.pi)
  return -reconstruction_loss(x, out, kind)


def output_image(out, kind: str):
  """Decoder output → image in data space."""
  return jax.nn.sigmoid(out) if kind == "sigmoid" else out


def _two_view_log_softmax(sim: jax.Array):
  """Per-sample ``log(s_aa' / Σ_{b≠a} s_ab)`` for a [2N, 2N] similarity (logit) matrix.

  Row ``a``'s positive is the other view of the same image, ``a ± N``.
  """
  n2 = sim.shape[0]
  half = n2 // 2
  sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)  # self excluded from the denominator
  pos = jnp.concatenate([jnp.arange(half, n2), jnp.arange(0, half)])
  log_den = jax.nn.logsumexp(sim, axis=1)
  return sim[jnp.arange(n2), pos] - log_den


def router_infonce(pi_q: jax.Array, weights: jax.Array) -> jax.Array:
  """Router InfoNCE of one internal node (temperature 1 on L2-normalised ``(π, 1−π)``).

  Args:
    pi_q: q-router probabilities ``[2N]``, first half view 1, second half view 2.
    weights: path probabilities of the samples to this node, ``[2N]`` (detached here).
  """
  u = jnp.stack([pi_q, 1.0 - pi_q], axis=-1)
  u = _l2_normalize(u)
  loss = -_two_view_log_softmax(u @ u.T)
  w = jax.lax.stop_gradient(weights)
  return jnp.sum(w * loss) / jnp.sum(w)


def _l2_normalize(x: jax.Array) -> jax.Array:
  # As torch.nn.functional.normalize: a zero vector stays zero instead of becoming NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nt_xent(embeddings: jax.Array, temperature: float = 0.5) -> jax.Array:
  """NT-Xent of one bottom-up level's projections ``[2N, D]``: mean over the 2N samples."""
  e = _l2_normalize(embeddings)
  return -jnp.mean(_two_view_log_softmax(e @ e.T / temperature))
