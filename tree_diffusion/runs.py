"""Run directories and small helpers shared by the training loops of both stages: the layout of
a ``--workdir`` (:class:`RunDir`), the recorded config, ETA text and the workdir checks. The lock a
command holds on its workdir is in :mod:`tree_diffusion.lock`."""

from __future__ import annotations

import dataclasses
import json
import os

from tree_diffusion import files
from tree_diffusion.errors import DiskFullError, StorageError, disk_full


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The layout of a run directory (``--workdir``): every path a command reads or writes there.

  ::

    config.json   checkpoints/  export/  tensorboard/  stage1_metrics.json  tree.png   stage 1
                  assignments.csv  report.html
    diffusion/    config.json  checkpoints/  tensorboard/  train_summary.json  tree.png  stage 2
                  samples/<mode>/  samples/summary.json                    launch/sample.py
    classifier/                          the purity classifier (unless classifier.dir is set)
    eval/         metrics.json  metrics.csv  report.md  cache/  step_<N>/  launch/evaluate.py
    summary.md                                                              launch/summarize.py

  ``root`` may be a local directory or a ``gs://`` URL; every path is read and written through
  :mod:`tree_diffusion.files`.
  """

  root: str

  def __post_init__(self):
    files.check_path(self.root, "RunDir's root")

  def _join(self, *parts: str) -> str:
    return files.join(self.root, *parts)

  # Stage 1.
  @property
  def config(self) -> str:
    """The full config stage 1 last trained with (JSON; see :func:`save_config`)."""
    return self._join("config.json")

  @property
  def checkpoints(self) -> str:
    return self._join("checkpoints")

  @property
  def export(self) -> str:
    return self._join("export")

  @property
  def tensorboard(self) -> str:
    return self._join("tensorboard")

  @property
  def stage1_metrics(self) -> str:
    return self._join("stage1_metrics.json")

  @property
  def assignments(self) -> str:
    """One row per train and test image: its file, label and leaf (``treevae.assignments``)."""
    return self._join("assignments.csv")

  @property
  def tree_figure(self) -> str:
    return self._join("tree.png")

  @property
  def report(self) -> str:
    """The page to explore the run (``html_report``; ``launch/report.py``)."""
    return self._join("report.html")

  # Stage 2.
  @property
  def stage2(self) -> str:
    return self._join("diffusion")

  @property
  def stage2_config(self) -> str:
    """The full config stage 2 last trained with (JSON; see :func:`save_config`)."""
    return self._join("diffusion", "config.json")

  def own_config(self) -> str | None:
    """The config file of this run: stage 2's ``diffusion/config.json`` if it exists (it holds
    the diffusion section that sampling needs), else stage 1's ``config.json``; ``None`` for a
    run trained before runs recorded their config."""
    for path in (self.stage2_config, self.config):
      if files.exists(path):
        return path
    return None

  @property
  def stage2_checkpoints(self) -> str:
    return self._join("diffusion", "checkpoints")

  @property
  def stage2_tensorboard(self) -> str:
    return self._join("diffusion", "tensorboard")

  @property
  def stage2_summary(self) -> str:
    return self._join("diffusion", "train_summary.json")

  @property
  def stage2_tree_figure(self) -> str:
    return self._join("diffusion", "tree.png")

  def samples(self, mode: str | None = None) -> str:
    """``diffusion/samples``, or the folder of one sampling mode in it."""
    return self._join("diffusion", "samples", *([mode] if mode else []))

  def samples_npz(self, mode: str) -> str:
    """``diffusion/samples/<mode>/samples.npz``: the images of one sampling mode."""
    return self._join("diffusion", "samples", mode, "samples.npz")

  def samples_grid(self, mode: str) -> str:
    """``diffusion/samples/<mode>/grid.png``."""
    return self._join("diffusion", "samples", mode, "grid.png")

  @property
  def samples_summary(self) -> str:
    return self._join("diffusion", "samples", "summary.json")

  # Evaluation.
  @property
  def classifier(self) -> str:
    return self._join("classifier")

  @property
  def eval(self) -> str:
    return self._join("eval")

  @property
  def eval_metrics(self) -> str:
    return self._join("eval", "metrics.json")

  @property
  def eval_csv(self) -> str:
    return self._join("eval", "metrics.csv")

  @property
  def eval_report(self) -> str:
    return self._join("eval", "report.md")

  @property
  def eval_cache(self) -> str:
    return self._join("eval", "cache")

  def eval_features(self, dataset: str, split: str) -> str:
    """The cached Inception features of a dataset split (``eval/cache/inception_*.npz``)."""
    return self._join("eval", "cache", f"inception_{dataset}_{split}.npz")

  def eval_step(self, step: int) -> str:
    return self._join("eval", f"step_{step}")

  @property
  def summary(self) -> str:
    return self._join("summary.md")


def read_recorded_config(workdir: str, fix: str) -> tuple[str, dict] | None:
  """``(path, config as a dict)`` of the config a run recorded (:meth:`RunDir.own_config`), or
  ``None`` when it recorded none.

  Raises:
    ConfigError: the file cannot be read or holds no JSON object (the message ends with ``fix``).
  """
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  path = RunDir(workdir).own_config()
  if path is None:
    return None
  try:
    saved = files.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"{path} cannot be read ({type(e).__name__}: {files.one_line(e)}): {fix}"
    ) from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} holds no config: {fix}")
  return path, saved


def save_config(path: str, config) -> bool:
  """Records ``config`` (the full ``ConfigDict`` a training command runs with) as JSON at ``path``
  (:attr:`RunDir.config`, :attr:`RunDir.stage2_config`), so that sampling and evaluation can use
  the run's own config. Written atomically, by process 0 only, and only when the file does not
  already hold the same config (a re-run of a finished stage changes no file).

  Returns:
    Whether the file was written.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return False
  obj = json.loads(config.to_json_best_effort())
  try:
    if files.exists(path) and files.read_json(path) == obj:
      return False
  except (OSError, ValueError):  # unreadable or garbled: written again
    pass
  files.write_json(path, obj)
  return True


