"""Checkpoints of stage 1 and its export, the hand-off to stage 2.

* Training checkpoints: one Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``; each step saves
  ``Composite(state=StandardSave(variables), meta=JsonSave(meta))``. ``meta`` holds the tree JSON and
  the training cursor (phase, growth iteration, …). Restoring reads ``meta`` first, rebuilds the
  abstract variables of that tree with ``jax.eval_shape`` and restores into them, so arrays come
  back with the right structure however much the tree has grown.
* Export: ``WORKDIR/export/`` holds ``variables/`` (an Orbax ``StandardCheckpointer`` directory)
  and ``meta.json`` (model hyper-parameters, tree, data shape and normalisation, config, metrics,
  library version). :func:`load_treevae` is all stage 2 needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tree_diffusion import __version__
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE, check_variables

EXPORT_FORMAT = "tree_diffusion.treevae.export/1"


class CheckpointError(ValueError):
  """A checkpoint or export that cannot be used; the message says why and what to do."""


def _abstract_variables(model: TreeVAE, tree: Tree):
  """Restore target: the structure, shapes and dtypes of the variables of ``tree``."""
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                model.init(jax.random.key(0), tree))


class Stage1Checkpoints:
  """Saves and restores ``(variables, tree, cursor)`` of a stage-1 run."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory.resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, variables, tree: Tree, cursor: dict, extra: dict | None = None):
    meta = {"tree": json.loads(tree.to_json()), "cursor": cursor, "version": __version__,
            **(extra or {})}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                                    meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, model: TreeVAE, step: int | None = None):
    """Returns ``(step, variables, tree, meta)`` of ``step`` (default latest) or ``None``."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    tree = Tree.from_json(meta["tree"])
    abstract = _abstract_variables(model, tree)
    state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return step, state, tree, meta

  def close(self):
    self.manager.close()


def export_treevae(export_dir: str, model: TreeVAE, variables, tree: Tree, meta: dict[str, Any]):
  """Writes the final stage-1 model: ``variables/`` and ``meta.json`` (overwrites an old export)."""
  check_variables(tree, variables)
  path = epath.Path(export_dir).resolve()
  writer = jax.process_index() == 0   # on several processes, the variables are saved together
  if writer:
    if (path / "variables").exists():
      (path / "variables").rmtree()
    path.mkdir(parents=True, exist_ok=True)
  _sync("export_dir_ready")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "variables", variables)
  if writer:
    full_meta = {"format": EXPORT_FORMAT, "version": __version__, "model": model.to_dict(),
                 "tree": json.loads(tree.to_json()), **meta}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(full_meta, indent=2, default=json_default))
    os.replace(tmp, path / "meta.json")  # meta.json appears only once the export is complete
  _sync("export_written")


def _sync(name: str):
  """A barrier across processes (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def read_export_meta(path: str) -> dict:
  p = epath.Path(path)
  meta_file = p / "meta.json"
  if not meta_file.exists():
    hint = ""
    if (p / "checkpoints").exists() or (p / "export").exists():
      hint = f" (this looks like a training workdir: pass {p / 'export'})"
    raise CheckpointError(f"{p} is not a stage-1 export: no meta.json{hint}")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != EXPORT_FORMAT:
    raise CheckpointError(f"{meta_file} has format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
  return meta


def load_treevae(path: str):
  """Loads a stage-1 export.

  Returns:
    ``(model, variables, tree)``: the :class:`TreeVAE` hyper-parameters, its variables
    (``{"params", "batch_stats"}``) and the learned :class:`Tree`.
  """
  meta = read_export_meta(path)
  model = TreeVAE(**meta["model"])
  tree = Tree.from_json(meta["tree"])
  abstract = _abstract_variables(model, tree)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(epath.Path(path).resolve() / "variables", abstract)
  return model, variables, tree


def json_default(o):
  """``json.dump`` fallback for numpy scalars/arrays and objects with ``to_dict``."""
  if hasattr(o, "tolist"):
    return o.tolist()
  if hasattr(o, "to_dict"):
    return o.to_dict()
  raise TypeError(f"not JSON serialisable: {type(o)}")


# ----------------------------------------------------------------------------------- stage 2


def export_fingerprint(path: str) -> str:
  """Identity of a stage-1 export: a hash of its ``meta.json`` (config, tree, metrics, version)."""
  meta_file = epath.Path(path) / "meta.json"
  return hashlib.sha256(meta_file.read_bytes()).hexdigest()[:16]


def resolve_export(path: str) -> str:
  """Checks that ``path`` is a usable stage-1 export; returns it absolute.

  Raises:
    CheckpointError: a missing directory, a training workdir instead of its export, or something
      that is not an export, each with the fix.
  """
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"stage-1 export {p} does not exist: train stage 1 first "
                          f"(launch/train_treevae.py writes WORKDIR/export) or set "
                          f"--config.diffusion.treevae_export=PATH/TO/export")
  read_export_meta(path)  # training workdir / wrong format → CheckpointError with the fix
  return str(p.resolve())


class Stage2Checkpoints:
  """Orbax checkpoints of stage 2 in ``directory``: the train state (params, EMA, optimiser, step)
  and JSON meta (which export it was trained on, epoch, config)."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory.resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, state, meta: dict):
    meta = {"version": __version__, **meta}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  @staticmethod
  def steps_in(directory: str) -> list[int]:
    """The committed checkpoint steps in ``directory`` (``[]`` if it does not exist); read-only."""
    if not epath.Path(directory).is_dir():
      return []
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(epath.Path(directory).resolve()))

  def _check_step(self, step: int):
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no stage-2 checkpoint {step} in {self.directory}; "
                            f"have {sorted(self.manager.all_steps())}")

  def read_meta(self, step: int | None = None) -> dict | None:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, step: int | None = None):
    """``(step, state, meta)`` of ``step`` (default latest) restored into ``abstract_state``'s
    structure, or ``None`` when there is no checkpoint."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return step, out["state"], out["meta"]

  def close(self):
    self.manager.close()
