"""Orbax training checkpoints, generic over what they hold: :class:`Checkpoints` (the stage-1
and stage-2 subclasses are ``treevae/checkpoints.py`` and ``diffusion/checkpoints.py``; the
stage-1 export is ``treevae/export.py``).

* One Orbax ``CheckpointManager`` per stage (``WORKDIR/checkpoints``,
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
* A full disk (:func:`errors.disk_full`: ``ENOSPC``/``EDQUOT``, or TensorStore's
  ``RESOURCE_EXHAUSTED`` error) while a checkpoint or the export is written is one
  :class:`CheckpointError` naming what was kept; what Orbax's threads log or cannot raise about
  that failure meanwhile is held back (:func:`orbax_failure_held`).
* Also here, for both stages and the commands that read runs: the config comparisons
  (:func:`config_differences`, :func:`run_config_contradictions`) and the settings each stage may
  change on resume.

The module is long because every guarantee above (checksums, compatibility, fall-back, full disk,
multi-process writes) wraps the one Orbax manager, and both stages' checkpoints rely on all of it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as py_logging
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
from tree_diffusion import data as data_lib


class CheckpointError(ValueError):
  """A checkpoint or export that cannot be used; the message says why and what to do."""


def restore_sharding(sharding=None):
  """Where a restored array goes: ``sharding`` as given; in a multi-process job an unspecified or
  one-device placement becomes a copy on every device of every process (Orbax restores a
  multi-process job's arrays as global arrays, and refuses a process-local target)."""
  if jax.process_count() == 1 or not (
    sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding)
  ):
    return sharding
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def checksum(arrays) -> str:
  """CRC32 of every array's bytes (in tree order), as hex: detects garbled checkpoint files,
  which Orbax itself restores without complaint."""
  crc = 0
  for leaf in jax.tree_util.tree_leaves(arrays):
    if isinstance(leaf, jax.Array):  # replicated over processes: this process's full copy
      leaf = leaf.addressable_data(0)
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return f"{crc:08x}"


def config_sections(config, sections: Iterable[str]) -> dict:
  """The JSON form of ``config``'s ``sections`` (what a checkpoint records and compares)."""
  full = json.loads(config.to_json_best_effort())
  return {s: full.get(s) for s in sections}


def differences(
  saved: dict, current: dict, ignore: Iterable[str] = (), shared_only: bool = False
) -> list[tuple[str, Any, Any]]:
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
  return [
    f"{k}: {a!r} (checkpoint) → {b!r} (now)" for k, a, b in differences(saved, current, ignore)
  ]


