"""Per stage-2 checkpoint: FID of the ``sample`` generations and of the ``recons``
reconstructions against the test split, overall and per drawn leaf (each leaf against the test
images the TreeVAE assigns to it). Generated images are quantised as ``round(clip(x, 0, 1) · 255)``.
"""

from __future__ import annotations

from tree_diffusion.eval import fid as fid_lib
from tree_diffusion.eval.metrics._common import Row, get, per_leaf

STAGE = "samples"
MODES = ("sample", "recons")
SETTINGS = ("fid", "num_samples", "recons_num")
_NAMES = {"sample": "fid_gen", "recons": "fid_rec"}


def compute(ctx) -> dict:
  if not ctx.settings.fid:
    return {}
  ref = ctx.reference()
  f = ctx.evaluator.features(ctx.images, f"{ctx.mode} images")
  out = {
    "fid": fid_lib.fid_from_features(f, ref),
    "fid_per_leaf": fid_lib.per_group_fid(
      f, ctx.result["leaf"], ref, ctx.test_probs.argmax(1), ctx.stage2.tree.num_leaves
    ),
  }
  ctx.evaluator.log(
    f"step {ctx.stage2.step}: FID {ctx.mode} {out['fid']:.2f} ({len(ctx.images)} images)"
  )
  return out


def rows(checkpoint: dict, step) -> list[Row]:
  out = []
  for mode, name in _NAMES.items():
    out.append(Row(name, get(checkpoint, "modes", mode, "fid"), step))
    out += per_leaf(name, get(checkpoint, "modes", mode, "fid_per_leaf"), step)
  return out


def columns(thresholds) -> list[str]:
  return list(_NAMES.values())
