"""Evaluation metrics, one module each, found by name as big_vision finds its evaluators.

``config.eval.metrics`` lists the metrics to compute; each name is a module of this package that
declares:

* ``STAGE``: ``"stage1"``, computed once per run on the stage-1 export and the test split, or
  ``"samples"``, computed per stage-2 checkpoint on the images its ``MODES`` generate;
* ``KEY`` (stage 1, optional): its entry in ``metrics.json``'s ``stage1`` section (default: the
  module's name);
* ``MODES`` (samples): the stage-2 modes whose images it reads;
* ``SETTINGS``: the ``config.eval`` fields it reads (its part of :class:`~tree_diffusion.eval.settings.Settings`);
* ``compute(ctx) -> dict``: its entry. A stage-1 metric's is ``stage1[KEY]``; a samples metric's
  keys are merged into ``checkpoints[step]["modes"][mode]``. An empty dict computes nothing;
* ``rows(entry, step) -> list[Row]``: its numbers read back from ``metrics.json`` (``entry`` is
  the ``stage1`` section, or one checkpoint's entry), for ``metrics.csv``, ``report.md`` and any
  aggregation;
* ``columns(thresholds) -> list[str]``: its ``metrics.csv`` columns, in order.

A new metric is one module here plus its name in ``config.eval.metrics``
(``leaf_size_entropy.py`` is the smallest example).

**The row schema.** Every number of an evaluation is a :class:`Row`: ``name``, ``value``,
``step`` (the stage-2 checkpoint; ``None`` for stage 1), ``run`` (the workdir), and, where they
apply, ``leaf`` (a leaf's index in the tree's leaf order, for per-leaf values) and ``threshold`` (the ``p(leaf)``
threshold of a purity value). A row's CSV column is its name, suffixed ``_p<threshold>`` when it
has one; per-leaf rows are in ``metrics.json`` and :func:`rows`, not in the CSV.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
from typing import Sequence

from tree_diffusion.errors import ConfigError
from tree_diffusion.eval.metrics._common import Row, SamplesContext, Stage1Context, get

__all__ = [
  "Row",
  "SamplesContext",
  "Stage1Context",
  "available",
  "columns",
  "get",
  "key",
  "load",
  "rows",
]

STAGES = ("stage1", "samples")
# The metrics of an evaluation whose config or metrics.json does not list them (a run recorded
# before config.eval.metrics existed): those computed then.
DEFAULT = ("fid", "purity", "treevae_fid", "clustering", "log_likelihood")


def available() -> tuple[str, ...]:
  """The metric modules of this package, sorted."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def load(names: Sequence[str]) -> tuple[types.ModuleType, ...]:
  """The metric modules ``names``, in that order.

  Raises:
    ConfigError: a name is not a metric module (the message lists them).
  """
  known = available()
  bad = [n for n in names if n not in known]
  if bad or len(set(names)) != len(names):
    what = f"unknown metric(s) {', '.join(bad)}" if bad else f"metrics listed twice: {names}"
    raise ConfigError(f"{what}; set --config.eval.metrics to some of {','.join(known)}")
  return tuple(importlib.import_module(f"{__name__}.{n}") for n in names)


def key(metric: types.ModuleType) -> str:
  """A stage-1 metric's entry in ``metrics.json``'s ``stage1`` section."""
  return getattr(metric, "KEY", metric.__name__.rsplit(".", 1)[-1])


def of_stage(metrics: Sequence[types.ModuleType], stage: str) -> list[types.ModuleType]:
  return [m for m in metrics if m.STAGE == stage]


def selected(evaluation: dict) -> tuple[types.ModuleType, ...]:
  """The metric modules an evaluation (a ``metrics.json`` dict) computed."""
  names = (evaluation.get("settings") or {}).get("metrics") or DEFAULT
  return load([n for n in names if n in available()])


def rows(evaluation: dict, run: str = "") -> list[Row]:
  """Every number of an evaluation (a ``metrics.json`` dict) as rows: stage 1's (``step``
  ``None``), then each checkpoint's in step order; ``num_leaves`` is a stage-1 row."""
  metrics = selected(evaluation)
  stage1 = evaluation.get("stage1") or {}
  out = [r for m in of_stage(metrics, "stage1") for r in m.rows(stage1, None)]
  if evaluation.get("num_leaves") is not None:
    out.append(Row("num_leaves", evaluation["num_leaves"]))
  checkpoints = evaluation.get("checkpoints") or {}
  for step in sorted(checkpoints, key=int):
    out += [r for m in of_stage(metrics, "samples") for r in m.rows(checkpoints[step], int(step))]
  return [dataclasses.replace(r, run=run) for r in out]


def columns(evaluation: dict, thresholds: Sequence[float]) -> list[str]:
  """``metrics.csv``'s columns: ``step``, the samples metrics', the stage-1 metrics',
  ``num_leaves``."""
  metrics = selected(evaluation)
  cols = ["step"]
  for stage in ("samples", "stage1"):
    cols += [c for m in of_stage(metrics, stage) for c in m.columns(thresholds)]
  return cols + ["num_leaves"]
