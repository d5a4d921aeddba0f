"""Graceful stops: SIGTERM (what Cloud TPU and spot VMs send before evicting a job) or Ctrl-C.

A :class:`StopRequest` is handed to the training loops, which ask :meth:`StopRequest.requested`
after every step: when it says yes they write a checkpoint of that exact step, wait for Orbax to
commit it and raise :class:`Preempted`; the launcher then exits 0 with the command to resume. A
second signal before that exits at once (code 128 + signal): the checkpoint being written is then
a temporary directory that the next run ignores and removes.

On several processes every process must stop at the same step. There, the signal handling is
JAX's own preemption service (``jax.distributed.initialize`` starts it; it watches SIGTERM and
agrees on the step with the other processes): :meth:`requested` asks
``multihost_utils.reached_preemption_sync_point`` and no Python handler is installed.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging


class Preempted(Exception):
  """Training stopped on request after saving a checkpoint; ``message`` says how to resume."""


class StopRequest:
  """Remembers a stop signal; a context manager that installs (and restores) the handlers.

  with preemption.StopRequest() as stop:
    train.train_and_export(config, workdir, stop=stop)
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._received: int | None = None
    self._previous = {}
    self._calls = 0  # the step id of the multi-process sync point (same on every process)

  @property
  def signal_name(self) -> str | None:
    return None if self._received is None else signal.Signals(self._received).name

  def _handle(self, signum, frame):
    del frame
    if self._received is not None:  # the second signal: no more waiting
      logging.warning(
        "second %s: exiting now; the checkpoint being written (if any) is discarded on restart",
        signal.Signals(signum).name,
      )
      logging.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self._received = signum
    logging.warning(
      "%s received: finishing the current step, then saving a checkpoint and "
      "exiting (send it again to exit at once)",
      signal.Signals(signum).name,
    )

  def __enter__(self) -> "StopRequest":
    # Python handlers only in the main thread of a single-process job (see the module docstring).
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    return False

  def request(self, signum: int = signal.SIGTERM):
    """Asks for a stop as a signal would (for library users without signals)."""
    self._received = signum

  def requested(self) -> bool:
    """Whether the loop should checkpoint and stop now. Call it at the same points on every
    process (after each step, at phase ends): on several processes it is a collective decision."""
    self._calls += 1
    if self._received is not None:
      return True
    if jax.process_count() > 1 and self._signals:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      try:
        reached = multihost_utils.reached_preemption_sync_point(self._calls)
      except RuntimeError:  # started with jax_enable_preemption_service=False: no notices
        reached = False
      if reached:
        self._received = signal.SIGTERM
        return True
    return False


def never() -> StopRequest:
  """A request that is never set (library calls without a launcher)."""
  return StopRequest(signals=())
