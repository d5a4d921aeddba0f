"""Checkpoints of both stages and the stage-1 export, the hand-off to stage 2.

* Training checkpoints: one Orbax ``CheckpointManager`` per stage (``WORKDIR/checkpoints``,
  ``WORKDIR/diffusion/checkpoints``); each step saves ``Composite(state=StandardSave(arrays),
  meta=JsonSave(meta))``. ``meta`` holds what the arrays need to be rebuilt (stage 1: the tree
  JSON and the schedule cursor), the config sections that determine training, the library
  version and a CRC32 of every array. Restoring reads ``meta`` first, checks config and version
  (a mismatch is refused with the differences), builds the abstract arrays with ``jax.eval_shape``
  and restores into them, so arrays come back with the right structure however much the tree has
  grown.
* Commits are atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp-…`` and renames it when
  complete; a run killed while saving leaves that temporary directory, which the next run ignores
  and removes. A checkpoint that cannot be read back (truncated or garbled files, bad JSON, wrong
  checksum) is moved to ``<dir>.unreadable/<step>`` with a warning and the previous one is used.
  Readers (sampling, evaluation) open checkpoints ``read_only``: they never create, clean up or
  delete anything, so they can run next to a trainer writing the same directory.
* Export: ``WORKDIR/export/`` holds ``variables/`` (an Orbax ``StandardCheckpointer`` directory)
  and ``meta.json`` (model hyper-parameters, tree, data shape, normalisation and identity, config,
  metrics, library version, and the :func:`fingerprint` stage 2 records: a hash of only what
  stage 2 uses). It is written next to the old one and swapped in when complete.
  :func:`load_treevae` is all stage 2 needs.
* A full disk (:func:`errors.disk_full`: ``ENOSPC``/``EDQUOT``, or TensorStore's
  ``RESOURCE_EXHAUSTED`` error) while a checkpoint or the export is written is one
  :class:`CheckpointError` naming what was kept; what Orbax's threads log or cannot raise about
  that failure meanwhile is held back (:func:`_orbax_failure_held`).

Checkpoints and the export stay in one module because they share the checksum, the meta checks,
the multi-process barriers and the rules about what may be replaced when (re-runs, crashes while
writing); that is what makes it long.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging as py_logging
import os
import sys
import time
import zlib
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from tree_diffusion import __version__, errors, files
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE, check_variables

EXPORT_FORMAT = "tree_diffusion.treevae.export/1"


class CheckpointError(ValueError):
  """A checkpoint or export that cannot be used; the message says why and what to do."""


def _restore_sharding(sharding=None):
  """Where a restored array goes: ``sharding`` as given; in a multi-process job an unspecified or
  one-device placement becomes a copy on every device of every process (Orbax restores a
  multi-process job's arrays as global arrays, and refuses a process-local target)."""
  if jax.process_count() == 1 or not (sharding is None or isinstance(
      sharding, jax.sharding.SingleDeviceSharding)):
    return sharding
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_variables(model: TreeVAE, tree: Tree):
  """Restore target: the structure, shapes and dtypes of the variables of ``tree``."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_restore_sharding()),
      model.init(jax.random.key(0), tree))


def checksum(arrays) -> str:
  """CRC32 of every array's bytes (in tree order), as hex: detects garbled checkpoint files,
  which Orbax itself restores without complaint."""
  crc = 0
  for leaf in jax.tree_util.tree_leaves(arrays):
    if isinstance(leaf, jax.Array):   # replicated over processes: this process's full copy
      leaf = leaf.addressable_data(0)
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return f"{crc:08x}"


def config_sections(config, sections: Iterable[str]) -> dict:
  """The JSON form of ``config``'s ``sections`` (what a checkpoint records and compares)."""
  full = json.loads(config.to_json_best_effort())
  return {s: full.get(s) for s in sections}


def _differences(saved: dict, current: dict, ignore: Iterable[str] = (),
                 shared_only: bool = False) -> list[tuple[str, Any, Any]]:
  """``[(dotted key, saved value, current value), …]`` where two nested dicts differ, sorted by
  key, except the dotted keys (or key prefixes) in ``ignore``. A key only one side has compares
  as ``"<missing>"``, or is skipped with ``shared_only``."""
  ignore = tuple(ignore)
  out = []

  def walk(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
      keys = set(a) & set(b) if shared_only else set(a) | set(b)
      for k in sorted(keys):
        walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
      return
    key = prefix[:-1]
    if a != b and not any(key == i or key.startswith(i + ".") for i in ignore):
      out.append((key, a, b))

  walk(saved, current, "")
  return out


def config_differences(saved: dict, current: dict, ignore: Iterable[str] = ()) -> list[str]:
  """``["stage1.lr: 0.001 (checkpoint) → 0.002 (now)", …]`` over nested dicts, except the dotted
  keys (or key prefixes) in ``ignore``."""
  return [f"{k}: {a!r} (checkpoint) → {b!r} (now)" for k, a, b in
          _differences(saved, current, ignore)]


class _Checkpoints:
  """An Orbax manager with checksums, config/version checks and fall-back past unreadable steps."""

  kind = "checkpoint"

  def __init__(self, directory, max_to_keep: int = 3, read_only: bool = False):
    """``read_only``: for readers (sampling, evaluation) next to a running trainer: nothing is
    created, cleaned up (the trainer's in-flight temporary checkpoint) or deleted."""
    self.directory = epath.Path(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(files.as_path(self.directory), options=options)
    if not read_only:
      # Orbax removes the temporary directories of interrupted saves in a background thread and
      # waits for it only at the next save; wait now, so that the directory is settled before
      # anything here lists, moves or restores steps (and a process that exits before saving
      # does not leave the removal half done). Orbax is pinned; this method is not public.
      self.manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access

  def _save(self, step: int, arrays, meta: dict):
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    meta = {"version": __version__, **meta, "checksum": checksum(arrays)}
    logging.info("saving %s %d in %s", self.kind, step, self.directory)
    latest = self.manager.latest_step()
    try:
      with _orbax_failure_held():
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()   # committed (renamed into place) before we go on
    except Exception as e:  # pylint: disable=broad-except  (Orbax wraps the OSError)
      error = self._not_saved(f"{self.kind} {step}", e, latest)
      if error is None:
        raise
      raise error from e

  def _not_saved(self, what: str, e: Exception, latest: int | None) -> CheckpointError | None:
    """The one-line error of a save of ``what`` that failed with ``e`` because the disk is full or
    the directory cannot be written (``None`` for any other failure); ``latest``: the last
    complete step before it."""
    cause = _os_error(e)
    if errors.disk_full(e) is not None:
      why = "the disk is full"
    elif cause is not None:
      why = f"it cannot be written ({cause.strerror or cause})"
    else:
      return None
    then = "start afresh" if latest is None else "resume from it"
    return CheckpointError(
        f"{what} was not saved in {self.directory}: {why}; the last complete one is "
        f"{self.describe_latest(latest)}. Free space (or fix the directory) and re-run the same "
        f"command to {then}")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def describe_latest(self, step: int | None = -1) -> str:
    """``"checkpoint 4 in DIR (kept)"`` or ``"none yet (a restart begins afresh)"``: for messages
    (about ``step``, by default the latest one)."""
    step = self.manager.latest_step() if step == -1 else step
    return ("none yet (a restart begins afresh)" if step is None
            else f"checkpoint {step} in {self.directory} (kept)")

  def _read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _read(self, step: int, abstract_fn: Callable[[dict], Any], check: Callable[[int, dict], None]):
    """``(arrays, meta)`` of ``step``; ``CheckpointError`` from ``check`` passes through, any
    other failure is returned as the exception."""
    try:
      meta = self._read_meta(step)
    except Exception as e:  # pylint: disable=broad-except  (a half-written/garbled JSON file)
      return e
    check(step, meta)
    try:
      arrays = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_fn(meta))))["state"]
    except Exception as e:  # pylint: disable=broad-except  (missing or truncated array files)
      return e
    if "checksum" in meta and checksum(arrays) != meta["checksum"]:
      return CheckpointError(f"checksum {checksum(arrays)} != {meta['checksum']} recorded at save")
    return arrays, meta

  def restore_latest(self, abstract_fn: Callable[[dict], Any],
                     check: Callable[[int, dict], None] = lambda step, meta: None):
    """``(step, arrays, meta)`` of the newest readable checkpoint, or ``None`` if there is none.

    Newer checkpoints that cannot be read are moved to ``<dir>.unreadable/`` (with a warning) once
    an older one has been read, so that training can write those steps again.

    Raises:
      CheckpointError: ``check`` refused the newest readable checkpoint (config or version), or no
        checkpoint can be read (nothing is moved then).
    """
    bad = []
    for step in reversed(self.all_steps()):
      out = self._read(step, abstract_fn, check)
      if isinstance(out, Exception):
        bad.append((step, out))
        continue
      for s, err in bad:
        self._move_aside(s, err, step)
      return (step,) + out
    if bad:
      raise CheckpointError(
          f"no {self.kind} in {self.directory} can be read (steps "
          f"{', '.join(f'{s}: {_short(e)}' for s, e in bad)}); move the directory away to start "
          f"afresh")
    return None

  def _move_aside(self, step: int, err: Exception, fallback: int):
    if self.read_only:
      return
    target_dir = files.as_path(f"{files.as_path(self.directory)}.unreadable")
    target = target_dir / str(step)
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():
        target, n = target_dir / f"{step}_{n}", n + 1
      (files.as_path(self.directory) / str(step)).rename(target)
    _sync(f"moved_unreadable_{step}")
    logging.warning("%s %d in %s cannot be read (%s): moved to %s, resuming from %d instead",
                    self.kind, step, self.directory, _short(err), target, fallback)
    self.manager.reload()

  def close(self):
    """Closes the manager; a save still in flight is finished first.

    Raises:
      CheckpointError: that save found the disk full or the directory unwritable (the last
        complete checkpoint is kept).
    """
    try:
      with _orbax_failure_held():
        self.manager.close()
    except Exception as e:  # pylint: disable=broad-except  (Orbax wraps the OSError)
      error = self._not_saved(f"the last {self.kind}", e, self.manager.latest_step())
      if error is None:
        raise
      raise error from e


