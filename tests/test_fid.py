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
  return float(
    np.sum((mu1 - mu2) ** 2)
    + np.trace(s1)
    + np.trace(s2)
    - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
  )


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


def test_feature_cache_recomputes_corrupt_or_stale_files(tmp_path, caplog):
  path = str(tmp_path / "cache" / "f.npz")
  meta = {"dataset": "x", "split": "test", "num_images": 3}
  calls = []

  def compute():
    calls.append(1)
    return np.arange(6, dtype=np.float32).reshape(3, 2)

  first = fid.cached_features(path, meta, compute)
  again = fid.cached_features(path, meta, compute)
  assert len(calls) == 1 and np.array_equal(first, again)
  with open(path, "wb") as f:  # truncated / corrupt file
    f.write(b"PK\x03\x04 not a zip")
  with caplog.at_level("WARNING"):
    third = fid.cached_features(path, meta, compute)
  assert len(calls) == 2 and np.array_equal(third, first) and "unreadable" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):  # made for other data: recomputed, warned
    fid.cached_features(path, dict(meta, split="train"), compute)
  assert len(calls) == 3 and "recomputing" in caplog.text


def test_per_group_fid_uses_matching_groups_only():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 5.0
  feats = np.concatenate([a, b])
  groups = np.array([0] * 40 + [1] * 30)
  out = fid.per_group_fid(feats, groups, feats, groups, num_groups=3)
  assert out[0]["fid"] == pytest.approx(0.0, abs=1e-8) and out[1]["fid"] == pytest.approx(
    0.0, abs=1e-8
  )
  assert out[2] == {"fid": None, "num": 0, "num_reference": 0}
  swapped = fid.per_group_fid(feats, groups, feats, 1 - groups, num_groups=2)
  assert swapped[0]["fid"] == pytest.approx(fid.fid_from_features(a, b))


def test_images_digest_sees_every_pixel_and_the_shape():
  x = np.zeros((2, 4, 4, 1), np.uint8)
  y = x.copy()
  y[1, 3, 3, 0] = 1
  assert fid.images_digest(x) != fid.images_digest(y)
  assert fid.images_digest(x) != fid.images_digest(x.reshape(2, 4, 1, 4))


@pytest.mark.parametrize("n1,n2,d", [(5, 9, 16), (30, 6, 16), (40, 50, 20)])
def test_fid_from_features_matches_the_eigenvalue_reference(n1, n2, d):
  """Both the low-rank path (fewer images than dimensions) and the sqrtm path."""
  rng = np.random.default_rng(n1)
  a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d))
  b = rng.normal(size=(n2, d)) + 0.5
  want = _reference(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
  assert fid.fid_from_features(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)