class Checkpoints:
  """An Orbax manager with checksums, config/version checks and fall-back past unreadable steps."""

  kind = "checkpoint"

  def __init__(self, directory, max_to_keep: int = 3, read_only: bool = False):
    """``read_only``: for readers (sampling, evaluation) next to a running trainer: nothing is
    created, cleaned up (the trainer's in-flight temporary checkpoint) or deleted."""
    self.directory = epath.Path(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, max_to_keep=None, cleanup_tmp_directories=False
      )
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      )
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
      with orbax_failure_held():
        self.manager.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
          ),
        )
        self.manager.wait_until_finished()  # committed (renamed into place) before we go on
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
      f"command to {then}"
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def describe_latest(self, step: int | None = -1) -> str:
    """``"checkpoint 4 in DIR (kept)"`` or ``"none yet (a restart begins afresh)"``: for messages
    (about ``step``, by default the latest one)."""
    step = self.manager.latest_step() if step == -1 else step
    return (
      "none yet (a restart begins afresh)"
      if step is None
      else f"checkpoint {step} in {self.directory} (kept)"
    )

  def _read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _read(
    self, step: int, abstract_fn: Callable[[dict], Any], check: Callable[[int, dict], None]
  ):
    """``(arrays, meta)`` of ``step``; ``CheckpointError`` from ``check`` passes through, any
    other failure is returned as the exception."""
    try:
      meta = self._read_meta(step)
    except Exception as e:  # pylint: disable=broad-except  (a half-written/garbled JSON file)
      return e
    check(step, meta)
    try:
      arrays = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_fn(meta)))
      )["state"]
    except Exception as e:  # pylint: disable=broad-except  (missing or truncated array files)
      return e
    if "checksum" in meta and checksum(arrays) != meta["checksum"]:
      return CheckpointError(f"checksum {checksum(arrays)} != {meta['checksum']} recorded at save")
    return arrays, meta

  def restore_latest(
    self,
    abstract_fn: Callable[[dict], Any],
    check: Callable[[int, dict], None] = lambda step, meta: None,
  ):
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
        f"{', '.join(f'{s}: {short_error(e)}' for s, e in bad)}); move the directory away to start "
        f"afresh"
      )
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
    sync_processes(f"moved_unreadable_{step}")
    logging.warning(
      "%s %d in %s cannot be read (%s): moved to %s, resuming from %d instead",
      self.kind,
      step,
      self.directory,
      short_error(err),
      target,
      fallback,
    )
    self.manager.reload()

  def close(self):
    """Closes the manager; a save still in flight is finished first.

    Raises:
      CheckpointError: that save found the disk full or the directory unwritable (the last
        complete checkpoint is kept).
    """
    try:
      with orbax_failure_held():
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
def orbax_failure_held():
  """Holds back what Orbax says on its own while it writes: the error records its threads log
  (each with a traceback) and the exceptions that TensorStore's callbacks cannot raise once
  Orbax's event loop is closed (``sys.unraisablehook``: "Event loop is closed"). When the block
  fails with a full disk, what the writes still in flight report is awaited (:func:`_settle`) and
  all of it dropped: the caller says it in one line, and the exception it raises holds Orbax's
  (``--traceback`` shows it). Otherwise they are logged and reported as they would have been. The
  filters and the hook are removed when the block ends."""
  held = _HeldRecords()
  unraisable = []

  def hold(u):  # the object itself is not kept: it may be one being finalised
    unraisable.append(
      (
        u.err_msg or "Exception ignored in",
        repr(u.object),
        (u.exc_type, u.exc_value, u.exc_traceback),
      )
    )

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
    if full:  # the writes still in flight report now, and are held back too
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


def short_error(e: BaseException) -> str:
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:200]}"


def check_compatible(
  kind: str,
  step: int,
  directory,
  meta: dict,
  config: dict,
  ignore: Iterable[str],
  afresh: Callable[[list[str]], str] | None = None,
):
  """Refuses a checkpoint of another library version or config; the message lists what differs.

  A checkpoint that records its dataset's identity (``data_identity``, which the caller compares)
  may have another ``data.folder``: a folder moved or copied with the same content resumes.
  ``afresh(keys)``: how to start afresh when the dotted ``keys`` differ (default: a new --workdir).
  """
  if meta.get("version") != __version__:
    raise CheckpointError(
      f"{kind} {step} in {directory} was written by tree_diffusion {meta.get('version')}, this "
      f"is {__version__}: resume with that version, or start afresh with a new --workdir"
    )
  if "config" not in meta:
    return
  if meta.get("data_identity") is not None:
    ignore = (*ignore, "data.folder")
  saved = {k: meta["config"].get(k) for k in config}
  diffs = config_differences(saved, config, ignore)
  if diffs:
    keys = [k for k, _, _ in differences(saved, config, ignore)]
    fresh = afresh(keys) if afresh is not None else "start afresh with a new --workdir"
    raise CheckpointError(
      f"{kind} {step} in {directory} was trained with another config ({'; '.join(diffs)}): "
      f"resume with the original settings, or {fresh}"
    )


