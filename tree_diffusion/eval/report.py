"""Tables from evaluation metrics: ``metrics.csv`` and ``report.md`` of ``launch/evaluate.py``, and
the one-table summary of a whole run (``launch/summarize.py``, the end of ``./demo.sh``).

Everything here reads what the launchers wrote (``stage1_metrics.json``,
``diffusion/train_summary.json``, ``diffusion/samples/summary.json``, ``eval/metrics.json``);
nothing is recomputed.
"""

from __future__ import annotations

import csv
import io
from typing import Mapping

from absl import logging

from tree_diffusion import data, files
from tree_diffusion.eval import metrics as metrics_lib
from tree_diffusion.runs import RunDir
from tree_diffusion.writer import MetricWriter, purity_tag


def read_json(path: str) -> dict:
  """The JSON object in ``path``; ``{}`` if it is missing or unreadable (with a warning)."""
  if not files.exists(path):
    return {}
  try:
    return files.read_json(path)
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s); ignoring it", path, e)
    return {}


# The paper's Table 1: test-set FID, 10k samples, mean ± std.
PAPER_TABLE1 = {
  "MNIST": {
    "TreeVAE": ((24.0, 0.9), (21.8, 0.7)),
    "TreeVAE + Diffusion": ((1.4, 0.0), (1.8, 0.1)),
    "TreeDiffusion": ((1.5, 0.0), (1.8, 0.1)),
  },
  "FashionMNIST": {
    "TreeVAE": ((40.7, 2.1), (41.9, 2.1)),
    "TreeVAE + Diffusion": ((4.8, 0.2), (4.8, 0.2)),
    "TreeDiffusion": ((5.5, 0.6), (5.4, 0.4)),
  },
  "CIFAR-10": {
    "TreeVAE": ((175.8, 1.4), (188.0, 2.0)),
    "TreeVAE + Diffusion": ((12.3, 0.1), (19.7, 0.2)),
    "TreeDiffusion": ((12.5, 0.4), (17.8, 0.4)),
  },
  "CUBICC": {
    "TreeVAE": ((232.5, 7.1), (255.3, 8.8)),
    "TreeVAE + Diffusion": ((12.7, 6.5), (96.0, 2.1)),
    "TreeDiffusion": ((13.4, 0.9), (29.0, 5.4)),
  },
  "CelebA": {
    "TreeVAE": ((75.2, 15.0), (77.9, 5.6)),
    "TreeVAE + Diffusion": ((15.4, 3.2), (30.1, 7.5)),
    "TreeDiffusion": ((14.1, 6.0), (18.4, 7.2)),
  },
}
# Which Table-1 row a stage-2 conditioning corresponds to.
_PAPER_METHOD = {"path": "TreeDiffusion", "image": "TreeVAE + Diffusion"}


_get = metrics_lib.get


def csv_rows(metrics: dict, thresholds=None) -> list[dict]:
  """One row per evaluated checkpoint, ``{column: value}`` over :func:`csv_columns`, pivoted from
  the evaluation's :func:`metrics_lib.rows` (its per-leaf rows left out; the stage-1 values
  repeated on every row). Without checkpoints, one row with ``step`` None."""
  rows = [r for r in metrics_lib.rows(metrics) if r.leaf is None]
  common = {r.column: r.value for r in rows if r.step is None}
  out = []
  for step in sorted(metrics.get("checkpoints", {}), key=int):
    values = {r.column: r.value for r in rows if r.step == int(step)}
    out.append({"step": int(step), **values, **common})
  if not out:
    out.append({"step": None, **common})
  columns = csv_columns(metrics, thresholds)
  return [{c: row.get(c) for c in columns} for row in out]


def csv_columns(metrics: dict, thresholds=None) -> list[str]:
  """``metrics.csv``'s columns; the purity columns are those of ``thresholds`` (default: the
  thresholds the evaluation reports, else 0.5 and 0.9)."""
  return metrics_lib.columns(metrics, thresholds or _thresholds(metrics))


def _thresholds(metrics: dict) -> list[float]:
  found = {
    float(t)
    for c in (metrics.get("checkpoints") or {}).values()
    for t in _get(c, "modes", "sample_all_leaves", "purity", "thresholds", default={})
  }
  return sorted(found) or [0.5, 0.9]


