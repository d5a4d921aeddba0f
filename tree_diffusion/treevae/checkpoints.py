"""Stage-1 training checkpoints: ``(variables, tree, cursor)`` of a run in ``WORKDIR/checkpoints``
(the generic Orbax manager, checksums and checks are :class:`tree_diffusion.checkpoint.Checkpoints`)."""

from __future__ import annotations

import json
from typing import Any, Callable

from tree_diffusion.checkpoint import (
  STAGE1_RESUMABLE_CHANGES,
  STAGE1_SECTIONS,
  Checkpoints,
  check_compatible,
  config_sections,
)
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.export import abstract_variables
from tree_diffusion.treevae.model import TreeVAE


class Stage1Checkpoints(Checkpoints):
  """Saves and restores ``(variables, tree, cursor)`` of a stage-1 run, plus — for a checkpoint
  taken inside a phase — the phase's train state and sample indices (see ``treevae/train.py``)."""

  kind = "stage-1 checkpoint"

  def __init__(self, workdir: str, max_to_keep: int = 3):
    super().__init__(RunDir(workdir).checkpoints, max_to_keep)

  def save(
    self,
    step: int,
    variables,
    tree: Tree,
    cursor: dict,
    extra: dict | None = None,
    phase_arrays: dict | None = None,
  ):
    meta = {"tree": json.loads(tree.to_json()), "cursor": cursor, **(extra or {})}
    arrays = {"variables": variables, **(phase_arrays or {})}
    self._save(step, arrays, meta)

  def restore(
    self,
    model: TreeVAE,
    config=None,
    phase_abstract: Callable[[dict, Tree, Any], dict] | None = None,
    check_meta: Callable[[int, dict], None] | None = None,
  ):
    """``(step, variables, tree, meta, phase_arrays)`` of the newest readable checkpoint, or
    ``None``. ``config`` (if given) must match the checkpoint's (see ``STAGE1_RESUMABLE_CHANGES``);
    ``phase_abstract(meta, tree, abstract_variables)`` gives the abstract phase arrays of a
    checkpoint taken inside a phase; ``check_meta(step, meta)`` may refuse a checkpoint (raise
    ``CheckpointError``), e.g. one of another dataset."""
    current = None if config is None else config_sections(config, STAGE1_SECTIONS)

    def check(step, meta):
      if current is not None:
        check_compatible(self.kind, step, self.directory, meta, current, STAGE1_RESUMABLE_CHANGES)
      if check_meta is not None:
        check_meta(step, meta)

    def abstract(meta):
      tree = Tree.from_json(meta["tree"])
      variables = abstract_variables(model, tree)
      extra = phase_abstract(meta, tree, variables) if phase_abstract is not None else {}
      return {"variables": variables, **extra}

    out = self.restore_latest(abstract, check)
    if out is None:
      return None
    step, arrays, meta = out
    variables = arrays.pop("variables")
    return step, variables, Tree.from_json(meta["tree"]), meta, arrays
