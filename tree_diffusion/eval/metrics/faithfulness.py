"""Per stage-2 checkpoint: do a leaf's generations have the class mix of the leaf's real images?

For leaf ``k`` (of ``K``) and the ``sample_all_leaves`` generations (``N`` prior draws, each
decoded through every leaf), with ``p_nk`` the probability that draw ``n`` reaches leaf ``k`` and
``ŷ_nk`` the purity classifier's class of its image through leaf ``k``:

* the generations' class histogram weights each draw by how likely it is to reach the leaf,
  ``g_k(c) = Σ_n p_nk [ŷ_nk = c] / Σ_n p_nk`` (the leaf's share of the prior; no threshold);
* the real histogram ``r_k(c)`` is the label histogram of the test images whose most probable
  leaf is ``k``;
* the leaf's value is the total-variation distance ``TV_k = ½ Σ_c |g_k(c) − r_k(c)|``, 0 when the
  mixes agree and 1 when they share no class;
* the reported value weights the leaves by their share of the test images,
  ``Σ_k n_k TV_k / Σ_k n_k``; a leaf without test images (or without any probability mass among
  the draws) has weight 0. Lower is more faithful.

It is computed for the diffusion model's generations and for the TreeVAE's decodings of the same
draws. The 95 % interval is the 2.5th to 97.5th percentile of the weighted value over
:data:`NUM_BOOTSTRAP` resamples (with replacement, seeded by ``eval.seed``) of the prior draws
and, independently, of the test images.

Unlike the purity of generations, which rewards a leaf whose generations a classifier labels as
one class (blurred decodings of a mixed leaf included), this asks for the leaf's real mix.
"""

from __future__ import annotations

import numpy as np

from tree_diffusion.eval.metrics._common import Row, get

STAGE = "samples"
MODES = ("sample_all_leaves",)
SETTINGS = ("purity_samples", "batch_size", "seed")
NUM_BOOTSTRAP = 1000
_GENERATORS = (("faithfulness", "diffusion"), ("faithfulness_treevae", "treevae"))


def class_histograms(weights: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
  """``[K, C]``: per column ``k``, the ``weights[:, k]``-weighted histogram of ``classes[:, k]``
  (unnormalised), for ``weights`` and ``classes`` of shape ``[N, K]``."""
  n, k = classes.shape
  flat = (np.arange(k)[None, :] * num_classes + classes).ravel()
  return np.bincount(flat, weights.ravel(), minlength=k * num_classes).reshape(k, num_classes)


def weighted_tv(
  leaf_probs: np.ndarray,
  predicted: np.ndarray,
  test_leaves: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
) -> tuple[float | None, list[float | None], np.ndarray]:
  """``(weighted TV, TV per leaf, test images per leaf)``; see the module docstring.

  Args:
    leaf_probs: ``[N, K]`` probability of draw n reaching leaf k.
    predicted: ``[N, K]`` class of draw n's image through leaf k.
    test_leaves: ``[M]`` each test image's leaf (column index 0..K-1).
    test_labels: ``[M]`` its label (negative: unlabelled, left out).
    num_classes: C.
  """
  probs = np.asarray(leaf_probs, np.float64)
  k = probs.shape[1]
  gen = class_histograms(probs, np.asarray(predicted, np.int64), num_classes)
  labelled = np.asarray(test_labels) >= 0
  leaves = np.asarray(test_leaves, np.int64)[labelled]
  real = np.zeros((k, num_classes))
  np.add.at(real, (leaves, np.asarray(test_labels, np.int64)[labelled]), 1.0)
  n_real, mass = real.sum(1), gen.sum(1)
  ok = (n_real > 0) & (mass > 0)
  tv = np.full(k, np.nan)
  tv[ok] = 0.5 * np.abs(gen[ok] / mass[ok, None] - real[ok] / n_real[ok, None]).sum(1)
  weighted = float((n_real[ok] * tv[ok]).sum() / n_real[ok].sum()) if ok.any() else None
  return weighted, [float(v) if ok[i] else None for i, v in enumerate(tv)], n_real


def faithfulness(
  leaf_probs: np.ndarray,
  predicted: np.ndarray,
  test_leaves: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  *,
  seed: int = 0,
  num_bootstrap: int = NUM_BOOTSTRAP,
) -> dict:
  """The weighted TV with its bootstrap interval, and each leaf's TV and weight."""
  value, per_leaf, n_real = weighted_tv(
    leaf_probs, predicted, test_leaves, test_labels, num_classes
  )
  rng = np.random.default_rng([seed, 25])
  n, m = len(leaf_probs), len(test_leaves)
  draws = []
  for _ in range(num_bootstrap if value is not None else 0):
    g, r = rng.integers(0, n, n), rng.integers(0, m, m)
    v, _, _ = weighted_tv(leaf_probs[g], predicted[g], test_leaves[r], test_labels[r], num_classes)
    if v is not None:
      draws.append(v)
  interval = [float(q) for q in np.percentile(draws, [2.5, 97.5])] if draws else None
  total = float(n_real.sum())
  return {
    "weighted_tv": value,
    "interval_95": interval,
    "num_bootstrap": len(draws),
    "num_draws": int(n),
    "leaves": [
      {"tv": tv, "weight": float(w / total) if total else 0.0, "num_test": int(w)}
      for tv, w in zip(per_leaf, n_real)
    ],
  }


def compute(ctx) -> dict:
  if ctx.classifier is None or not ctx.test.num_classes:
    return {}
  num_classes = ctx.classifier.model.num_classes
  probs = np.asarray(ctx.result["leaf_probs"])
  test_leaves = np.asarray(ctx.test_probs).argmax(1)
  out = {}
  for entry, generator in _GENERATORS:
    out[entry] = faithfulness(
      probs,
      np.asarray(ctx.predictions(generator)),
      test_leaves,
      ctx.test.labels,
      num_classes,
      seed=ctx.settings.seed,
    )
  d, t = out["faithfulness"], out["faithfulness_treevae"]
  ctx.evaluator.log(
    f"step {ctx.stage2.step}: class-mix TV to each leaf's test images (lower is more faithful): "
    f"diffusion {d['weighted_tv']:.3f}, TreeVAE {t['weighted_tv']:.3f}"
    if d["weighted_tv"] is not None and t["weighted_tv"] is not None
    else f"step {ctx.stage2.step}: no leaf has both test images and generations"
  )
  return out


def rows(checkpoint: dict, step) -> list[Row]:
  out = []
  for (entry, _), name in zip(_GENERATORS, ("faithfulness_tv", "treevae_faithfulness_tv")):
    result = get(checkpoint, "modes", "sample_all_leaves", entry) or {}
    out.append(Row(name, result.get("weighted_tv"), step))
    out += [Row(name, leaf["tv"], step, leaf=i) for i, leaf in enumerate(result.get("leaves", ()))]
  return out


def columns(thresholds) -> list[str]:
  return ["faithfulness_tv", "treevae_faithfulness_tv"]