def write_csv(path: str, metrics: dict, thresholds=None) -> None:
  columns = csv_columns(metrics, thresholds)
  f = io.StringIO(newline="")
  w = csv.DictWriter(f, fieldnames=columns)
  w.writeheader()
  for row in csv_rows(metrics, thresholds):
    w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
  files.write_text(path, f.getvalue())


def format_value(v, digits: int = 2) -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def paper_rows(dataset: str, conditioning: str) -> list[str]:
  """Table 1's rows for ``dataset`` as Markdown (method, FID rec and gen, mean ± std), the row of
  ``conditioning`` marked; empty when the paper has no numbers for it."""
  source = data.REGISTRY.get(dataset)
  paper_name = source.paper_name if source is not None else None
  if paper_name not in PAPER_TABLE1:
    return []
  method = _PAPER_METHOD.get(conditioning)
  return [
    f"| {paper_name} {m}{' (this conditioning)' if m == method else ''} | {r} ± {rs} | {g} ± {gs} |"
    for m, ((r, rs), (g, gs)) in PAPER_TABLE1[paper_name].items()
  ]


def write_report(path: str, metrics: dict, config) -> None:
  """A short Markdown report: stage-1 metrics, one table row per checkpoint, the paper's row."""
  s = metrics.get("settings", {})
  s1 = metrics.get("stage1", {})
  cl = s1.get("clustering", {})
  ll = s1.get("log_likelihood", {})
  paper = paper_rows(config.data.name, config.diffusion.conditioning)
  lines = [
    f"# Evaluation of `{metrics.get('export', '')}`",
    "",
    f"Dataset `{config.data.name}`, {metrics.get('num_leaves')} leaves; FID against the "
    f"full test split ({_get(s1, 'fid', 'num_reference', default='–')} images) with "
    f"{s.get('num_samples')} generations and {_get(s1, 'fid', 'num_rec', default='–')} "
    f"reconstructions; classifier purity on {s.get('purity_samples')} prior samples per "
    f"leaf.",
    "",
    "## Stage 1 (TreeVAE export, test split)",
    "",
    "| NMI | accuracy | leaf purity | dendrogram purity | log-likelihood | FID (rec) | FID (gen) |",
    "|---|---|---|---|---|---|---|",
    f"| {format_value(cl.get('nmi'), 3)} | {format_value(cl.get('accuracy'), 3)} | "
    f"{format_value(cl.get('leaf_purity'), 3)} | {format_value(cl.get('dendrogram_purity'), 3)} | "
    f"{format_value(ll.get('log_likelihood'))} ± {format_value(ll.get('log_likelihood_stderr'))} "
    f"({ll.get('num_samples', '–')} samples"
    f"{', ' + format_value(ll.get('bits_per_dim'), 3) + ' bits/dim' if 'bits_per_dim' in ll else ''}) | "
    f"{format_value(_get(s1, 'fid', 'rec'))} | {format_value(_get(s1, 'fid', 'gen'))} |",
    "",
  ]
  entropy = _get(s1, "leaf_size_entropy", "normalized")
  if entropy is not None:
    lines += [f"Leaf-size entropy (1 = equal leaves): {format_value(entropy, 3)}.", ""]
  real = metrics.get("data")
  if real:
    lines += [
      f"The dataset's own FID(train, test) ({real['num_train']} vs {real['num_test']} "
      f"real images): {format_value(real['fid_train_vs_test'])}.",
      "",
    ]
  thresholds = [float(t) for t in config.classifier.thresholds]
  at = lambda name, t: metrics_lib.Row(name, None, threshold=t).column
  majority = [f"p≥{t:g} (kept)" for t in thresholds]
  treevae = [f"p≥{t:g}" for t in thresholds]
  if thresholds:  # the first column of each group says what the group is
    majority[0], treevae[0] = (
      f"majority fraction {majority[0]}",
      f"TreeVAE, same samples: {treevae[0]}",
    )
  header = ["step", "FID (rec)", "FID (gen)"] + majority + treevae
  header += ["class-mix TV, diffusion (95 %)", "TreeVAE (95 %)"]
  lines += [
    "## Stage 2 checkpoints",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
  ]
  for row in csv_rows(metrics, thresholds):
    if row["step"] is None:
      continue
    cells = [str(row["step"]), format_value(row.get("fid_rec")), format_value(row.get("fid_gen"))]
    cells += [
      f"{format_value(row.get(at('majority', t)), 3)} ({format_value(row.get(at('kept', t)))})"
      for t in thresholds
    ]
    cells += [format_value(row.get(at("treevae_majority", t)), 3) for t in thresholds]
    modes = _get(metrics, "checkpoints", str(row["step"]), "modes", "sample_all_leaves")
    cells += [_faithfulness(_get(modes, e)) for e in ("faithfulness", "faithfulness_treevae")]
    lines.append("| " + " | ".join(cells) + " |")
  clf = metrics.get("classifier")
  if clf:
    lines += ["", f"Purity classifier: test accuracy {format_value(clf.get('test_accuracy'), 4)}."]
  lines += ["", "## The paper's Table 1 (test-set FID, 10k samples, mean ± std over 10 runs)", ""]
  if not paper:
    lines.append(f"No published numbers for `{config.data.name}`.")
  else:
    lines += ["| method | FID (rec) | FID (gen) |", "|---|---|---|", *paper]
    if config.data.name == "mnist_5k":
      lines += [
        "",
        "`mnist_5k` is a 5,000-image subset (1,000 test images): FID against 1,000 "
        "images is biased upwards relative to the paper's 10,000, and the demo models "
        "are far smaller and shorter-trained than the paper's.",
      ]
  files.write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- TensorBoard


