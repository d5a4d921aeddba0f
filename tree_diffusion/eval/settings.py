"""What an evaluation computes (``config.eval`` as :class:`Settings`) and which stage-2
checkpoints it evaluates (:func:`select_steps`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

from tree_diffusion import validation
from tree_diffusion.diffusion.sampler import check_config as check_sampler_config
from tree_diffusion.errors import ConfigError
from tree_diffusion.eval import metrics as metrics_lib

STAGE2_MODES = ("sample", "recons", "sample_all_leaves", "recons_all_leaves")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an evaluation computes (``config.eval``); part of the key that decides re-evaluation."""

  modes: tuple[str, ...] = ("sample", "recons", "sample_all_leaves")
  num_samples: int = 10000
  recons_num: int = 0
  purity_samples: int = 1000
  fid: bool = True
  fid_batch_size: int = 50
  inception_weights: str = ""
  ll_samples: int = 1000
  ll_batch_size: int = 100
  batch_size: int = 500
  train_classifier: bool = True
  grid_images: int = 64
  seed: int = 0
  metrics: tuple[str, ...] = metrics_lib.DEFAULT
  quantize: str = "round"
  treevae_leaf: str = "draw"
  treevae_pixels: str = "clip"

  @classmethod
  def from_config(cls, config, modes: Sequence[str] | None = None) -> "Settings":
    e = config.eval
    fields = {f.name: e[f.name] for f in dataclasses.fields(cls) if f.name in e}
    fields["modes"] = tuple(modes if modes is not None else fields.get("modes", cls.modes))
    fields["metrics"] = tuple(fields.get("metrics", cls.metrics))
    validation.check_eval(config)  # the ranges of config.eval and of the classifier
    check_sampler_config(config)
    s = cls(**fields)
    s.validate()
    return s

  def validate(self):
    bad = [m for m in self.modes if m not in STAGE2_MODES]
    if bad:
      raise ConfigError(
        f"unknown mode(s) {', '.join(bad)}; use --modes with some of {','.join(STAGE2_MODES)}"
      )
    metrics_lib.load(self.metrics)  # each name is a metric module

  def key(self) -> str:
    d = dataclasses.asdict(self)
    d.pop("inception_weights")
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def select_steps(available: Sequence[int], spec: str) -> list[int]:
  """``all`` | ``latest`` | ``none`` | comma-separated steps → the steps to evaluate.

  Raises:
    ConfigError: a requested step is not among ``available``, or nothing is available.
  """
  available = sorted(int(s) for s in available)
  spec = (spec or "all").strip().lower()
  if spec == "none":
    return []
  if not available:
    raise ConfigError("no stage-2 checkpoints")
  if spec == "all":
    return available
  if spec == "latest":
    return available[-1:]
  try:
    steps = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(
      f"--checkpoints={spec!r}: use all, latest, none or comma-separated steps (have {available})"
    ) from None
  missing = [s for s in steps if s not in available]
  if missing:
    raise ConfigError(f"no stage-2 checkpoint(s) {missing}; have {available}")
  return steps
