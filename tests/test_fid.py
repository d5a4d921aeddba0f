"""The Fréchet distance against an independent float64 computation."""

import numpy as np
import pytest

from tree_diffusion.eval import fid


def _spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _sqrt_psd(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference(mu1, s1, mu2, s2):
  """tr sqrtm(Σ1 Σ2) = tr sqrtm(Σ1^½ Σ2 Σ1^½), a symmetric PSD matrix: sum of sqrt eigenvalues."""
  r = _sqrt_psd(s1)
  inner = np.linalg.eigvalsh(r @ s2 @ r)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


@pytest.mark.parametrize("d,seed", [(1, 0), (8, 1), (64, 2)])
def test_frechet_distance_matches_an_independent_computation(d, seed):
  rng = np.random.default_rng(seed)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _spd(rng, d), _spd(rng, d)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(200, 32))
  mu, sigma = fid.activation_statistics(feats)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_statistics_are_float64_mean_and_unbiased_covariance():
  feats = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], np.float32)
  mu, sigma = fid.activation_statistics(feats)
  assert mu.dtype == np.float64 and np.allclose(mu, [2.0, 4.0])
  centred = feats - feats.mean(0)
  assert np.allclose(sigma, centred.T @ centred / 2)  # divides by N - 1
  with pytest.raises(ValueError):
    fid.activation_statistics(feats[:1])