def stage1_scalars(stage1: dict) -> dict[str, float]:
  """TensorBoard scalars of the stage-1 evaluation: the TreeVAE's own FIDs, the test clustering
  metrics and the log-likelihood (those that were computed)."""
  fid, clus = stage1.get("fid") or {}, stage1.get("clustering") or {}
  out = {
    "eval/fid_gen": fid.get("gen"),
    "eval/fid_rec": fid.get("rec"),
    "eval/log_likelihood": (stage1.get("log_likelihood") or {}).get("log_likelihood"),
    **{f"eval/{k}": clus.get(k) for k in ("nmi", "accuracy", "leaf_purity", "dendrogram_purity")},
  }
  return {k: float(v) for k, v in out.items() if v is not None}


def checkpoint_scalars(checkpoint: dict, stage1: dict, thresholds=()) -> dict[str, float]:
  """TensorBoard scalars of one stage-2 checkpoint: FID(gen) and FID(rec), the weighted majority
  fraction of generations kept at each threshold, and stage 1's test NMI (those computed)."""
  modes = checkpoint.get("modes") or {}
  purity = ((modes.get("sample_all_leaves") or {}).get("purity") or {}).get("thresholds") or {}
  out = {
    "eval/fid_gen": (modes.get("sample") or {}).get("fid"),
    "eval/fid_rec": (modes.get("recons") or {}).get("fid"),
    "eval/nmi": (stage1.get("clustering") or {}).get("nmi"),
    **{
      purity_tag(t): (purity.get(str(float(t))) or {}).get("weighted_majority_fraction")
      for t in thresholds
    },
  }
  return {k: float(v) for k, v in out.items() if v is not None}


def log_scalars(logdir: str, step: int, scalars: dict[str, float]) -> None:
  """``scalars`` at ``step`` into the run's TensorBoard directory ``logdir`` (an event file of the
  evaluation's own, closed at once: what was evaluated stays logged if a later checkpoint fails)."""
  if scalars:
    writer = MetricWriter(logdir, job="eval")
    writer.write_scalars(step, scalars)
    writer.close()


# ----------------------------------------------------------------------------- run summary

STEPS = ("stage1", "stage2", "sampling", "evaluation")
_STEP_NAMES = {
  "stage1": "stage 1 (TreeVAE)",
  "stage2": "stage 2 (diffusion)",
  "sampling": "sampling and figures",
  "evaluation": "evaluation",
}


def _duration(seconds) -> str:
  if seconds is None:
    return "–"
  s = int(round(seconds))
  return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _faithfulness(f: dict | None) -> str:
  if not f or f.get("weighted_tv") is None:
    return "–"
  lo_hi = f.get("interval_95")
  interval = f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""
  return f"{f['weighted_tv']:.3f}{interval}"


def _purity(th: dict | None) -> str:
  if not th or th.get("weighted_majority_fraction") is None:
    return "–"
  return f"{th['weighted_majority_fraction']:.3f} ({th.get('total_kept')} kept)"


