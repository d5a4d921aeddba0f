"""Run directories and small helpers shared by the training loops of both stages: the layout of
a ``--workdir`` (:class:`RunDir`), ETA text, the workdir check and the lock a training command
holds on its workdir."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any, Callable, Iterator

import numpy as np

from absl import logging

from tree_diffusion.errors import WorkdirBusyError


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The layout of a run directory (``--workdir``): every path a command reads or writes there.

  ::

    checkpoints/  export/  tensorboard/  stage1_metrics.json  tree.png     stage 1
    diffusion/    checkpoints/  tensorboard/  train_summary.json  tree.png  stage 2
                  samples/<mode>/  samples/summary.json                    launch/sample.py
    classifier/                          the purity classifier (unless classifier.dir is set)
    eval/         metrics.json  metrics.csv  report.md  cache/  step_<N>/  launch/evaluate.py
    summary.md                                                              launch/summarize.py

  Paths are joined as strings, so a ``gs://`` root works as well as a local one.
  """
  root: str

  def _join(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  # Stage 1.
  @property
  def checkpoints(self) -> str:
    return self._join("checkpoints")

  @property
  def export(self) -> str:
    return self._join("export")

  @property
  def tensorboard(self) -> str:
    return self._join("tensorboard")

  @property
  def stage1_metrics(self) -> str:
    return self._join("stage1_metrics.json")

  @property
  def tree_figure(self) -> str:
    return self._join("tree.png")

  # Stage 2.
  @property
  def stage2(self) -> str:
    return self._join("diffusion")

  @property
  def stage2_checkpoints(self) -> str:
    return self._join("diffusion", "checkpoints")

  @property
  def stage2_tensorboard(self) -> str:
    return self._join("diffusion", "tensorboard")

  @property
  def stage2_summary(self) -> str:
    return self._join("diffusion", "train_summary.json")

  @property
  def stage2_tree_figure(self) -> str:
    return self._join("diffusion", "tree.png")

  def samples(self, mode: str | None = None) -> str:
    """``diffusion/samples``, or the folder of one sampling mode in it."""
    return self._join("diffusion", "samples", *([mode] if mode else []))

  @property
  def samples_summary(self) -> str:
    return self._join("diffusion", "samples", "summary.json")

  # Evaluation.
  @property
  def classifier(self) -> str:
    return self._join("classifier")

  @property
  def eval(self) -> str:
    return self._join("eval")

  @property
  def eval_metrics(self) -> str:
    return self._join("eval", "metrics.json")

  @property
  def eval_csv(self) -> str:
    return self._join("eval", "metrics.csv")

  @property
  def eval_report(self) -> str:
    return self._join("eval", "report.md")

  @property
  def eval_cache(self) -> str:
    return self._join("eval", "cache")

  def eval_step(self, step: int) -> str:
    return self._join("eval", f"step_{step}")

  @property
  def summary(self) -> str:
    return self._join("summary.md")


def format_eta(seconds: float) -> str:
  """``H:MM:SS``."""
  seconds = max(0, int(seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _unwritable(directory: str) -> str | None:
  """Why a file cannot be written in ``directory`` (a probe file written and removed), or None."""
  if not os.path.isdir(directory):
    return f"{directory} is not a directory"
  probe = os.path.join(directory, f".write_test{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    return f"{directory}: {e.strerror}"
  return None


def check_workdir(workdir: str):
  """Creates ``workdir`` and checks that it is writable (a one-line error names the fix)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    why = e.strerror
  else:
    why = _unwritable(workdir)
  if why is not None:
    raise PermissionError(f"workdir {workdir} is not writable ({why}); "
                          f"pass a --workdir you can write to")


def check_writable(path: str, fix: str):
  """Checks, before any work, that the output directory ``path`` (made later by the work) can be
  written. Nothing is created: the probe goes into ``path`` or else its deepest existing
  ancestor, which must be a directory.

  Raises:
    PermissionError: ``path`` cannot be made or written (names the directory and ``fix``).
  """
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  why = _unwritable(existing)
  if why is not None:
    raise PermissionError(f"output directory {path} is not writable ({why}); {fix}")


LOCK_FILE = ".lock"


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by another user
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"process {holder.get('pid')} on {holder.get('host')}"
          + (f" ({holder['command']})" if holder.get("command") else "")
          + (f", since {holder['since']}" if holder.get("since") else ""))


class WorkdirLock:
  """An advisory lock that one training command holds on its run directory.

  ``WORKDIR/.lock`` is locked with ``flock`` (released by the kernel when the process ends, however
  it ends) and holds the holder's process id, host, command and start time, so that a second
  writer refuses in one line naming the holder. A lock file left by a process that is gone is
  taken over with a warning. The file is emptied, not removed, on release (removing it would let
  two later processes lock two different files). Used as a context manager::

      with WorkdirLock(workdir, "stage 1"):
        ...

  Raises (on entry):
    WorkdirBusyError: another live process holds the lock.
  """

  def __init__(self, workdir: str, command: str = "", enabled: bool = True):
    """``enabled=False``: a no-op (the other processes of a multi-process job, whose process 0
    holds the lock)."""
    self.path = os.path.join(workdir, LOCK_FILE)
    self.command = command
    self.enabled = enabled
    self._fd = None

  def _read(self) -> dict:
    """The holder's record, or ``{}`` if there is none or it is not one of ours."""
    try:
      os.lseek(self._fd, 0, os.SEEK_SET)
      text = os.read(self._fd, 65536).decode(errors="replace").strip()
      record = json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
      return {}
    return record

  def _busy(self, holder: dict) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"{os.path.dirname(self.path)} is in use by "
        f"{_describe(holder) if holder else 'another process'}: wait for it to finish, stop it, "
        f"or use another --workdir")

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      self._acquire()
    except BaseException:
      os.close(self._fd)
      self._fd = None
      raise
    return self

  def _acquire(self):
    host = socket.gethostname()
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:     # EWOULDBLOCK: another process holds it
      raise self._busy(self._read()) from None
    except OSError as e:        # no locking on this file system (e.g. ENOLCK on some NFS mounts)
      logging.warning("cannot lock %s (%s): relying on the process id recorded in it", self.path,
                      e.strerror or e)
      locked = False
    previous = self._read()
    if previous and previous["pid"] != os.getpid():
      if not locked and previous.get("host") == host and _process_alive(previous["pid"]):
        raise self._busy(previous)
      # With flock held, the recorded process has ended (its lock went with it), even if its
      # process id has been reused since.
      logging.warning("taking over the lock of %s, which is no longer running (%s)",
                      _describe(previous), self.path)
    record = {"pid": os.getpid(), "host": host, "command": self.command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(self._fd, 0)
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.write(self._fd, (json.dumps(record) + "\n").encode())
    os.fsync(self._fd)

  def __exit__(self, *exc):
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
      os.close(self._fd)    # closing releases the flock
      self._fd = None
    return False


@contextlib.contextmanager
def locked_workdir(workdir: str, command: str) -> Iterator[None]:
  """:class:`WorkdirLock` for a job of one or several processes: process 0 takes the lock and
  every process learns whether it got it, so that all of them refuse together (no process is left
  waiting at a barrier for one that exited)."""
  import jax  # pylint: disable=g-import-not-at-top
  lock = WorkdirLock(workdir, command, enabled=jax.process_index() == 0)
  busy = None
  try:
    lock.__enter__()
  except WorkdirBusyError as e:
    busy = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(busy is not None)))
    if refused and busy is None:
      busy = WorkdirBusyError(f"{workdir} is in use by another process (see process 0's error)")
  if busy is not None:
    raise busy
  try:
    yield
  finally:
    lock.__exit__(None, None, None)


def write_json(path: str, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (a temporary file renamed into place), so a
  crash or a full disk leaves the previous file or the new one, never a truncated one."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, default=default)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
