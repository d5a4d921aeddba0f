"""Per stage-2 checkpoint: the classifier's per-leaf purity of the ``sample_all_leaves``
generations (the reference's evaluation), for the diffusion model and, on the same prior samples
through the same leaves, for the TreeVAE's own decodings; one histogram figure per threshold.

At each threshold of ``classifier.thresholds`` a generation is kept for a leaf when its prior
sample reaches that leaf with probability at least the threshold; the value is the kept-weighted
mean over leaves of the majority class's share (:mod:`tree_diffusion.eval.purity`). It rewards
generations that a classifier labels as one class, blurred ones included.
"""

from __future__ import annotations

import numpy as np

from tree_diffusion import files
from tree_diffusion.eval import purity as purity_lib
from tree_diffusion.eval.metrics._common import Row, get

STAGE = "samples"
MODES = ("sample_all_leaves",)
SETTINGS = ("purity_samples", "batch_size")


def compute(ctx) -> dict:
  if ctx.classifier is None:
    return {}
  stage2, thresholds = ctx.stage2, ctx.thresholds
  num_classes = ctx.classifier.model.num_classes
  probs = ctx.result["leaf_probs"]

  def report(generator: str) -> dict:
    return purity_lib.leaf_purity_report(
      ctx.classifier, ctx.predictions(generator), probs, thresholds
    )

  out = {"purity": report("diffusion")}
  for t in thresholds if ctx.evaluator.writes else ():  # process 0 writes
    purity_lib.save_leaf_histogram_figure(
      files.join(ctx.out_dir, f"leaf_histograms_p{t:g}.png"),
      ctx.images,
      probs,
      np.asarray(ctx.predictions("diffusion")),
      num_classes,
      t,
      class_names=ctx.classifier.class_names,
      leaf_labels=[str(n) for n in stage2.tree.leaves],
      title=f"{ctx.dataset}, step {stage2.step}: classes of samples with p(leaf) ≥ {t:g}",
    )
  # The TreeVAE's own decodings of the same prior samples through the same leaves, kept by the
  # same leaf probabilities: the column the diffusion model is compared with.
  out["purity_treevae"] = report("treevae")
  first_t = str(float(thresholds[0]))
  first, tvae = (out[k]["thresholds"][first_t] for k in ("purity", "purity_treevae"))
  ctx.evaluator.log(
    f"step {stage2.step}: weighted majority fraction at p ≥ {first['threshold']}: "
    f"diffusion {first['weighted_majority_fraction']}, TreeVAE "
    f"{tvae['weighted_majority_fraction']} ({first['total_kept']} kept)"
  )
  return out


def rows(checkpoint: dict, step) -> list[Row]:
  out = []
  for name, entry, field in (
    ("majority", "purity", "weighted_majority_fraction"),
    ("kept", "purity", "total_kept"),
    ("treevae_majority", "purity_treevae", "weighted_majority_fraction"),
  ):
    thresholds = get(checkpoint, "modes", "sample_all_leaves", entry, "thresholds") or {}
    for t, values in sorted(thresholds.items(), key=lambda kv: float(kv[0])):
      out.append(Row(name, values.get(field), step, threshold=float(t)))
  return out


def columns(thresholds) -> list[str]:
  return [
    Row(name, None, threshold=float(t)).column
    for name in ("majority", "kept", "treevae_majority")
    for t in thresholds
  ]
