"""Fréchet distance between Gaussian fits of Inception activations (``treediffusion.md`` §8.1).

Statistics are computed on the host in float64: the mean and the *unbiased* covariance
(``np.cov(rowvar=False)``), as the reference's FID code does.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` of ``[N, D]`` features: float64 mean and unbiased covariance (N ≥ 2)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """``|mu1 − mu2|² + tr(Σ1 + Σ2 − 2 sqrtm(Σ1 Σ2))``.

  As in the reference: if ``sqrtm`` is not finite (a near-singular product), ``eps · I`` is added
  to both covariances and it is recomputed; a complex result is accepted only if the imaginary
  parts of its diagonal are ≤ 1e-3 (then dropped), otherwise it is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > 1e-3:
      raise ValueError(f"sqrtm(Σ1 Σ2) has an imaginary component of {imag:.3g} on its diagonal")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
