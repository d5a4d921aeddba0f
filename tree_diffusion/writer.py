"""Metric writer: TensorBoard events (via tensorboardX, no TensorFlow) plus a JSON-lines log.

One writer per job and log directory, on process 0 only (elsewhere every call is a no-op):

* scalars (:meth:`MetricWriter.write_scalars`), also appended to ``metrics.jsonl`` one line per
  call (``metrics.<job>.jsonl`` for a named job, e.g. the evaluation beside training);
* images (:meth:`MetricWriter.write_images`): uint8 ``[H, W]`` or ``[H, W, C]`` arrays or PIL
  images, e.g. sample grids and tree figures;
* hyper-parameters (:meth:`MetricWriter.write_hparams`): the TensorBoard hparams plugin's
  experiment and session summaries, written into the same event file as the scalars, so that the
  HPARAMS tab lists the run with the latest values of the metric tags it names.

``logdir`` may be a ``gs://`` URL. tensorboardX uploads each event file whole through
google-cloud-storage when it flushes (every two minutes and at :meth:`MetricWriter.close`). An
object cannot be appended to, so for a remote ``logdir`` the JSON-lines file is kept in memory
(with the lines already there when the writer opens, e.g. before a resume) and uploaded whole at
most every ``remote_flush_secs`` and at :meth:`MetricWriter.flush` / :meth:`MetricWriter.close`:
each upload replaces the object atomically, so a reader sees a complete earlier or later version.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from tree_diffusion import errors, files


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (the dotted names of ``--config.a.b``)."""
  out = {}
  for k, v in nested.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def eval_tags(thresholds=()) -> list[str]:
  """The scalar tags the evaluation writes per stage-2 checkpoint (``launch/evaluate.py``)."""
  return ["eval/fid_gen", "eval/fid_rec", "eval/nmi", *(purity_tag(t) for t in thresholds)]


def stage1_eval_tags() -> list[str]:
  """The scalar tags the evaluation writes for the stage-1 export (its TreeVAE's own FIDs, the
  test clustering metrics and log-likelihood)."""
  return [
    "eval/fid_gen",
    "eval/fid_rec",
    "eval/nmi",
    "eval/accuracy",
    "eval/leaf_purity",
    "eval/dendrogram_purity",
    "eval/log_likelihood",
  ]


def purity_tag(threshold: float) -> str:
  """The tag of the weighted majority fraction of generations kept at ``p(leaf) >= threshold``."""
  return f"eval/purity_p{float(threshold):g}"


def _hparam_value(v: Any) -> bool | int | float | str:
  """A value the hparams plugin shows: bools, numbers and strings as they are, the rest as JSON."""
  if isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.generic):
    return v.item()
  return json.dumps(v, default=str)


def _appendable(logdir: str) -> bool:
  """Whether files in ``logdir`` can be appended to (not on an object store)."""
  return not files.is_remote(logdir)


def _image_array(tag: str, image) -> tuple[np.ndarray, str]:
  """``image`` as a uint8 array and its tensorboardX data format; a one-line error otherwise."""
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ValueError(
      f"image {tag!r} is {x.dtype}; pass uint8 pixels (e.g. "
      f"np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8))"
    )
  if x.ndim == 2:
    return x, "HW"
  if x.ndim == 3 and x.shape[-1] in (1, 3, 4):
    return x, "HWC"
  raise ValueError(f"image {tag!r} has shape {x.shape}; pass [H, W] or [H, W, C] with C in 1, 3, 4")