def recorded_times(workdir: str) -> dict[str, float]:
  """The wall times the launchers recorded in ``workdir`` (in-process; compilation included)."""
  out, run_dir = {}, RunDir(workdir)
  s1 = _get(read_json(run_dir.stage1_metrics), "wall_time_s")
  if s1 is not None:
    out["stage1"] = s1
  s2 = _get(read_json(run_dir.stage2_summary), "wall_time_s")
  if s2 is not None:
    out["stage2"] = s2
  modes = _get(read_json(run_dir.samples_summary), "modes")
  if modes:
    out["sampling"] = sum(m.get("wall_time_s", 0.0) for m in modes.values())
  ev = read_json(run_dir.eval_metrics)
  parts = [_get(ev, "stage1", "wall_time_s")] + [
    c.get("wall_time_s") for c in (ev.get("checkpoints") or {}).values()
  ]
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
  run_dir = RunDir(workdir)
  s1, ev = read_json(run_dir.stage1_metrics), read_json(run_dir.eval_metrics)
  cks = ev.get("checkpoints") or {}
  step = max(cks, key=int) if cks else None
  ck = cks.get(step, {}) if step is not None else {}
  t = {**recorded_times(workdir), **dict(times or {})}
  settings = ev.get("settings") or {}
  thr = "0.5"
  test, km = s1.get("test") or _get(ev, "stage1", "clustering") or {}, s1.get("kmeans_pixels") or {}
  cond = read_json(run_dir.stage2_summary).get("conditioning")
  purity_d = _get(ck, "modes", "sample_all_leaves", "purity", "thresholds", thr)
  purity_t = _get(ck, "modes", "sample_all_leaves", "purity_treevae", "thresholds", thr)
  faith_d = _get(ck, "modes", "sample_all_leaves", "faithfulness")
  faith_t = _get(ck, "modes", "sample_all_leaves", "faithfulness_treevae")
  rows = [
    (
      "k-means on pixels",
      format_value(km.get("nmi"), 3),
      format_value(km.get("leaf_purity"), 3),
      "–",
      "–",
      "–",
      "–",
      "–",
    ),
    (
      f"TreeVAE ({test.get('num_leaves', ev.get('num_leaves', '?'))} leaves)",
      format_value(test.get("nmi"), 3),
      format_value(test.get("leaf_purity"), 3),
      format_value(_get(ev, "stage1", "fid", "gen"), 1),
      format_value(_get(ev, "stage1", "fid", "rec"), 1),
      _purity(purity_t),
      _faithfulness(faith_t),
      _duration(t.get("stage1")),
    ),
    (
      f"diffusion{f', {cond} conditioning' if cond else ''}{f' (step {step})' if step else ''}",
      "–",
      "–",
      format_value(_get(ck, "modes", "sample", "fid"), 1),
      format_value(_get(ck, "modes", "recons", "fid"), 1),
      _purity(purity_d),
      _faithfulness(faith_d),
      _duration(t.get("stage2")),
    ),
  ]
  lines = [
    f"# Summary of `{workdir}`",
    "",
    "| | test NMI | leaf purity | FID (gen) | FID (rec) | purity of generations | "
    "class-mix TV (95 % interval) | wall time |",
    "|---|---|---|---|---|---|---|---|",
  ]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  extra = [f"{_STEP_NAMES[k]} {_duration(t[k])}" for k in ("sampling", "evaluation") if k in t]
  total = sum(t.get(k, 0.0) for k in STEPS)
  lines += [
    "",
    "NMI and leaf purity: the test split's leaf assignments against its labels. FID: "
    f"{settings.get('num_samples', '?')} generations and "
    f"{_get(ev, 'stage1', 'fid', 'num_rec') or '?'} reconstructions against the "
    f"{_get(ev, 'stage1', 'fid', 'num_reference') or '?'} test images, the same for both "
    "rows (lower is better). Purity of generations: the weighted majority fraction of the "
    f"classifier's labels among {settings.get('purity_samples', '?')} prior samples "
    f"decoded through every leaf, kept where p(leaf) ≥ {thr}, the same samples for both "
    "rows (higher is better). Class-mix TV: the total-variation distance between the "
    "classifier's class histogram of each leaf's generations (each draw weighted by its "
    "probability of reaching the leaf) and the labels of the leaf's test images, averaged "
    "over leaves weighted by their test images (lower is more faithful).",
  ]
  if extra:
    lines += ["", "Also: " + ", ".join(extra) + f"; {_duration(total)} in all."]
  return "\n".join(lines) + "\n"
