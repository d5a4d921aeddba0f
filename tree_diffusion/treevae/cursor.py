"""Where a stage-1 run is in its schedule: the state of the grow → prune → fine-tune machine.

::

    initial ─▶ grow ─▶ small_tree ─▶ grow ─▶ … ─▶ prune ─▶ finetune ─▶ done
                 │  ▲
                 ▼  │
             intermediate        (every third growth iteration, if configured)

``initial`` trains the starting tree (and goes straight to ``prune`` when growing is off);
``grow`` picks a leaf to split (or ends growing); ``small_tree`` trains the two new children on the
rows routed to that leaf; ``intermediate`` trains the whole tree between growth iterations;
``prune`` removes leaves with too few samples; ``finetune`` trains the final tree. Each pass of
the loop in ``train.py`` runs one phase and saves a checkpoint with the cursor, so a run resumes
at the phase where it stopped; a checkpoint taken inside a training phase also records that
phase's step (:attr:`Cursor.in_phase_step`), and the pass then resumes instead of restarting.
Transitions are pure: :meth:`Cursor.to` returns a new cursor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PHASES = ("initial", "grow", "intermediate", "small_tree", "prune", "finetune", "done")


@dataclasses.dataclass(frozen=True)
class Split:
  """The leaf being grown in a ``small_tree`` phase."""

  leaf: int  # node id of the leaf that got two children
  n_effective: int  # effective leaves of the tree before the split
  num_indices: int  # training rows routed to the leaf (the small tree trains on them)


@dataclasses.dataclass(frozen=True)
class Cursor:
  """The schedule's position, saved as JSON with every stage-1 checkpoint."""

  phase: str = "initial"
  iteration: int = 0  # growth iterations done
  not_expandable: tuple[int, ...] = ()  # leaves the growing rule will not split again
  phase_id: int = 0  # passes started (fold into the phases' keys)
  intermediate_done: bool = False  # this iteration's intermediate training has run
  split: Split | None = None  # set in ``small_tree``
  in_phase_step: int | None = None  # a checkpoint inside a training phase: its step

  def __post_init__(self):
    if self.phase not in PHASES:
      raise ValueError(f"unknown stage-1 phase {self.phase!r}; phases are {PHASES}")

  def to(self, phase: str, **changes: Any) -> Cursor:
    """This cursor in ``phase``, with ``changes`` to the other fields."""
    return dataclasses.replace(self, phase=phase, **changes)

  def to_json(self) -> dict:
    """The checkpoint's ``cursor`` entry (``split`` and ``in_phase`` only when set)."""
    out = {
      "phase": self.phase,
      "iteration": self.iteration,
      "not_expandable": list(self.not_expandable),
      "phase_id": self.phase_id,
      "intermediate_done": self.intermediate_done,
    }
    if self.split is not None:
      out["split"] = dataclasses.asdict(self.split)
    if self.in_phase_step is not None:
      out["in_phase"] = {"step": self.in_phase_step}
    return out

  @classmethod
  def from_json(cls, d: dict) -> Cursor:
    """Reads :meth:`to_json`'s output (``intermediate_done``, ``split`` and ``in_phase`` may be
    absent, as in checkpoints written before they existed)."""
    split, in_phase = d.get("split"), d.get("in_phase")
    return cls(
      phase=d["phase"],
      iteration=int(d["iteration"]),
      not_expandable=tuple(int(n) for n in d["not_expandable"]),
      phase_id=int(d["phase_id"]),
      intermediate_done=bool(d.get("intermediate_done")),
      split=None if split is None else Split(**{k: int(v) for k, v in split.items()}),
      in_phase_step=None if not in_phase else int(in_phase["step"]),
    )