class _HeldRecords(py_logging.Filter):
  """Holds back error records (Orbax's, with their tracebacks) while it is installed."""

  def __init__(self):
    super().__init__()
    self.records: list[py_logging.LogRecord] = []

  def filter(self, record):
    if record.levelno < py_logging.ERROR:
      return True
    self.records.append(record)
    return False


# Where Orbax's threads report a failed write on their own: absl's logger, and asyncio's (tasks
# of its event loops left pending when a write fails).
_ORBAX_LOGGERS = ("absl", "asyncio")
# After a failed write, the writes still in flight report within milliseconds: the wait for them
# ends after this long without a new report, or at the latest after _SETTLE_MAX_S.
_SETTLE_S = 0.25
_SETTLE_MAX_S = 5.0


def _settle(reports: Callable[[], int]):
  """Waits until ``reports()`` (how many reports were held so far) has not changed for
  ``_SETTLE_S``, collecting garbage meanwhile: the coroutines and tasks that a failed Orbax write
  leaves pending end (and report) now, not when the process exits."""
  deadline = time.monotonic() + _SETTLE_MAX_S
  seen, since = -1, time.monotonic()
  while time.monotonic() < deadline:
    gc.collect()
    now = time.monotonic()
    if reports() != seen:
      seen, since = reports(), now
    elif now - since >= _SETTLE_S:
      return
    time.sleep(0.02)


