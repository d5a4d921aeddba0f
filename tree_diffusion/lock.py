"""The lock one command holds on its run directory, so that a second writer refuses in one line
naming the holder: ``flock`` on a local disk, an object created only if absent on Cloud Storage
(:class:`WorkdirLock`), and its multi-process form (:func:`locked_workdir`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Callable, Iterator

import numpy as np
from absl import logging

from tree_diffusion import files
from tree_diffusion.errors import StorageError, WorkdirBusyError

LOCK_FILE = ".lock"


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _describe(holder: dict) -> str:
  return (
    f"process {holder.get('pid')} on {holder.get('host')}"
    + (f" ({holder['command']})" if holder.get("command") else "")
    + (f", since {holder['since']}" if holder.get("since") else "")
  )


# The lock on an object store: its holder rewrites the record every HEARTBEAT_S seconds; a record
# not rewritten for STALE_AFTER_S seconds (its holder was killed, or lost its network) is taken over.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class _ObjectLock:
  """The workdir lock on Cloud Storage, which has no ``flock``: ``WORKDIR/.lock`` is an object
  created only if it does not exist yet (the upload carries the precondition
  ``ifGenerationMatch=0``, so of two writers exactly one succeeds) and removed on release.

  It holds the local lock's record plus ``heartbeat`` (seconds since the epoch, rewritten by a
  background thread every ``heartbeat_s``) and a random ``token``. A record is stale, and taken
  over with a warning, when its process is gone (same host) or its heartbeat is older than
  ``stale_after_s`` (another host: the holder was killed or lost its network); the takeover
  deletes exactly the stale generation (``ifGenerationMatch``), so two processes taking over at
  once cannot both win.
  """

  def __init__(
    self,
    url: str,
    record: dict,
    busy: Callable[[dict], Exception],
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
  ):
    import fsspec  # pylint: disable=g-import-not-at-top

    if not url.startswith("gs://"):
      raise StorageError(
        f"{url}: run directories on object stores other than Cloud Storage "
        f"(gs://) are not supported; use a gs:// or a local --workdir"
      )
    self.url = url
    self.bucket, self.key = url[len("gs://") :].split("/", 1)
    self.record = {**record, "token": os.urandom(8).hex()}
    self.busy = busy
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.fs = fsspec.filesystem("gs")
    self._stop = None
    self._thread = None

  def _payload(self) -> bytes:
    return (json.dumps({**self.record, "heartbeat": time.time()}) + "\n").encode()

  def _read(self) -> tuple[dict, int | None]:
    """The holder's record and the object's generation (``({}, None)``: no lock object)."""
    try:
      self.fs.invalidate_cache(self.url)
      info = self.fs.info(self.url)
      text = self.fs.cat_file(self.url).decode(errors="replace")
    except FileNotFoundError:
      return {}, None
    try:
      record = json.loads(text)
    except ValueError:
      record = {}
    return (record if isinstance(record, dict) else {}), int(info["generation"])

  def _alive(self, holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      return _process_alive(holder["pid"])
    heartbeat = holder.get("heartbeat")
    return isinstance(heartbeat, (int, float)) and time.time() - heartbeat < self.stale_after_s

  def acquire(self):
    for _ in range(3):
      try:
        self.fs.pipe_file(self.url, self._payload(), mode="create")
      except FileExistsError:
        holder, generation = self._read()
        if generation is None:  # released meanwhile: try again
          continue
        if self._alive(holder):
          raise self.busy(holder) from None
        logging.warning(
          "taking over the lock of %s, which has not been renewed for %s (%s)",
          _describe(holder) if holder else "an unknown process",
          f"{time.time() - holder['heartbeat']:.0f} s"
          if isinstance(holder.get("heartbeat"), (int, float))
          else "an unknown time",
          self.url,
        )
        self._delete(generation)
        continue
      holder, _ = self._read()
      if holder.get("token") != self.record["token"]:  # a store without preconditions
        raise self.busy(holder)
      self._start_heartbeat()
      return
    raise self.busy(self._read()[0])

  def _delete(self, generation: int):
    """Deletes the lock object if it is still ``generation`` (else another process got there)."""
    try:
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):  # 412: replaced meanwhile; 404: gone
      pass
    self.fs.invalidate_cache(self.url)

  def _start_heartbeat(self):
    import threading  # pylint: disable=g-import-not-at-top

    self._stop = threading.Event()

    def beat():
      while not self._stop.wait(self.heartbeat_s):
        try:
          holder, _ = self._read()
          if holder.get("token") != self.record["token"]:
            logging.warning("the lock %s was taken over by %s", self.url, _describe(holder))
            return
          self.fs.pipe_file(self.url, self._payload())
        except Exception as e:  # pylint: disable=broad-except  (a network hiccup: retry later)
          logging.warning("renewing the lock %s failed (%s); retrying", self.url, e)

    self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def release(self):
    if self._stop is not None:
      self._stop.set()
      self._thread.join()
    holder, generation = self._read()
    if generation is not None and holder.get("token") == self.record["token"]:
      self._delete(generation)


class WorkdirLock:
  """An advisory lock that one training command holds on its run directory.

  ``WORKDIR/.lock`` is locked with ``flock`` (released by the kernel when the process ends, however
  it ends) and holds the holder's process id, host, command and start time, so that a second
  writer refuses in one line naming the holder. A lock file left by a process that is gone is
  taken over with a warning. The file is emptied, not removed, on release (removing it would let
  two later processes lock two different files). On Cloud Storage (a ``gs://`` workdir) the lock
  is an object created only if it does not exist, renewed by a heartbeat (:class:`_ObjectLock`).
  Used as a context manager::

      with WorkdirLock(workdir, "stage 1"):
        ...

  Raises (on entry):
    WorkdirBusyError: another live process holds the lock.
  """

  def __init__(self, workdir: str, command: str = "", enabled: bool = True):
    """``enabled=False``: a no-op (the other processes of a multi-process job, whose process 0
    holds the lock)."""
    files.check_path(workdir, "workdir")
    self.workdir = workdir
    self.path = files.join(workdir, LOCK_FILE)
    self.command = command
    self.enabled = enabled
    self._fd = None
    self._object = None

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
      f"{self.workdir} is in use by "
      f"{_describe(holder) if holder else 'another process'}: wait for it to finish, stop it, "
      f"or use another --workdir"
    )

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    if files.is_remote(self.path):
      self._object = _ObjectLock(self.path, self._record(), self._busy)
      self._object.acquire()
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
    except BlockingIOError:  # EWOULDBLOCK: another process holds it
      raise self._busy(self._read()) from None
    except OSError as e:  # no locking on this file system (e.g. ENOLCK on some NFS mounts)
      logging.warning(
        "cannot lock %s (%s): relying on the process id recorded in it", self.path, e.strerror or e
      )
      locked = False
    previous = self._read()
    if previous and previous["pid"] != os.getpid():
      if not locked and previous.get("host") == host and _process_alive(previous["pid"]):
        raise self._busy(previous)
      # With flock held, the recorded process has ended (its lock went with it), even if its
      # process id has been reused since.
      logging.warning(
        "taking over the lock of %s, which is no longer running (%s)",
        _describe(previous),
        self.path,
      )
    record = self._record()
    os.ftruncate(self._fd, 0)
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.write(self._fd, (json.dumps(record) + "\n").encode())
    os.fsync(self._fd)

  def _record(self) -> dict:
    return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": self.command,
      "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }

  def __exit__(self, *exc):
    if self._object is not None:
      self._object.release()
      self._object = None
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
      os.close(self._fd)  # closing releases the flock
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
