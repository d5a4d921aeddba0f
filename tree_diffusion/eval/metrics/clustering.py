"""Stage 1: how the test split clusters into the leaves (NMI, accuracy, leaf and dendrogram
purity, leaf counts, label histograms), each test image in its most probable leaf.

The same function, :func:`tree_diffusion.clustering.summary`, makes stage 1's final metrics.
"""

from __future__ import annotations

from tree_diffusion import clustering
from tree_diffusion.eval.metrics._common import Row

STAGE = "stage1"
SETTINGS = ()
_COLUMNS = ("nmi", "accuracy", "leaf_purity", "dendrogram_purity")


def compute(ctx) -> dict:
  labels = ctx.test.labels if ctx.test.num_classes else None
  return clustering.summary(ctx.tree, labels, ctx.test_probs)


def rows(stage1: dict, step) -> list[Row]:
  entry = stage1.get("clustering") or {}
  return [Row(c, entry.get(c), step) for c in _COLUMNS]


def columns(thresholds) -> list[str]:
  return list(_COLUMNS)
