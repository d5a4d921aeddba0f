"""The config a run was trained with: ``--config=configs/run.py:WORKDIR``.

Each training command records its full config in the run directory (stage 1:
``WORKDIR/config.json``, stage 2: ``WORKDIR/diffusion/config.json``). This file reads it back:
stage 2's if there is one (sampling needs its diffusion section), else stage 1's.
``launch/sample.py`` and ``launch/evaluate.py`` use it when ``--config`` is left out, so

    python -m launch.sample --workdir=runs/demo --config.diffusion.sampling.steps=10

samples ``runs/demo`` with its own config and 10 sampling steps. The recorded values are laid over
``configs/common.py``'s defaults, so a key added since the run was trained has its default.
"""

from configs import common
from tree_diffusion.errors import ConfigError
from tree_diffusion.runs import read_recorded_config


def _update(c, saved: dict, path: str, prefix: str = ""):
  """Sets ``c``'s keys to ``saved``'s values, in the types of ``c`` (JSON has no tuples)."""
  for k, v in saved.items():
    name = prefix + k
    if k not in c:
      raise ConfigError(
        f"{path} has the unknown config key {name!r} (written by another version "
        f"of tree_diffusion?): pass the config it was trained with as "
        f"--config=configs/NAME.py"
      )
    if isinstance(c[k], type(c)):
      if not isinstance(v, dict):
        raise ConfigError(
          f"{path}: config.{name} must be a section, got {v!r}: pass the config "
          f"it was trained with as --config=configs/NAME.py"
        )
      _update(c[k], v, path, name + ".")
      continue
    if isinstance(c[k], tuple) and isinstance(v, list):
      v = tuple(v)
    try:
      c[k] = v
    except TypeError as e:
      raise ConfigError(
        f"{path}: config.{name} = {v!r} does not fit its type ({e}): pass the "
        f"config it was trained with as --config=configs/NAME.py"
      ) from None


def get_config(arg=None):
  """The recorded config of the run directory ``arg``."""
  if not arg:
    raise ConfigError("configs/run.py needs the run directory: --config=configs/run.py:WORKDIR")
  recorded = read_recorded_config(
    arg, "pass the config the run was trained with as --config=configs/NAME.py"
  )
  if recorded is None:
    raise ConfigError(no_config_message(arg))
  path, saved = recorded
  c = common.base()
  _update(c, saved, path)
  return c


def no_config_message(workdir: str) -> str:
  """The error for a run without a recorded config (trained before runs recorded it)."""
  return (
    f"run directory {workdir} has no config.json (it was trained before runs recorded their "
    f"config): pass --config with the config it was trained with, e.g. "
    f"--config=configs/demo.py"
  )