class MetricWriter:
  """Writes scalars, images and hyper-parameters to ``logdir``; a no-op off process 0.

  Args:
    logdir: a local directory or a ``gs://`` URL (created if missing).
    job: names this writer's files when another job writes into the same ``logdir`` (the
      evaluation next to training): ``metrics.<job>.jsonl`` and an event file ending in
      ``.<job>``. Every writer gets an event file of its own either way (tensorboardX names them
      by the second, so the process id and a random tag are appended).
    remote_flush_secs: for a remote ``logdir``, the longest time between two uploads of the
      JSON-lines file.
  """

  def __init__(self, logdir: str, job: str = "", remote_flush_secs: float = 30.0):
    self.active = jax.process_index() == 0
    self.logdir = os.fspath(logdir)
    self._tb = None
    self._jsonl = None
    self._remote = not _appendable(self.logdir)
    self._lines: list[str] = []  # remote: the whole JSON-lines file
    self._uploaded = 0.0
    self._dirty = False
    self._remote_flush_secs = remote_flush_secs
    if not self.active:
      return
    files.makedirs(self.logdir)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

    suffix = f".{os.getpid()}.{os.urandom(4).hex()}" + (f".{job}" if job else "")
    self._tb = SummaryWriter(self.logdir, filename_suffix=suffix)
    self._jsonl_path = files.join(self.logdir, f"metrics.{job}.jsonl" if job else "metrics.jsonl")
    if self._remote:
      if files.exists(self._jsonl_path):
        self._lines = files.read_text(self._jsonl_path).splitlines(keepends=True)
        if self._lines and not self._lines[-1].endswith("\n"):
          self._lines[-1] += "\n"
      self._uploaded = time.monotonic()
    else:
      self._jsonl = open(self._jsonl_path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    """Each ``tag: value`` at ``step``, and one JSON line ``{"step": step, tag: value, …}``."""
    if not self.active:
      return
    for k, v in scalars.items():
      self._events().add_scalar(k, float(v), int(step))
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
    if self._remote:
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._uploaded >= self._remote_flush_secs:
        self._upload_jsonl()
    else:
      with self._full_disk_said(f"a line of {self._jsonl_path}"):
        self._jsonl.write(line)
        self._jsonl.flush()

  def _events(self):
    """tensorboardX's writer, once its thread that writes the event file is known to run. When a
    write fails there (a full disk) the thread ends, the queue it drains fills up and the next
    events (and the process's exit) would wait forever; the failure is raised here instead, by
    flushing in this thread.

    Raises:
      DiskFullError: the disk is full.
    """
    events = self._tb.file_writer.event_writer
    worker = getattr(events, "_worker", None)  # tensorboardX 2.x: the thread (not public)
    if worker is not None and not worker.is_alive():
      queue = getattr(events, "_event_queue", None)
      if queue is not None:  # nothing reads it any more: the process exits without its events
        queue.cancel_join_thread()
      with self._full_disk_said(f"the TensorBoard events in {self.logdir}"):
        events.flush()
      raise RuntimeError(f"the thread that writes the TensorBoard events in {self.logdir} ended")
    return self._tb

  @contextlib.contextmanager
  def _full_disk_said(self, what: str):
    """A full disk in the block is raised as a :class:`DiskFullError` that says ``what`` could not
    be written."""
    try:
      yield
    except OSError as e:
      if errors.disk_full(e) is None:
        raise
      raise errors.DiskFullError(
        e.errno,
        f"the disk is full: {what} could not be written (what was written before is "
        f"kept); free space on the disk that holds {self.logdir} and re-run the same command (a "
        f"training command resumes from its last complete checkpoint)",
      ) from e

  def write_images(self, step: int, images: Mapping[str, Any]):
    """Each ``tag: image`` at ``step``: uint8 ``[H, W]`` (grey), ``[H, W, 1|3|4]`` or a PIL image.

    Raises:
      ValueError: an image is not uint8 or has another shape.
    """
    if not self.active:
      return
    for tag, image in images.items():
      x, fmt = _image_array(tag, image)
      self._events().add_image(tag, x, int(step), dataformats=fmt)

  def write_hparams(self, hparams: Mapping[str, Any], metrics: Iterable[str] = ()):
    """The run's hyper-parameters (a flat ``{name: value}``; see :func:`flatten`) for the hparams
    plugin, with ``metrics``: the scalar tags (written by :meth:`write_scalars`, here or by another
    job in the same ``logdir``) that its table shows next to them. Lists and other values are
    shown as JSON text; ``None`` values are left out.
    """
    if not self.active:
      return
    from tensorboardX.summary import hparams as hparams_summaries

    values = {k: _hparam_value(v) for k, v in hparams.items() if v is not None}
    experiment, session_start, _ = hparams_summaries(values, {m: 0.0 for m in metrics})
    # Both in this run's own event file (tensorboardX's add_hparams would make a sub-run): the
    # plugin reads the metric tags from the run that holds the session.
    self._events().file_writer.add_summary(experiment)
    self._events().file_writer.add_summary(session_start)

  def _upload_jsonl(self):
    files.write_text(self._jsonl_path, "".join(self._lines))
    self._uploaded = time.monotonic()
    self._dirty = False

  def flush(self):
    """Writes out what is buffered (event files, and a remote JSON-lines file)."""
    if not self.active or self._tb is None:
      return
    with self._full_disk_said(f"the TensorBoard events in {self.logdir}"):
      self._tb.flush()
    if self._remote and self._dirty:
      self._upload_jsonl()

  def close(self):
    if not self.active or self._tb is None:
      return
    self.flush()
    self._tb.close()
    self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
