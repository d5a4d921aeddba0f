"""Errors that launchers report as one line (a user can fix them without reading a traceback)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the setting and a valid choice."""
