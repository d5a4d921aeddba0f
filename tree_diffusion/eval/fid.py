"""Fréchet distance between Gaussian fits of Inception activations (the
reference's FID: pool3 features of the TF-Inception port, 2048-d).

Statistics are computed on the host in float64: the mean and the *unbiased* covariance
(``np.cov(rowvar=False)``), as the reference's FID code does. Images enter the Inception network
as uint8: generated images are quantised with ``round(clip(x, 0, 1) · 255)`` (the reference's PNG
writer floors; rounding is unbiased), real images are the dataset's own uint8 pixels.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Callable

import numpy as np
import scipy.linalg
from absl import logging

from tree_diffusion import files


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
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(
      f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
    )
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


# ------------------------------------------------------------------------ features on disk
#
# Reference features (a dataset split through the Inception network) are cached as one ``.npz``
# holding ``features`` (float32 [N, 2048]) and ``meta`` (JSON: dataset, split, count, image shape,
# a SHA-1 of the uint8 images and the Inception weights' id). Statistics are recomputed from the
# features on load (a second), which keeps per-leaf subsets possible. A cache that cannot be read
# or whose meta differs is recomputed with a warning, never trusted.


def images_digest(images: np.ndarray) -> str:
  """SHA-1 of uint8 images (shape included): identifies a split's exact pixels."""
  h = hashlib.sha1(repr((images.shape, str(images.dtype))).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  return h.hexdigest()


def load_features(path: str, meta: dict) -> np.ndarray | None:
  """The cached features at ``path`` if readable and made for ``meta``, else ``None`` (warned)."""
  if not files.exists(path):
    return None
  try:
    f = files.load_npz(path)
    stored = json.loads(str(f["meta"]))
    features = np.asarray(f["features"], np.float32)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning(
      "cached Inception features %s are unreadable (%s); recomputing",
      path,
      " ".join(str(e).split()),
    )
    return None
  if stored != meta or features.shape[0] != meta.get("num_images", features.shape[0]):
    logging.warning(
      "cached Inception features %s were made for %s, not %s; recomputing", path, stored, meta
    )
    return None
  return features


def save_features(path: str, features: np.ndarray, meta: dict) -> None:
  """Writes the cache atomically (:func:`files.save_npz`)."""
  files.save_npz(
    path,
    compressed=False,
    features=np.asarray(features, np.float32),
    meta=np.asarray(json.dumps(meta, sort_keys=True)),
  )


def cached_features(path: str, meta: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """``compute()``'s features, computed once and cached at ``path`` under ``meta``."""
  features = load_features(path, meta)
  if features is None:
    features = np.asarray(compute(), np.float32)
    save_features(path, features, meta)
  return features


def fid_from_features(features: np.ndarray, reference: np.ndarray) -> float:
  """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (each N ≥ 2).

  With ``N1, N2 ≥ D`` this is :func:`frechet_distance` of the two statistics (``sqrtm`` of a
  ``D × D`` product, tens of seconds for D = 2048 on a small CPU). When either set has fewer
  images than dimensions, the covariances are low-rank and the same quantity is computed exactly
  from the centred features ``A``, ``B``: the non-zero eigenvalues of ``Σ1 Σ2`` are those of
  ``M Mᵀ / ((N1−1)(N2−1))`` with ``M = A Bᵀ`` (``[N1, N2]``), so
  ``tr sqrtm(Σ1 Σ2) = ‖M‖_* / sqrt((N1−1)(N2−1))``, the nuclear norm from one small SVD. This
  needs no ``eps`` fallback (singular covariances are the normal case there).
  """
  a, b = np.asarray(features, np.float64), np.asarray(reference, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"need features [N >= 2, D] with the same D; got {a.shape} and {b.shape}")
  (n1, d), n2 = a.shape, len(b)
  if min(n1, n2) >= d:
    return frechet_distance(*activation_statistics(a), *activation_statistics(b))
  mu1, mu2 = a.mean(0), b.mean(0)
  a, b = a - mu1, b - mu2
  nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
  return float(
    np.sum((mu1 - mu2) ** 2) + np.sum(a * a) / (n1 - 1) + np.sum(b * b) / (n2 - 1) - 2.0 * nuclear
  )


def per_group_fid(
  features: np.ndarray,
  groups: np.ndarray,
  reference: np.ndarray,
  reference_groups: np.ndarray,
  num_groups: int,
  min_count: int = 2,
) -> list:
  """FID of each group (e.g. leaf) of ``features`` against the same group of ``reference``.

  Returns one dict per group: ``fid`` (``None`` when either side has fewer than ``min_count``
  images), ``num`` and ``num_reference``. With fewer images than feature dimensions the
  covariances are singular and FID is strongly biased upwards: compare groups of similar size.
  """
  out = []
  for g in range(num_groups):
    a, b = features[groups == g], reference[reference_groups == g]
    ok = min(len(a), len(b)) >= max(2, min_count)
    out.append(
      {
        "fid": fid_from_features(a, b) if ok else None,
        "num": int(len(a)),
        "num_reference": int(len(b)),
      }
    )
  return out
