"""The config files' arguments (``--config=configs/NAME.py:ARG``): each file accepts only the names
it declares, and anything else is an error that names the closest valid one."""

import glob
import importlib
import os

import pytest

from tree_diffusion.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dataset configs (configs/run.py reads a run's recorded config: tests/test_run_config.py).
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("common.py", "__init__.py", "run.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_known_arguments_are_accepted(name):
  get_config = importlib.import_module(f"configs.{name}").get_config
  full, tiny = get_config(), get_config("tiny")
  assert get_config("") == full and get_config(" tiny, ") == tiny
  assert tiny.stage1.batch_size < full.stage1.batch_size


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg,match", [
    ("tni", rf"unknown config argument 'tni' for configs/NAME\.py \(did you mean 'tiny'\?\); "
            r"valid: tiny$"),
    ("tiny,smal", r"unknown config argument 'smal' for configs/NAME\.py; valid: tiny$"),
    ("tiny,seed=3", r"unknown config argument 'seed=3' for configs/NAME\.py; valid: tiny; "
                    r"set a value with --config\.KEY=3 \(keys named 'seed': classifier\.seed, "
                    r"data\.seed, diffusion\.seed, diffusion\.sampling\.seed, eval\.seed, "
                    r"stage1\.seed\)"),
    ("tiny=1", r"config argument 'tiny' of configs/NAME\.py takes no value, got 'tiny=1'"),
], ids=["typo", "unknown", "key_value", "flag_with_value"])
def test_unknown_arguments_are_refused(name, arg, match):
  get_config = importlib.import_module(f"configs.{name}").get_config
  with pytest.raises(ConfigError, match=match.replace("NAME", name)):
    get_config(arg)


@pytest.mark.parametrize("section", ["diffusion", "classifier"])
def test_a_section_that_trains_for_nothing_is_refused(section):
  from configs import common
  from tree_diffusion import validation
  c = common.base()
  c[section].num_steps, c[section].num_epochs = 0, 0
  check = validation.check_stage2 if section == "diffusion" else validation.check_classifier
  with pytest.raises(ConfigError, match=f"config.{section}.num_steps and num_epochs are both 0"):
    check(c)
  c[section].num_epochs = 1
  check(c)
