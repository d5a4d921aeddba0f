"""Small helpers shared by the training loops of both stages: ETA text, the workdir check and
the lock a training command holds on its workdir."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from absl import logging

from tree_diffusion.errors import WorkdirBusyError


def format_eta(seconds: float) -> str:
  """``H:MM:SS``."""
  seconds = max(0, int(seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_workdir(workdir: str):
  """Creates ``workdir`` and checks that it is writable (a one-line error names the fix)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir} is not writable ({e.strerror}); "
                          f"pass a --workdir you can write to") from None


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
    try:
      os.lseek(self._fd, 0, os.SEEK_SET)
      text = os.read(self._fd, 65536).decode(errors="replace").strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self._read()
      os.close(self._fd)
      self._fd = None
      raise WorkdirBusyError(
          f"{os.path.dirname(self.path)} is in use by "
          f"{_describe(holder) if holder else 'another process'}: wait for it to finish, stop "
          f"it, or use another --workdir") from None
    previous, host = self._read(), socket.gethostname()
    if previous.get("pid") not in (None, os.getpid()):
      if previous.get("host") == host and _process_alive(int(previous["pid"])):
        # The file system ignored flock (some network mounts); trust the recorded live process.
        os.close(self._fd)
        self._fd = None
        raise WorkdirBusyError(
            f"{os.path.dirname(self.path)} is in use by {_describe(previous)}: wait for it to "
            f"finish, stop it, or use another --workdir")
      logging.warning("taking over the lock of %s, which is no longer running (%s)",
                      _describe(previous), self.path)
    record = {"pid": os.getpid(), "host": host, "command": self.command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(self._fd, 0)
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.write(self._fd, (json.dumps(record) + "\n").encode())
    os.fsync(self._fd)
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)    # closing releases the flock
      self._fd = None
    return False
