"""Config checks that run before any data is read or anything is compiled.

:func:`check_types` compares a config with a reference one (the launchers pass
``configs.common.base()``): an unknown key or a value of the wrong type is reported with its dotted
name. :func:`check_stage1` and :func:`check_stage2` check the ranges and choices of the settings a
stage uses, :func:`check_eval` and :func:`check_classifier` those of evaluation and the purity
classifier (the sampler's: ``diffusion.sampler.check_config``). Every problem is a :class:`ConfigError` whose
one-line message names the setting.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Callable

from tree_diffusion.errors import ConfigError

_DTYPES = ("float32", "bfloat16")


def check_types(config, reference) -> None:
  """Every key of ``config`` exists in ``reference`` with a value of the same kind (an int is
  accepted for a float, any sequence for a sequence).

  Raises:
    ConfigError: the first unknown key or ill-typed value (dotted name, both types, the fix).
  """
  _walk(_as_dict(config), _as_dict(reference), "")


def _as_dict(c) -> Any:
  return c.to_dict() if hasattr(c, "to_dict") else c


def _kind(v) -> str:
  if isinstance(v, bool):
    return "bool"
  if isinstance(v, numbers.Integral):
    return "int"
  if isinstance(v, numbers.Real):
    return "float"
  if isinstance(v, str):
    return "str"
  if isinstance(v, (list, tuple)):
    return "sequence"
  if isinstance(v, dict):
    return "section"
  return type(v).__name__


def _walk(value: dict, reference: dict, prefix: str):
  for key, v in value.items():
    name = f"{prefix}{key}"
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference), n=3)
      hint = f" (did you mean {' or '.join(close)}?)" if close else ""
      raise ConfigError(f"unknown config key {name!r}{hint}")
    ref = reference[key]
    got, want = _kind(v), _kind(ref)
    if want == "section":
      if got != "section":
        raise ConfigError(f"config.{name} must be a section, got {v!r}")
      _walk(v, ref, name + ".")
      continue
    if got != want and not (got == "int" and want == "float") and ref is not None:
      raise ConfigError(
        f"config.{name} must be {want} (like {ref!r}), got {got} {v!r}; set --config.{name}=…"
      )


def _get(config, name: str):
  v = config
  for k in name.split("."):
    v = v[k]
  return v


def check_rules(config, rules: dict[str, tuple[Callable[[Any], bool], str]]):
  """Each ``{dotted name: (predicate, what it must be)}`` of ``rules`` holds for ``config``."""
  for name, (ok, what) in rules.items():
    try:
      v = _get(config, name)
    except (KeyError, AttributeError):
      raise ConfigError(f"config has no {name!r}; start from a file in configs/") from None
    if not ok(v):
      raise ConfigError(f"config.{name} must be {what}, got {v!r}; set --config.{name}=…")


positive = (lambda v: v > 0, "> 0")
non_negative = (lambda v: v >= 0, ">= 0")
probability = (lambda v: 0 <= v <= 1, "in [0, 1]")
unit_open = (lambda v: 0 <= v < 1, "in [0, 1)")
dtype = (lambda v: v in _DTYPES, f"one of {_DTYPES}")


def check_data(config) -> None:
  check_rules(
    config,
    {
      "data.image_size": positive,
      # 0: from the images; the launchers set it to 1 or 3 before anything uses it.
      "data.channels": (lambda v: v in (0, 1, 3), "1 or 3 (or 0: from the images)"),
      "data.test_fraction": unit_open,
      "data.seed": non_negative,
    },
  )


def check_stage1(config) -> None:
  """Ranges of ``data`` and ``stage1`` (the TreeVAE's own checks run when it is built)."""
  check_data(config)
  s = "stage1."
  check_rules(
    config,
    {
      s + "batch_size": positive,
      s + "eval_batch_size": positive,
      s + "lr": positive,
      s + "weight_decay": non_negative,
      s + "decay_lr": positive,
      s + "decay_stepsize": positive,
      s + "num_epochs": non_negative,
      s + "num_epochs_smalltree": non_negative,
      s + "num_epochs_intermediate_fulltrain": non_negative,
      s + "num_epochs_finetuning": non_negative,
      s + "kl_start": non_negative,
      s + "decay_kl": non_negative,
      s + "initial_depth": positive,
      s + "num_clusters_tree": (lambda v: v >= 2, ">= 2"),
      s + "max_growth_iterations": non_negative,
      s + "log_every_epochs": non_negative,
      s + "eval_every_epochs": non_negative,
      s + "checkpoints_to_keep": positive,
      s + "checkpoint_every_steps": non_negative,
      s + "seed": non_negative,
      s + "dtype": dtype,
    },
  )
  if config.stage1.augment and config.stage1.batch_size % 2:
    raise ConfigError(
      f"config.stage1.batch_size must be even with augment=True (two views of "
      f"batch_size/2 images), got {config.stage1.batch_size}"
    )


def check_stage2(config) -> None:
  """Ranges of ``data`` and ``diffusion``."""
  check_data(config)
  d = "diffusion."
  check_rules(
    config,
    {
      d + "T": positive,
      d + "beta_1": (lambda v: 0 < v < 1, "in (0, 1)"),
      d + "beta_T": (lambda v: 0 < v < 1, "in (0, 1)"),
      d + "lr": positive,
      d + "warmup_steps": non_negative,
      d + "grad_clip": positive,
      d + "ema_decay": unit_open,
      d + "cfg_drop_rate": unit_open,
      d + "seed": non_negative,
      d + "batch_size": positive,
      d + "num_epochs": non_negative,
      d + "num_steps": non_negative,
      d + "log_every_steps": positive,
      d + "checkpoint_every_steps": positive,
      d + "checkpoints_to_keep": positive,
      d + "sample_every": non_negative,
      d + "dtype": dtype,
    },
  )
  if config.diffusion.beta_1 > config.diffusion.beta_T:
    raise ConfigError(
      f"config.diffusion.beta_1 ({config.diffusion.beta_1}) must be <= beta_T "
      f"({config.diffusion.beta_T})"
    )
  _check_some_training(config, "diffusion")


def check_eval(config) -> None:
  """Ranges of ``eval`` (launch/evaluate.py) and of the sampling settings it uses."""
  e = "eval."
  check_rules(
    config,
    {
      e + "batch_size": positive,
      e + "num_samples": positive,
      e + "recons_num": non_negative,
      e + "purity_samples": positive,
      e + "fid_batch_size": positive,
      e + "ll_samples": positive,
      e + "ll_batch_size": positive,
      e + "grid_images": positive,
      e + "seed": non_negative,
    },
  )
  for key, choices in (
    ("quantize", ("round", "floor")),
    ("treevae_leaf", ("draw", "argmax")),
    ("treevae_pixels", ("clip", "wrap")),
  ):
    value = config.eval.get(key, choices[0])
    if value not in choices:
      raise ConfigError(
        f"config.eval.{key} must be one of {', '.join(choices)}, got {value!r}; set "
        f"--config.eval.{key}={choices[0]} (ours) or {choices[1]} (the reference's)"
      )
  if config.eval.fid and config.eval.num_samples < 2:
    raise ConfigError(
      f"config.eval.num_samples must be >= 2 for FID, got "
      f"{config.eval.num_samples}; set --config.eval.num_samples=… or "
      f"--config.eval.fid=False"
    )
  check_classifier(config)


def check_classifier(config) -> None:
  """Ranges of ``classifier`` (the purity classifier; its own checks run when it is built)."""
  c = "classifier."
  check_rules(
    config,
    {
      c + "width": positive,
      c + "lr": positive,
      c + "batch_size": positive,
      c + "num_epochs": non_negative,
      c + "num_steps": non_negative,
      c + "seed": non_negative,
      c + "eval_batch_size": positive,
      c + "log_every_steps": non_negative,
      c + "eval_every_epochs": non_negative,
      c + "thresholds": (
        lambda v: len(v) > 0 and all(0 < t <= 1 for t in v),
        "a non-empty list of probabilities in (0, 1]",
      ),
    },
  )
  _check_some_training(config, "classifier")


def _check_some_training(config, section: str) -> None:
  """A section with ``num_steps`` (> 0 overrides) and ``num_epochs`` must train for something."""
  if config[section].num_steps == 0 and config[section].num_epochs == 0:
    raise ConfigError(f"config.{section}.num_steps and num_epochs are both 0: set one of them")