def sync_processes(name: str):
  """A barrier across processes (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# How to repair an unreadable or stale stage-1 export (in the export's errors).
REWRITE_EXPORT = (
  "rewrite it by re-running python -m launch.train_treevae with the same --config and "
  "--workdir (a finished run only writes the export again)"
)


def json_default(o):
  """``json.dump`` fallback for numpy scalars/arrays and objects with ``to_dict``."""
  if hasattr(o, "tolist"):
    return o.tolist()
  if hasattr(o, "to_dict"):
    return o.to_dict()
  raise TypeError(f"not JSON serialisable: {type(o)}")


def abstract_like(tree):
  """Restore target with the structure, shapes, dtypes (and shardings) of ``tree``."""
  return jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=restore_sharding(getattr(a, "sharding", None))
    ),
    tree,
  )


# ------------------------------------------------------------ what each stage may change on resume

# Settings that do not change what stage 1 computes: they may differ when a run is resumed.
STAGE1_RESUMABLE_CHANGES = (
  "data.data_dir",
  "stage1.log_every_epochs",
  "stage1.eval_every_epochs",
  "stage1.checkpoints_to_keep",
  "stage1.checkpoint_every_steps",
  "stage1.figure_images_per_leaf",
  "stage1.kmeans_baseline",
  "stage1.final_elbo",
)
STAGE1_SECTIONS = ("data", "treevae", "stage1")

# Settings that do not change what stage 2 computes up to a step: they may differ on resume
# (num_steps/num_epochs only move the end; the export is identified by its fingerprint).
STAGE2_RESUMABLE_CHANGES = (
  "data.data_dir",
  "diffusion.log_every_steps",
  "diffusion.checkpoint_every_steps",
  "diffusion.checkpoints_to_keep",
  "diffusion.num_steps",
  "diffusion.num_epochs",
  "diffusion.sampling",
  "diffusion.treevae_export",
  "diffusion.sample_every",
)
STAGE2_SECTIONS = ("data", "diffusion")

# The settings of sampling and evaluation: ``launch/sample.py`` and ``launch/evaluate.py`` may run
# a trained run with other values than those of its config.json (keys or whole sections). So may
# the settings either stage may change on resume (they only say how a run logs and checkpoints,
# where it ends and where its data and export are). Every other key describes what was trained.
RUN_SETTINGS = (
  "diffusion.sampling",
  "diffusion.dtype",
  "stage1.eval_batch_size",
  "eval",
  "classifier",
)


def run_config_contradictions(config, saved: dict) -> list[tuple[str, Any, Any]]:
  """Where ``config`` contradicts a run's recorded config (the JSON of :func:`runs.save_config`).

  Keys in :data:`RUN_SETTINGS` and in both stages' resumable changes may differ; keys that only
  one side has (a config recorded by an older version) are not compared.

  Returns:
    ``[(dotted key, value in saved, value in config), …]`` (JSON values), sorted by key.
  """
  return differences(
    saved,
    json.loads(config.to_json_best_effort()),
    RUN_SETTINGS + STAGE1_RESUMABLE_CHANGES + STAGE2_RESUMABLE_CHANGES,
    shared_only=True,
  )


def check_same_dataset(meta: dict, identity: dict, data_config, what: str, step: int, directory):
  """Refuses to resume from checkpoint ``step`` of ``what`` ("stage-1 checkpoint") in ``directory``
  when its recorded dataset identity (``meta``) differs from ``identity``; logs where the images
  are read from now when only their folder moved."""
  change = data_lib.identity_change(meta.get("data_identity") or identity, identity)
  if change:
    raise CheckpointError(
      f"the dataset changed since {what} {step} in {directory} was written ({change}): put the "
      f"images back as they were, or start afresh with a new --workdir"
    )
  moved = data_lib.moved_folder((meta.get("config") or {}).get("data"), data_config)
  if moved and meta.get("data_identity") is not None:
    logging.info(
      "%s %d was trained on the images in %s; they are now read from %s (the same images, "
      "labels and split)",
      what,
      step,
      *moved,
    )
