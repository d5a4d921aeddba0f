"""The stage-1 export, the hand-off to stage 2.

``WORKDIR/export/`` holds ``variables/`` (an Orbax ``StandardCheckpointer`` directory) and
``meta.json`` (model hyper-parameters, tree, data shape, normalisation and identity, config,
metrics, library version, and the :func:`fingerprint` stage 2 records: a hash of only what stage 2
uses). It is written next to the old one and swapped in when complete, so a run killed at any
point leaves a complete export. :func:`load_treevae` is all stage 2 needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tree_diffusion import __version__, errors, files
from tree_diffusion.checkpoint import (
  REWRITE_EXPORT,
  CheckpointError,
  checksum,
  json_default,
  orbax_failure_held,
  restore_sharding,
  short_error,
  sync_processes,
)
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE, check_variables

EXPORT_FORMAT = "tree_diffusion.treevae.export/1"


def abstract_variables(model: TreeVAE, tree: Tree):
  """Restore target: the structure, shapes and dtypes of the variables of ``tree``."""
  return jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=restore_sharding()),
    model.init(jax.random.key(0), tree),
  )


def fingerprint(model: TreeVAE, variables, tree: Tree, data_identity: dict | None) -> str:
  """Identity of a stage-1 model as stage 2 sees it: a hash of the variables (their CRC32), the
  tree, the model hyper-parameters and the dataset's identity; nothing else (no wall times, no
  metrics), so that writing the same model again gives the same fingerprint."""
  key = json.dumps(
    {
      "checksum": checksum(variables),
      "tree": json.loads(tree.to_json()),
      "model": model.to_dict(),
      "data": data_identity,
    },
    sort_keys=True,
    default=json_default,
  )
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def export_treevae(
  export_dir: str,
  model: TreeVAE,
  variables,
  tree: Tree,
  meta: dict[str, Any],
  data_identity: dict | None = None,
) -> str:
  """Writes the final stage-1 model: ``variables/`` and ``meta.json``; returns its fingerprint.

  The export is written next to ``export_dir`` (``<export_dir>.tmp-<pid>``) and swapped in only
  when complete: the old export is renamed to ``<export_dir>.old-<pid>``, the new one renamed into
  place, then the old one deleted. A run killed at any point leaves a complete export under
  ``export_dir`` or ``<export_dir>.old-…`` (which :func:`resolve_export` names).
  """
  check_variables(tree, variables)
  path = files.as_path(export_dir)
  tag = f"{os.getpid()}" if jax.process_count() == 1 else "multihost"
  tmp, old = files.as_path(f"{path}.tmp-{tag}"), files.as_path(f"{path}.old-{tag}")
  writer = jax.process_index() == 0  # on several processes, the variables are saved together
  print_ = fingerprint(model, variables, tree, data_identity)
  try:
    if writer:
      for stale in path.parent.glob(f"{path.name}.tmp-*"):  # a previous run killed while writing
        stale.rmtree()
      tmp.mkdir(parents=True)
    sync_processes("export_dir_ready")
    with orbax_failure_held(), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "variables", variables)
    if writer:
      full_meta = {
        "format": EXPORT_FORMAT,
        "version": __version__,
        "fingerprint": print_,
        "model": model.to_dict(),
        "tree": json.loads(tree.to_json()),
        **meta,
      }
      if data_identity is not None:
        full_meta["data"] = {**full_meta.get("data", {}), "identity": data_identity}
      (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=json_default))
  except Exception as e:  # pylint: disable=broad-except  (Orbax wraps the OSError)
    if errors.disk_full(e) is None:
      raise
    if writer:
      try:
        tmp.rmtree()  # what was written of it: freed at once
      except Exception:  # pylint: disable=broad-except
        pass
    kept = "the previous export there is kept" if path.exists() else "there was none before"
    raise CheckpointError(
      f"the stage-1 export was not written to {path}: the disk is full ({kept}); free space on "
      f"the disk that holds {path.parent} and {REWRITE_EXPORT}"
    ) from e
  if writer:
    if path.exists():
      if old.exists():  # left by an earlier run killed after its swap (same pid or multihost)
        old.rmtree()
      path.rename(old)
    tmp.rename(path)
    for previous in path.parent.glob(f"{path.name}.old-*"):  # this one, and any left earlier
      previous.rmtree()
  sync_processes("export_written")
  return print_


def export_matches(
  export_dir: str, model: TreeVAE, variables, tree: Tree, data_identity: dict | None
) -> bool:
  """Whether ``export_dir`` holds a complete, readable export of exactly this model.

  An export written before fingerprints were recorded matches when its model, tree and variables
  are these (so upgrading does not orphan the stage-2 runs that recorded its older fingerprint).
  """
  try:
    meta = read_export_meta(export_dir)
    got_model, got_variables, got_tree = load_treevae(export_dir)
  except Exception:  # pylint: disable=broad-except  (missing, garbled or half-written)
    return False
  if "fingerprint" in meta:
    return meta["fingerprint"] == fingerprint(model, variables, tree, data_identity)
  return got_model == model and got_tree == tree and checksum(got_variables) == checksum(variables)


def _export_hint(path: str) -> str:
  """Where the export of a run directory or of a run's ``diffusion/`` directory is, when it
  exists (the text added to "not a stage-1 export")."""
  run_dir = RunDir(path)
  if files.exists(run_dir.export):
    return f" (this looks like a training workdir: pass {run_dir.export})"
  parent = str(files.as_path(path).parent)
  if files.as_path(path).name == "diffusion" and files.exists(RunDir(parent).stage2_config):
    try:
      export = (
        json.loads(files.read_text(RunDir(parent).stage2_config))["diffusion"]["treevae_export"]
        or RunDir(parent).export
      )
    except (ValueError, KeyError, TypeError):
      export = RunDir(parent).export
    if files.exists(export):
      return f" (this is a run's stage-2 directory; the stage-1 export it used is {export})"
    return " (this is a run's stage-2 directory, not a stage-1 export)"
  if files.exists(run_dir.checkpoints):
    return (
      " (this looks like a training workdir whose stage 1 has not finished: it has "
      "checkpoints but no export yet)"
    )
  return ""


def read_export_meta(path: str) -> dict:
  p = epath.Path(path)
  meta_file = p / "meta.json"
  if not meta_file.exists():
    raise CheckpointError(f"{p} is not a stage-1 export: no meta.json{_export_hint(str(p))}")
  try:
    meta = json.loads(meta_file.read_text())
    if not isinstance(meta, dict):
      raise ValueError(f"a JSON {type(meta).__name__}, not an object")
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{meta_file} is garbled ({short_error(e)}); {REWRITE_EXPORT}") from None
  if meta.get("format") != EXPORT_FORMAT:
    raise CheckpointError(
      f"{meta_file} has format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}"
    )
  return meta


def load_treevae(path: str):
  """Loads a stage-1 export.

  Returns:
    ``(model, variables, tree)``: the :class:`TreeVAE` hyper-parameters, its variables
    (``{"params", "batch_stats"}``) and the learned :class:`Tree`.
  """
  meta = read_export_meta(path)
  try:
    model = TreeVAE(**meta["model"])
    tree = Tree.from_json(meta["tree"])
    abstract = abstract_variables(model, tree)
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(files.as_path(path) / "variables", abstract)
    check_variables(tree, variables)
  except Exception as e:  # pylint: disable=broad-except  (truncated, garbled or missing files)
    raise CheckpointError(
      f"the stage-1 export {path} cannot be read ({short_error(e)}); {REWRITE_EXPORT}"
    ) from None
  if (
    "fingerprint" in meta
    and fingerprint(model, variables, tree, meta.get("data", {}).get("identity"))
    != meta["fingerprint"]
  ):
    raise CheckpointError(
      f"the stage-1 export {path} does not match its meta.json (garbled "
      f"variables or a mixed export); {REWRITE_EXPORT}"
    )
  return model, variables, tree


def export_fingerprint(path: str) -> str:
  """Identity of a stage-1 export: its recorded :func:`fingerprint` (variables, tree, model,
  data); for exports written before it was recorded, a hash of their ``meta.json``."""
  meta = read_export_meta(path)
  if "fingerprint" in meta:
    return meta["fingerprint"]
  return hashlib.sha256((epath.Path(path) / "meta.json").read_bytes()).hexdigest()[:16]


def resolve_export(path: str) -> str:
  """Checks that ``path`` is a usable stage-1 export; returns it absolute.

  Raises:
    CheckpointError: a missing directory, a training workdir instead of its export, or something
      that is not an export, each with the fix.
  """
  p = epath.Path(path)
  if not p.exists():
    old = sorted(p.parent.glob(f"{p.name}.old-*")) if p.parent.exists() else []
    if old:
      raise CheckpointError(
        f"stage-1 export {p} is missing but {old[-1]} holds the previous one "
        f"(a run was stopped while replacing it): rename it to {p}, or "
        f"{REWRITE_EXPORT}"
      )
    raise CheckpointError(
      f"stage-1 export {p} does not exist: train stage 1 first "
      f"(python -m launch.train_treevae writes WORKDIR/export) or set "
      f"--config.diffusion.treevae_export=PATH/TO/export"
    )
  read_export_meta(path)  # training workdir / wrong format → CheckpointError with the fix
  return str(files.as_path(path))
