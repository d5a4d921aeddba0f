"""Stage-2 training checkpoints in ``WORKDIR/diffusion/checkpoints``: the train state (params, EMA,
optimiser, step) and JSON meta (which export it was trained on, epoch, config). The generic Orbax
manager, checksums and checks are :class:`tree_diffusion.checkpoint.Checkpoints`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import orbax.checkpoint as ocp
from etils import epath

from tree_diffusion import files
from tree_diffusion.checkpoint import (
  STAGE2_RESUMABLE_CHANGES,
  STAGE2_SECTIONS,
  CheckpointError,
  Checkpoints,
  abstract_like,
  check_compatible,
  config_sections,
  short_error,
)


class Stage2Checkpoints(Checkpoints):
  """Orbax checkpoints of stage 2 in ``directory``: the train state (params, EMA, optimiser, step)
  and JSON meta (which export it was trained on, epoch, config)."""

  kind = "stage-2 checkpoint"

  def save(self, step: int, state, meta: dict):
    self._save(step, state, meta)

  @staticmethod
  def steps_in(directory: str) -> list[int]:
    """The committed checkpoint steps in ``directory`` (``[]`` if it does not exist); read-only."""
    if not epath.Path(directory).is_dir():
      return []
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(files.as_path(directory)))

  def _check_step(self, step: int):
    if step not in self.manager.all_steps():
      raise CheckpointError(
        f"no stage-2 checkpoint {step} in {self.directory}; have {sorted(self.manager.all_steps())}"
      )

  def read_meta(self, step: int | None = None) -> dict | None:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    return self._read_meta(step)

  def restore(self, abstract_state, step: int | None = None):
    """``(step, state, meta)`` of ``step`` (default latest) restored into ``abstract_state``'s
    structure, or ``None`` when there is no checkpoint (no fall-back: evaluation of one step)."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    out = self._read(step, lambda meta: abstract_like(abstract_state), lambda s, m: None)
    if isinstance(out, Exception):
      raise CheckpointError(
        f"stage-2 checkpoint {step} in {self.directory} cannot be read ({short_error(out)})"
      )
    return (step,) + out

  def restore_for_training(
    self, abstract_state: Callable[[], Any], config, check_meta: Callable[[int, dict], None]
  ):
    """``(step, state, meta)`` of the newest readable checkpoint (falling back past unreadable
    ones), refused if its config or version differs; ``None`` when there is none.
    ``abstract_state()`` gives the restore target (only called when there is a checkpoint)."""
    current = config_sections(config, STAGE2_SECTIONS)

    def check(step, meta):
      check_meta(step, meta)
      check_compatible(
        self.kind,
        step,
        self.directory,
        meta,
        current,
        STAGE2_RESUMABLE_CHANGES,
        afresh=lambda keys: _stage2_afresh(keys, meta.get("export")),
      )

    return self.restore_latest(lambda meta: abstract_like(abstract_state()), check)


def _stage2_afresh(keys: Iterable[str], export: str | None) -> str:
  """How to start stage 2 afresh when the dotted config ``keys`` differ from a run's: a new
  --workdir, on the run's stage-1 ``export`` when they are all stage-2 settings (stage 1 is then
  not trained again)."""
  if export and all(k.startswith("diffusion.") for k in keys):
    return (
      f"start afresh with a new --workdir on this run's stage-1 export: pass "
      f"--config.diffusion.treevae_export={export}"
    )
  return "start afresh with a new --workdir"