@contextlib.contextmanager
def _orbax_failure_held():
  """Holds back what Orbax says on its own while it writes: the error records its threads log
  (each with a traceback) and the exceptions that TensorStore's callbacks cannot raise once
  Orbax's event loop is closed (``sys.unraisablehook``: "Event loop is closed"). When the block
  fails with a full disk, what the writes still in flight report is awaited (:func:`_settle`) and
  all of it dropped: the caller says it in one line, and the exception it raises holds Orbax's
  (``--traceback`` shows it). Otherwise they are logged and reported as they would have been. The
  filters and the hook are removed when the block ends."""
  held = _HeldRecords()
  unraisable = []

  def hold(u):   # the object itself is not kept: it may be one being finalised
    unraisable.append((u.err_msg or "Exception ignored in", repr(u.object),
                       (u.exc_type, u.exc_value, u.exc_traceback)))

  loggers = [py_logging.getLogger(name) for name in _ORBAX_LOGGERS]
  previous_hook = sys.unraisablehook
  for logger in loggers:
    logger.addFilter(held)
  sys.unraisablehook = hold
  full = False
  try:
    yield
  except BaseException as e:
    full = errors.disk_full(e) is not None
    if full:   # the writes still in flight report now, and are held back too
      _settle(lambda: len(held.records) + len(unraisable))
    raise
  finally:
    sys.unraisablehook = previous_hook
    for logger in loggers:
      logger.removeFilter(held)
    if not full:
      for record in held.records:
        py_logging.getLogger(record.name).handle(record)
      for message, obj, exc_info in unraisable:
        logging.error("%s: %s", message, obj, exc_info=exc_info)


