"""Errors that launchers report as one line (a user can fix them without reading a traceback),
and :func:`disk_full`, the one place that tells a full disk from other failures."""

import errno
import re


class ConfigError(ValueError):
  """A config value that cannot work; the message names the setting and a valid choice."""


class TrainingDivergedError(FloatingPointError):
  """A non-finite loss; the message names the step, the loss terms and the last good checkpoint."""


class WorkdirBusyError(RuntimeError):
  """Another running command holds the run directory; the message names it (process, host)."""


class StorageError(OSError):
  """A ``gs://`` location that cannot be used (no such bucket, no credentials, unreachable); the
  message names the bucket and how to provide credentials."""


class DiskFullError(OSError):
  """A write that found the disk full (or the disk quota used up); the message names what was not
  written, what was kept and where to free space. ``errno`` is ``ENOSPC`` or ``EDQUOT``."""

  def __str__(self):
    return self.strerror or super().__str__()


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# TensorStore (Orbax's array writer) reports a full disk as a ValueError whose text holds its
# status code and the OS error, e.g. ``RESOURCE_EXHAUSTED: Error writing local file "…": … No
# space left on device [os_error_code='28']``.
_FULL_DISK_TEXT = re.compile(
  r"os_error_code='?(?:%d|%d)\b|No space left on device|Disk quota exceeded" % FULL_DISK_ERRNOS
)


def disk_full(e: BaseException | None) -> BaseException | None:
  """The exception that says the disk is full (or the disk quota is used up) among ``e``, its
  causes and contexts (recursively) and the members of exception groups: a
  :class:`DiskFullError`, an ``OSError`` with errno ``ENOSPC`` or ``EDQUOT``, or an error whose
  text holds ``RESOURCE_EXHAUSTED`` and ``No space left on device`` / ``Disk quota exceeded`` /
  ``os_error_code='28'`` (TensorStore's); ``None`` when there is none."""
  todo, seen = [e], set()
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, DiskFullError) or (isinstance(x, OSError) and x.errno in FULL_DISK_ERRNOS):
      return x
    text = str(x)
    if "RESOURCE_EXHAUSTED" in text and _FULL_DISK_TEXT.search(text):
      return x
    todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
  return None
