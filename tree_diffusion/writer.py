"""Metric writer: TensorBoard scalars (via tensorboardX, no TensorFlow) plus a JSON-lines log."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax


class MetricWriter:
  """Writes scalars to ``logdir`` (TensorBoard events and ``metrics.jsonl``); no-op off process 0."""

  def __init__(self, logdir: str):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(logdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if not self.active:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
                      + "\n")
    self._jsonl.flush()

  def close(self):
    if self.active:
      self._tb.close()
      self._jsonl.close()
