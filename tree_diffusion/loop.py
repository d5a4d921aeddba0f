"""What the training loops share: throughput and ETA that leave compilation out, the finiteness
check that guards every checkpoint, and checkpoint-and-stop on a signal.

Stage 1 (phases of a growing tree), stage 2 (steps of the denoiser) and the purity classifier each
keep their own loop, because what a step and a log line are differs between them; this module
holds what must behave the same in all three.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax
import jax
import numpy as np

from tree_diffusion import preemption
from tree_diffusion.errors import TrainingDivergedError


@flax.struct.dataclass
class TrainState:
  """What a training loop carries from step to step for a network with BatchNorm (stage 1 and
  the purity classifier; stage 2 has its own, with EMA weights): the step, the parameters, the
  BatchNorm statistics and the optimiser state."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class Progress:
  """Images per second over reporting windows, and the ETA of the remaining steps.

  A window runs from the previous :meth:`report` (or :meth:`start_window`) to the next one. The
  first window after the start includes compilation, so its rate is reported but not added to
  ``rates`` (the steady-state throughput the run summaries give as a median); the ETA extrapolates
  from everything since the start.

  Args:
    total: the step at which the loop ends.
    images_per_step: the global batch size.
    done: the step the loop starts (or resumes) at.
    rates: a list to append steady-state rates to (shared across stage 1's phases); default new.
  """

  def __init__(
    self, total: int, images_per_step: int, done: int = 0, rates: list[float] | None = None
  ):
    self.total, self.images_per_step = total, images_per_step
    self.rates = [] if rates is None else rates
    self._start_done = self._window_done = done
    self._t_start = self._t_window = time.perf_counter()

  def start_window(self, done: int) -> None:
    """Starts a window now (time spent since the last report is left out of its rate)."""
    self._window_done, self._t_window = done, time.perf_counter()

  def pause(self, seconds: float) -> None:
    """Leaves ``seconds`` (e.g. an evaluation) out of the current window's rate and the ETA."""
    self._t_window += seconds
    self._t_start += seconds

  def report(self, done: int) -> tuple[float, float]:
    """``(images per second in the window ending now, ETA in seconds)``; starts the next window."""
    now = time.perf_counter()
    ips = (done - self._window_done) * self.images_per_step / max(now - self._t_window, 1e-9)
    if self._window_done > self._start_done:  # not the first window: no compilation in it
      self.rates.append(ips)
    eta = (now - self._t_start) / max(done - self._start_done, 1) * (self.total - done)
    self._window_done, self._t_window = done, now
    return ips, eta

  def median_rate(self) -> float | None:
    return float(np.median(self.rates)) if self.rates else None


def check_finite(mean_loss: float, what: str, fix: str, last_good: str | None = None) -> None:
  """Raises :class:`TrainingDivergedError` (one line, naming ``what`` diverged, the last good
  checkpoint and the ``fix``) unless ``mean_loss`` is finite. Called before every save, so that a
  diverged state is never written."""
  if np.isfinite(mean_loss):
    return
  saved = (
    "" if last_good is None else f"; nothing was saved after it, the last good one is {last_good}"
  )
  raise TrainingDivergedError(f"non-finite loss in {what}{saved}. {fix}")


def checkpoint_if_due(
  stop: preemption.StopRequest,
  done: int,
  every: int,
  save: Callable[[], int],
  stopped: Callable[[int], str],
) -> None:
  """Calls ``save()`` (which checks finiteness and returns the checkpoint's number) every
  ``every`` steps (never if 0) and when ``stop`` asks for a stop; after a stop's save raises
  :class:`preemption.Preempted` with ``"stopped by SIGTERM " + stopped(checkpoint number)``."""
  stopping = stop.requested()
  if not (stopping or (every and done % every == 0)):
    return
  saved = save()
  if stopping:
    raise preemption.Preempted(f"stopped by {stop.signal_name} {stopped(saved)}")