def _os_error(e: BaseException) -> OSError | None:
  """The ``OSError`` behind ``e`` (itself, a cause or a context; Orbax re-raises its own)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _short(e: BaseException) -> str:
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:200]}"


def check_compatible(kind: str, step: int, directory, meta: dict, config: dict,
                     ignore: Iterable[str], afresh: Callable[[list[str]], str] | None = None):
  """Refuses a checkpoint of another library version or config; the message lists what differs.

  A checkpoint that records its dataset's identity (``data_identity``, which the caller compares)
  may have another ``data.folder``: a folder moved or copied with the same content resumes.
  ``afresh(keys)``: how to start afresh when the dotted ``keys`` differ (default: a new --workdir).
  """
  if meta.get("version") != __version__:
    raise CheckpointError(
        f"{kind} {step} in {directory} was written by tree_diffusion {meta.get('version')}, this "
        f"is {__version__}: resume with that version, or start afresh with a new --workdir")
  if "config" not in meta:
    return
  if meta.get("data_identity") is not None:
    ignore = (*ignore, "data.folder")
  saved = {k: meta["config"].get(k) for k in config}
  diffs = config_differences(saved, config, ignore)
  if diffs:
    keys = [k for k, _, _ in _differences(saved, config, ignore)]
    fresh = afresh(keys) if afresh is not None else "start afresh with a new --workdir"
    raise CheckpointError(
        f"{kind} {step} in {directory} was trained with another config ({'; '.join(diffs)}): "
        f"resume with the original settings, or {fresh}")


# ----------------------------------------------------------------------------------- stage 1

# Settings that do not change what stage 1 computes: they may differ when a run is resumed.
STAGE1_RESUMABLE_CHANGES = (
    "data.data_dir", "stage1.log_every_epochs", "stage1.eval_every_epochs",
    "stage1.checkpoints_to_keep", "stage1.checkpoint_every_steps",
    "stage1.figure_images_per_leaf", "stage1.kmeans_baseline", "stage1.final_elbo")
STAGE1_SECTIONS = ("data", "treevae", "stage1")


class Stage1Checkpoints(_Checkpoints):
  """Saves and restores ``(variables, tree, cursor)`` of a stage-1 run, plus — for a checkpoint
  taken inside a phase — the phase's train state and sample indices (see ``treevae/train.py``)."""

  kind = "stage-1 checkpoint"

  def __init__(self, workdir: str, max_to_keep: int = 3):
    super().__init__(RunDir(workdir).checkpoints, max_to_keep)

  def save(self, step: int, variables, tree: Tree, cursor: dict, extra: dict | None = None,
           phase_arrays: dict | None = None):
    meta = {"tree": json.loads(tree.to_json()), "cursor": cursor, **(extra or {})}
    arrays = {"variables": variables, **(phase_arrays or {})}
    self._save(step, arrays, meta)

  def restore(self, model: TreeVAE, config=None,
              phase_abstract: Callable[[dict, Tree, Any], dict] | None = None,
              check_meta: Callable[[int, dict], None] | None = None):
    """``(step, variables, tree, meta, phase_arrays)`` of the newest readable checkpoint, or
    ``None``. ``config`` (if given) must match the checkpoint's (see ``STAGE1_RESUMABLE_CHANGES``);
    ``phase_abstract(meta, tree, abstract_variables)`` gives the abstract phase arrays of a
    checkpoint taken inside a phase; ``check_meta(step, meta)`` may refuse a checkpoint (raise
    ``CheckpointError``), e.g. one of another dataset."""
    current = None if config is None else config_sections(config, STAGE1_SECTIONS)

    def check(step, meta):
      if current is not None:
        check_compatible(self.kind, step, self.directory, meta, current, STAGE1_RESUMABLE_CHANGES)
      if check_meta is not None:
        check_meta(step, meta)

    def abstract(meta):
      tree = Tree.from_json(meta["tree"])
      variables = _abstract_variables(model, tree)
      extra = phase_abstract(meta, tree, variables) if phase_abstract is not None else {}
      return {"variables": variables, **extra}

    out = self.restore_latest(abstract, check)
    if out is None:
      return None
    step, arrays, meta = out
    variables = arrays.pop("variables")
    return step, variables, Tree.from_json(meta["tree"]), meta, arrays


