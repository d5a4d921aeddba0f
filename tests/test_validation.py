"""Config checks that run before any heavy work: unknown keys, types, ranges."""

import glob
import importlib
import os

import pytest

from configs import common, demo
from tree_diffusion import validation
from tree_diffusion.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "name",
  sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith(("common.py", "__init__.py", "run.py"))
  ),
)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_shipped_config_passes(name, arg):
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  validation.check_types(c, common.base())
  validation.check_stage1(c)
  validation.check_stage2(c)


def _unlocked_tiny():
  c = demo.get_config("tiny")
  c.unlock()
  return c


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda c: setattr(c.stage1, "num_epocs", 3),
      r"unknown config key 'stage1.num_epocs' \(did you mean num_epochs",
    ),
    (lambda c: setattr(c, "stage3", {}), "unknown config key 'stage3'"),
    (lambda c: c.stage1.__setitem__("lr", "big"), None),  # ConfigDict refuses this itself
    (lambda c: c.diffusion.unet.__setitem__("ch_mults", 2), None),
  ],
)
def test_unknown_keys_and_wrong_types(edit, match):
  c = _unlocked_tiny()
  try:
    edit(c)
  except TypeError:
    assert match is None  # ml_collections' own type check caught it first
    return
  with pytest.raises(ConfigError, match=match or "must be"):
    validation.check_types(c, common.base())


def test_a_file_that_sets_a_wrong_type_is_named():
  c = common.base()
  c.unlock()
  del c.stage1["batch_size"]
  c.stage1.batch_size = "128"  # as a config file could, replacing the field
  with pytest.raises(
    ConfigError,
    match=r"config.stage1.batch_size must be int \(like 256\), "
    r"got str '128'",
  ):
    validation.check_types(c, common.base())


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("stage1.batch_size", 0, r"config.stage1.batch_size must be > 0, got 0"),
    ("stage1.lr", -1e-3, r"config.stage1.lr must be > 0"),
    ("stage1.dtype", "float16", r"config.stage1.dtype must be one of \('float32', 'bfloat16'\)"),
    ("stage1.num_clusters_tree", 1, r"num_clusters_tree must be >= 2"),
    ("data.channels", 2, r"config.data.channels must be 1 or 3"),
    ("diffusion.ema_decay", 1.0, r"config.diffusion.ema_decay must be in \[0, 1\)"),
    ("diffusion.beta_T", 1e-5, r"beta_1 \(0.0001\) must be <= beta_T"),
    ("diffusion.sample_every", -1, r"config.diffusion.sample_every must be >= 0, got -1"),
  ],
)
def test_ranges(key, value, match):
  c = demo.get_config("tiny")
  section, field = key.split(".")
  c[section][field] = value
  with pytest.raises(ConfigError, match=match):
    validation.check_stage1(c)
    validation.check_stage2(c)
