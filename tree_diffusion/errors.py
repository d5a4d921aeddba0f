"""Errors that launchers report as one line (a user can fix them without reading a traceback)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the setting and a valid choice."""


class TrainingDivergedError(FloatingPointError):
  """A non-finite loss; the message names the step, the loss terms and the last good checkpoint."""


class WorkdirBusyError(RuntimeError):
  """Another running command holds the run directory; the message names it (process, host)."""


class StorageError(OSError):
  """A ``gs://`` location that cannot be used (no such bucket, no credentials, unreachable); the
  message names the bucket and how to provide credentials."""
