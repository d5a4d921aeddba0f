"""A run directory as stage 2 and its readers see it: where the stage-1 export and stage 2's
files are, and loading the export after checking it against the config.
"""

from __future__ import annotations

import os

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion.errors import ConfigError


def export_path(config, workdir: str) -> str:
  """The stage-1 export stage 2 conditions on: ``diffusion.treevae_export`` or ``WORKDIR/export``."""
  return config.diffusion.treevae_export or os.path.join(workdir, "export")


def check_export(config, path: str, meta: dict):
  """Checks a stage-1 export's meta against this config before anything is loaded.

  Raises:
    ConfigError: the export was trained on images of another shape or on another dataset (its
      config; the data itself is compared by :func:`check_export_data`).
  """
  m = meta["model"]
  got = (m["image_size"], m["image_size"], m["channels"])
  want = (config.data.image_size, config.data.image_size, config.data.channels)
  if got != want:
    raise ConfigError(
        f"the stage-1 export {path} was trained on {'x'.join(map(str, got))} images but "
        f"config.data ({config.data.name}) has {'x'.join(map(str, want))}: point "
        f"--config.diffusion.treevae_export at an export of this dataset (or use its config)")
  saved = (meta.get("config") or {}).get("data")
  if saved is not None:
    current = ckpt_lib.config_sections(config, ("data",))["data"]
    diffs = ckpt_lib.config_differences({"data": saved}, {"data": current}, ("data.data_dir",))
    if diffs:
      raise ConfigError(
          f"the stage-1 export {path} was trained on other data ({'; '.join(diffs)}): "
          f"use the config of that stage-1 run, or point --config.diffusion.treevae_export at an "
          f"export of this data")


def check_export_data(path: str, meta: dict, identity: dict):
  """Refuses data that changed since the export was trained (images added, removed or edited).

  Raises:
    ConfigError: the export records another dataset identity; the message says what changed.
  """
  saved = (meta.get("data") or {}).get("identity")
  change = None if saved is None else data_lib.identity_change(saved, identity)
  if change:
    raise ConfigError(
        f"the dataset changed since the stage-1 export {path} was trained ({change}): put the "
        f"images back as they were, or train stage 1 again on them in a new --workdir")


def load_stage1(config, workdir: str):
  """Loads and checks the stage-1 export for this config.

  Returns:
    ``(model, variables, tree, path, fingerprint, meta)``.

  Raises:
    CheckpointError: missing export, a training workdir instead of its export.
    ConfigError: the export's images or dataset differ from this config's.
  """
  path = ckpt_lib.resolve_export(export_path(config, workdir))
  meta = ckpt_lib.read_export_meta(path)
  check_export(config, path, meta)
  model, variables, tree = ckpt_lib.load_treevae(path)
  return model, variables, tree, path, ckpt_lib.export_fingerprint(path), meta


def stage2_dir(workdir: str) -> str:
  return os.path.join(workdir, "diffusion")
