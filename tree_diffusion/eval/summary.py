"""One table for a whole run: clustering, FID and purity of both stages, and what each step took.

Reads what the launchers already wrote into the run directory (``stage1_metrics.json``,
``diffusion/train_summary.json``, ``diffusion/samples/summary.json``, ``eval/metrics.json``);
nothing is recomputed. ``launch/summarize.py`` prints it and writes ``WORKDIR/summary.md``; the
demo ends with it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

STEPS = ("stage1", "stage2", "sampling", "evaluation")
_STEP_NAMES = {"stage1": "stage 1 (TreeVAE)", "stage2": "stage 2 (diffusion)",
               "sampling": "sampling and figures", "evaluation": "evaluation"}


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _get(d, *path):
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return None
    d = d[p]
  return d


def _num(v, digits: int) -> str:
  return "–" if v is None else f"{v:.{digits}f}"


def _duration(seconds) -> str:
  if seconds is None:
    return "–"
  s = int(round(seconds))
  return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _purity(th: dict | None) -> str:
  if not th or th.get("weighted_majority_fraction") is None:
    return "–"
  return f"{th['weighted_majority_fraction']:.3f} ({th.get('total_kept')} kept)"


def recorded_times(workdir: str) -> dict[str, float]:
  """The wall times the launchers recorded in ``workdir`` (in-process; compilation included)."""
  out = {}
  s1 = _get(_read(os.path.join(workdir, "stage1_metrics.json")), "wall_time_s")
  if s1 is not None:
    out["stage1"] = s1
  s2 = _get(_read(os.path.join(workdir, "diffusion", "train_summary.json")), "wall_time_s")
  if s2 is not None:
    out["stage2"] = s2
  modes = _get(_read(os.path.join(workdir, "diffusion", "samples", "summary.json")), "modes")
  if modes:
    out["sampling"] = sum(m.get("wall_time_s", 0.0) for m in modes.values())
  ev = _read(os.path.join(workdir, "eval", "metrics.json"))
  parts = [_get(ev, "stage1", "wall_time_s")] + [
      c.get("wall_time_s") for c in (ev.get("checkpoints") or {}).values()]
  if any(p is not None for p in parts):
    out["evaluation"] = sum(p for p in parts if p is not None)
  return out


def summary_table(workdir: str, times: Mapping[str, float] | None = None) -> str:
  """The run's Markdown summary.

  Args:
    workdir: the run directory.
    times: wall times in seconds by step (``stage1``, ``stage2``, ``sampling``, ``evaluation``),
      e.g. measured around each command; steps missing here use :func:`recorded_times`.
  """
  s1 = _read(os.path.join(workdir, "stage1_metrics.json"))
  ev = _read(os.path.join(workdir, "eval", "metrics.json"))
  cks = ev.get("checkpoints") or {}
  step = max(cks, key=int) if cks else None
  ck = cks.get(step, {}) if step is not None else {}
  t = {**recorded_times(workdir), **dict(times or {})}
  settings = ev.get("settings") or {}
  thr = "0.5"
  test, km = s1.get("test") or _get(ev, "stage1", "clustering") or {}, s1.get("kmeans_pixels") or {}
  purity_d = _get(ck, "modes", "sample_all_leaves", "purity", "thresholds", thr)
  purity_t = _get(ck, "modes", "sample_all_leaves", "purity_treevae", "thresholds", thr)
  rows = [
      ("k-means on pixels", _num(km.get("nmi"), 3), _num(km.get("leaf_purity"), 3), "–", "–", "–",
       "–"),
      (f"TreeVAE ({test.get('num_leaves', ev.get('num_leaves', '?'))} leaves)",
       _num(test.get("nmi"), 3), _num(test.get("leaf_purity"), 3),
       _num(_get(ev, "stage1", "fid", "gen"), 1), _num(_get(ev, "stage1", "fid", "rec"), 1),
       _purity(purity_t), _duration(t.get("stage1"))),
      (f"diffusion on the TreeVAE's paths{f' (step {step})' if step else ''}", "–", "–",
       _num(_get(ck, "modes", "sample", "fid"), 1), _num(_get(ck, "modes", "recons", "fid"), 1),
       _purity(purity_d), _duration(t.get("stage2"))),
  ]
  lines = [f"# Summary of `{workdir}`", "",
           "| | test NMI | leaf purity | FID (gen) | FID (rec) | purity of generations | wall time |",
           "|---|---|---|---|---|---|---|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  extra = [f"{_STEP_NAMES[k]} {_duration(t[k])}" for k in ("sampling", "evaluation") if k in t]
  total = sum(t.get(k, 0.0) for k in STEPS)
  lines += ["", "NMI and leaf purity: the test split's leaf assignments against its labels. FID: "
            f"{settings.get('num_samples', '?')} generations and "
            f"{_get(ev, 'stage1', 'fid', 'num_rec') or '?'} reconstructions against the "
            f"{_get(ev, 'stage1', 'fid', 'num_reference') or '?'} test images, the same for both "
            "rows (lower is better). Purity of generations: the weighted majority fraction of the "
            f"classifier's labels among {settings.get('purity_samples', '?')} prior samples "
            f"decoded through every leaf, kept where p(leaf) ≥ {thr}, the same samples for both "
            "rows (higher is better)."]
  if extra:
    lines += ["", "Also: " + ", ".join(extra) + f"; {_duration(total)} in all."]
  return "\n".join(lines) + "\n"