def fingerprint(model: TreeVAE, variables, tree: Tree, data_identity: dict | None) -> str:
  """Identity of a stage-1 model as stage 2 sees it: a hash of the variables (their CRC32), the
  tree, the model hyper-parameters and the dataset's identity; nothing else (no wall times, no
  metrics), so that writing the same model again gives the same fingerprint."""
  key = json.dumps({"checksum": checksum(variables), "tree": json.loads(tree.to_json()),
                    "model": model.to_dict(), "data": data_identity},
                   sort_keys=True, default=json_default)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def export_treevae(export_dir: str, model: TreeVAE, variables, tree: Tree, meta: dict[str, Any],
                   data_identity: dict | None = None) -> str:
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
  writer = jax.process_index() == 0   # on several processes, the variables are saved together
  print_ = fingerprint(model, variables, tree, data_identity)
  try:
    if writer:
      for stale in path.parent.glob(f"{path.name}.tmp-*"):   # a previous run killed while writing
        stale.rmtree()
      tmp.mkdir(parents=True)
    _sync("export_dir_ready")
    with _orbax_failure_held(), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "variables", variables)
    if writer:
      full_meta = {"format": EXPORT_FORMAT, "version": __version__, "fingerprint": print_,
                   "model": model.to_dict(), "tree": json.loads(tree.to_json()), **meta}
      if data_identity is not None:
        full_meta["data"] = {**full_meta.get("data", {}), "identity": data_identity}
      (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=json_default))
  except Exception as e:  # pylint: disable=broad-except  (Orbax wraps the OSError)
    if errors.disk_full(e) is None:
      raise
    if writer:
      try:
        tmp.rmtree()   # what was written of it: freed at once
      except Exception:  # pylint: disable=broad-except
        pass
    kept = "the previous export there is kept" if path.exists() else "there was none before"
    raise CheckpointError(
        f"the stage-1 export was not written to {path}: the disk is full ({kept}); free space on "
        f"the disk that holds {path.parent} and {_REWRITE}") from e
  if writer:
    if path.exists():
      if old.exists():      # left by an earlier run killed after its swap (same pid or multihost)
        old.rmtree()
      path.rename(old)
    tmp.rename(path)
    for previous in path.parent.glob(f"{path.name}.old-*"):   # this one, and any left earlier
      previous.rmtree()
  _sync("export_written")
  return print_


