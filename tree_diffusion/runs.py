"""Small helpers shared by the training loops of both stages."""

from __future__ import annotations

import os


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