def format_eta(seconds: float) -> str:
  """``H:MM:SS``."""
  seconds = max(0, int(seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _full_disk(directory: str, e: OSError) -> DiskFullError:
  """The error of a full disk found while creating ``directory`` or probing it (``e``)."""
  return DiskFullError(
    getattr(disk_full(e), "errno", None) or e.errno,
    f"the disk that holds {directory} is full: nothing was written (what the run directory had "
    f"is kept); free space on it and re-run the same command",
  )


def _unwritable(directory: str) -> str | None:
  """Why a file cannot be written in ``directory`` (a probe file written and removed), or None.

  Raises:
    DiskFullError: the disk is full.
  """
  if files.is_remote(directory):
    files.check_bucket(directory)
  elif not os.path.isdir(directory):
    return f"{directory} is not a directory"
  probe = files.join(directory, f".write_test{os.getpid()}")
  try:
    files.write_bytes(probe, b"ok")
    files.remove(probe)
  except OSError as e:
    if disk_full(e) is not None:
      raise _full_disk(directory, e) from e
    return f"{directory}: {e.strerror or files.one_line(e)}"
  return None


def check_workdir(workdir: str):
  """Creates ``workdir`` and checks that it is writable (a one-line error names the fix).

  Raises:
    PermissionError: it cannot be created or written.
    DiskFullError: the disk is full.
    StorageError: a ``gs://`` workdir whose bucket does not exist or cannot be reached.
  """
  try:
    files.makedirs(workdir)
  except StorageError:
    raise
  except OSError as e:
    if disk_full(e) is not None:
      raise _full_disk(workdir, e) from e
    why = e.strerror or files.one_line(e)
  else:
    why = _unwritable(workdir)
  if why is not None:
    raise PermissionError(
      f"workdir {workdir} is not writable ({why}); pass a --workdir you can write to"
    )


def check_writable(path: str, fix: str):
  """Checks, before any work, that the output directory ``path`` (made later by the work) can be
  written. Nothing is created: the probe goes into ``path`` or else its deepest existing
  ancestor, which must be a directory (on Cloud Storage, where folders are implicit, into
  ``path`` itself).

  Raises:
    PermissionError: ``path`` cannot be made or written (names the directory and ``fix``).
    DiskFullError: the disk is full.
    StorageError: a ``gs://`` path whose bucket does not exist or cannot be reached.
  """
  existing = path
  if not files.is_remote(path):
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
  why = _unwritable(existing)
  if why is not None:
    raise PermissionError(f"output directory {path} is not writable ({why}); {fix}")