def export_matches(export_dir: str, model: TreeVAE, variables, tree: Tree,
                   data_identity: dict | None) -> bool:
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
  return (got_model == model and got_tree == tree
          and checksum(got_variables) == checksum(variables))


def _sync(name: str):
  """A barrier across processes (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


_REWRITE = ("rewrite it by re-running launch/train_treevae.py with the same --config and --workdir "
            "(a finished run only writes the export again)")


def _export_hint(path: str) -> str:
  """Where the export of a run directory or of a run's ``diffusion/`` directory is, when it
  exists (the text added to "not a stage-1 export")."""
  run_dir = RunDir(path)
  if files.exists(run_dir.export):
    return f" (this looks like a training workdir: pass {run_dir.export})"
  parent = str(files.as_path(path).parent)
  if files.as_path(path).name == "diffusion" and files.exists(RunDir(parent).stage2_config):
    try:
      export = json.loads(files.read_text(RunDir(parent).stage2_config))["diffusion"][
          "treevae_export"] or RunDir(parent).export
    except (ValueError, KeyError, TypeError):
      export = RunDir(parent).export
    if files.exists(export):
      return f" (this is a run's stage-2 directory; the stage-1 export it used is {export})"
    return " (this is a run's stage-2 directory, not a stage-1 export)"
  if files.exists(run_dir.checkpoints):
    return (" (this looks like a training workdir whose stage 1 has not finished: it has "
            "checkpoints but no export yet)")
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
    raise CheckpointError(f"{meta_file} is garbled ({_short(e)}); {_REWRITE}") from None
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
  try:
    model = TreeVAE(**meta["model"])
    tree = Tree.from_json(meta["tree"])
    abstract = _abstract_variables(model, tree)
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(files.as_path(path) / "variables", abstract)
    check_variables(tree, variables)
  except Exception as e:  # pylint: disable=broad-except  (truncated, garbled or missing files)
    raise CheckpointError(f"the stage-1 export {path} cannot be read ({_short(e)}); "
                          f"{_REWRITE}") from None
  if "fingerprint" in meta and fingerprint(model, variables, tree,
                                           meta.get("data", {}).get("identity")) != meta["fingerprint"]:
    raise CheckpointError(f"the stage-1 export {path} does not match its meta.json (garbled "
                          f"variables or a mixed export); {_REWRITE}")
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
      raise CheckpointError(f"stage-1 export {p} is missing but {old[-1]} holds the previous one "
                            f"(a run was stopped while replacing it): rename it to {p}, or "
                            f"{_REWRITE}")
    raise CheckpointError(f"stage-1 export {p} does not exist: train stage 1 first "
                          f"(launch/train_treevae.py writes WORKDIR/export) or set "
                          f"--config.diffusion.treevae_export=PATH/TO/export")
  read_export_meta(path)  # training workdir / wrong format → CheckpointError with the fix
  return str(files.as_path(path))


# Settings that do not change what stage 2 computes up to a step: they may differ on resume
# (num_steps/num_epochs only move the end; the export is identified by its fingerprint).
STAGE2_RESUMABLE_CHANGES = (
    "data.data_dir", "diffusion.log_every_steps", "diffusion.checkpoint_every_steps",
    "diffusion.checkpoints_to_keep", "diffusion.num_steps", "diffusion.num_epochs",
    "diffusion.sampling", "diffusion.treevae_export", "diffusion.sample_every")
STAGE2_SECTIONS = ("data", "diffusion")

# The settings of sampling and evaluation: ``launch/sample.py`` and ``launch/evaluate.py`` may run
# a trained run with other values than those of its config.json (keys or whole sections). So may
# the settings either stage may change on resume (they only say how a run logs and checkpoints,
# where it ends and where its data and export are). Every other key describes what was trained.
RUN_SETTINGS = (
    "diffusion.sampling", "diffusion.dtype", "stage1.eval_batch_size", "eval", "classifier")


def run_config_contradictions(config, saved: dict) -> list[tuple[str, Any, Any]]:
  """Where ``config`` contradicts a run's recorded config (the JSON of :func:`runs.save_config`).

  Keys in :data:`RUN_SETTINGS` and in both stages' resumable changes may differ; keys that only
  one side has (a config recorded by an older version) are not compared.

  Returns:
    ``[(dotted key, value in saved, value in config), …]`` (JSON values), sorted by key.
  """
  return _differences(saved, json.loads(config.to_json_best_effort()),
                      RUN_SETTINGS + STAGE1_RESUMABLE_CHANGES + STAGE2_RESUMABLE_CHANGES,
                      shared_only=True)


class Stage2Checkpoints(_Checkpoints):
  """Orbax checkpoints of stage 2 in ``directory``: the train state (params, EMA, optimiser, step)
  and JSON meta (which export it was trained on, epoch, config)."""

  kind = "stage-2 checkpoint"

  def save(self, step: int, state, meta: dict):
    self._save(step, state, meta)

  @staticmethod
  def steps_in(directory: str) -> list[int]:
    """The committed checkpoint steps in ``directory`` (``[]`` if it does not exist); read-only."""
    if not epath.Path(directory).is_dir():
      return []
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(files.as_path(directory)))

  def _check_step(self, step: int):
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no stage-2 checkpoint {step} in {self.directory}; "
                            f"have {sorted(self.manager.all_steps())}")

  def read_meta(self, step: int | None = None) -> dict | None:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    return self._read_meta(step)

  def restore(self, abstract_state, step: int | None = None):
    """``(step, state, meta)`` of ``step`` (default latest) restored into ``abstract_state``'s
    structure, or ``None`` when there is no checkpoint (no fall-back: evaluation of one step)."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    self._check_step(step)
    out = self._read(step, lambda meta: _abstract_like(abstract_state), lambda s, m: None)
    if isinstance(out, Exception):
      raise CheckpointError(f"stage-2 checkpoint {step} in {self.directory} cannot be read "
                            f"({_short(out)})")
    return (step,) + out

  def restore_for_training(self, abstract_state: Callable[[], Any], config,
                           check_meta: Callable[[int, dict], None]):
    """``(step, state, meta)`` of the newest readable checkpoint (falling back past unreadable
    ones), refused if its config or version differs; ``None`` when there is none.
    ``abstract_state()`` gives the restore target (only called when there is a checkpoint)."""
    current = config_sections(config, STAGE2_SECTIONS)

    def check(step, meta):
      check_meta(step, meta)
      check_compatible(self.kind, step, self.directory, meta, current, STAGE2_RESUMABLE_CHANGES,
                       afresh=lambda keys: _stage2_afresh(keys, meta.get("export")))

    return self.restore_latest(lambda meta: _abstract_like(abstract_state()), check)


def _stage2_afresh(keys: Iterable[str], export: str | None) -> str:
  """How to start stage 2 afresh when the dotted config ``keys`` differ from a run's: a new
  --workdir, on the run's stage-1 ``export`` when they are all stage-2 settings (stage 1 is then
  not trained again)."""
  if export and all(k.startswith("diffusion.") for k in keys):
    return (f"start afresh with a new --workdir on this run's stage-1 export: pass "
            f"--config.diffusion.treevae_export={export}")
  return "start afresh with a new --workdir"


def _abstract_like(tree):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=_restore_sharding(getattr(a, "sharding", None))),
      tree)
