"""Stage 1: how evenly the test split spreads over the leaves.

With ``p_k`` the share of test images whose most probable leaf is leaf ``k`` (of ``K``), the
entropy is ``H = -Σ_k p_k ln p_k`` (nats; empty leaves add 0) and the reported value is
``H / ln K``: 1 when every leaf holds as many images, 0 when one leaf holds them all (and for a
one-leaf tree).
"""

from __future__ import annotations

import numpy as np

from tree_diffusion.eval.metrics._common import Row

STAGE = "stage1"
SETTINGS = ()


def compute(ctx) -> dict:
  probs = np.asarray(ctx.test_probs)
  k = probs.shape[1]
  counts = np.bincount(probs.argmax(1), minlength=k).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  entropy = float(-(p * np.log(p)).sum())
  return {
    "entropy": entropy,
    "normalized": entropy / float(np.log(k)) if k > 1 else 0.0,
    "num_leaves": int(k),
  }


def rows(stage1: dict, step) -> list[Row]:
  return [Row("leaf_size_entropy", (stage1.get("leaf_size_entropy") or {}).get("normalized"), step)]


def columns(thresholds) -> list[str]:
  return ["leaf_size_entropy"]
