"""Table 1's protocol: one configuration trained several times (other seeds), each run evaluated,
every number reported as mean ± standard deviation across the runs.

:func:`aggregate` reads each run's evaluation (its ``metrics.json``) as rows
(:func:`tree_diffusion.eval.metrics.rows`): stage 1's, and those of each run's latest evaluated
stage-2 checkpoint (the final model, as in Table 1). Rows are matched across runs by their CSV
column; per-leaf rows are left out (leaves differ from run to run). The standard deviation is the
sample one (``ddof=1``); with one value it is ``None``. :func:`write` writes ``metrics.json``,
``metrics.csv`` and ``report.md`` of the aggregate, the latter next to the paper's numbers.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Sequence

import numpy as np

from tree_diffusion import files
from tree_diffusion.eval import metrics as metrics_lib
from tree_diffusion.eval import report

# Keys in which runs of one configuration may differ: seeds and where things are.
IGNORED = ("data.data_dir", "data.folder", "diffusion.treevae_export", "classifier.dir")


def is_seed(key: str) -> bool:
  return key.rsplit(".", 1)[-1] == "seed"


def latest_rows(evaluation: dict, run: str) -> list[metrics_lib.Row]:
  """A run's stage-1 rows and its latest checkpoint's, per-leaf rows left out."""
  steps = [int(s) for s in evaluation.get("checkpoints") or {}]
  last = max(steps) if steps else None
  return [
    r
    for r in metrics_lib.rows(evaluation, run)
    if r.leaf is None and (r.step is None or r.step == last)
  ]


def aggregate(evaluations: Mapping[str, dict]) -> dict:
  """``{"runs": [...], "steps": {run: latest step}, "columns": {column: {"mean", "std", "n",
  "values"}}}`` over the runs' numeric values (a run without a value for a column is left out of
  that column's ``n``)."""
  columns: dict[str, dict] = {}
  steps = {}
  for run, evaluation in evaluations.items():
    rows = latest_rows(evaluation, run)
    steps[run] = max((r.step for r in rows if r.step is not None), default=None)
    for r in rows:
      entry = columns.setdefault(r.column, {"values": {}})
      if isinstance(r.value, (int, float)) and math.isfinite(r.value):
        entry["values"][run] = float(r.value)
  for entry in columns.values():
    v = np.asarray(list(entry["values"].values()), np.float64)
    entry["n"] = int(v.size)
    entry["mean"] = float(v.mean()) if v.size else None
    entry["std"] = float(v.std(ddof=1)) if v.size > 1 else None
  return {"runs": list(evaluations), "steps": steps, "columns": columns}


def _mean_std(entry: dict | None, digits: int = 3) -> str:
  if not entry or entry.get("mean") is None:
    return "–"
  std = entry.get("std")
  return f"{entry['mean']:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def write(directory: str, result: dict, dataset: str, conditioning: str) -> None:
  """``metrics.json``, ``metrics.csv`` (a row per column: mean, std, n, then each run's value)
  and ``report.md`` of :func:`aggregate`'s ``result`` into ``directory``."""
  files.makedirs(directory)
  files.write_json(files.join(directory, "metrics.json"), result)
  runs: Sequence[str] = result["runs"]
  f = io.StringIO(newline="")
  w = csv.writer(f)
  w.writerow(["column", "mean", "std", "n", *runs])
  for column, entry in result["columns"].items():
    cells = [entry["mean"], entry["std"], entry["n"], *(entry["values"].get(r) for r in runs)]
    w.writerow([column, *("" if c is None else c for c in cells)])
  files.write_text(files.join(directory, "metrics.csv"), f.getvalue())
  cols = result["columns"]
  lines = [
    f"# {len(runs)} runs of one configuration: mean ± std",
    "",
    f"Dataset `{dataset}`; the standard deviation is the sample one (n − 1). Stage-2 numbers are "
    "each run's latest evaluated checkpoint:",
    "",
    *(f"- `{r}`: step {result['steps'].get(r)}" for r in runs),
    "",
    "| metric | mean ± std | n |",
    "|---|---|---|",
    *(f"| {c} | {_mean_std(e)} | {e['n']} |" for c, e in cols.items()),
    "",
  ]
  paper = report.paper_rows(dataset, conditioning)
  if paper:
    lines += [
      "| FID, test split | rec | gen |",
      "|---|---|---|",
      f"| these runs | {_mean_std(cols.get('fid_rec'), 1)} | {_mean_std(cols.get('fid_gen'), 1)} |",
      f"| these runs' TreeVAE | {_mean_std(cols.get('treevae_fid_rec'), 1)} | "
      f"{_mean_std(cols.get('treevae_fid_gen'), 1)} |",
      *paper,
      "",
    ]
  else:
    lines.append(f"No published numbers for `{dataset}`.")
  files.write_text(files.join(directory, "report.md"), "\n".join(lines) + "\n")
