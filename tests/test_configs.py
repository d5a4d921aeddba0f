"""The config files' arguments (``--config=configs/NAME.py:ARG``): each file accepts only the names
it declares, and anything else is an error that names the closest valid one."""

import glob
import importlib
import os

import pytest

from tree_diffusion.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dataset configs (configs/run.py reads a run's recorded config: tests/test_run_config.py).
CONFIGS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if not p.endswith(("common.py", "__init__.py", "run.py"))
)


@pytest.mark.parametrize("name", CONFIGS)
def test_known_arguments_are_accepted(name):
  get_config = importlib.import_module(f"configs.{name}").get_config
  full, tiny = get_config(), get_config("tiny")
  assert get_config("") == full and get_config(" tiny, ") == tiny
  assert tiny.stage1.batch_size < full.stage1.batch_size


# What ":reference" switches back to the reference implementation's behaviour (the README's table
# "Where we differ from the reference"), key by key, and what the defaults are otherwise.
REFERENCE = {
  "diffusion.conditioning": "image+path",
  "diffusion.shuffle": False,
  "diffusion.sampling.all_leaves_from_treevae": True,
  "eval.quantize": "floor",
  "eval.treevae_leaf": "argmax",
  "eval.treevae_pixels": "wrap",
}
OURS = {
  "diffusion.shuffle": True,
  "diffusion.sampling.all_leaves_from_treevae": False,
  "eval.quantize": "round",
  "eval.treevae_leaf": "draw",
  "eval.treevae_pixels": "clip",
}


def _get(config, dotted):
  for key in dotted.split("."):
    config = config[key]
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_the_reference_argument_restores_every_switchable_behaviour(name):
  get_config = importlib.import_module(f"configs.{name}").get_config
  full, ref, both = get_config(), get_config("reference"), get_config("tiny,reference")
  assert {k: _get(full, k) for k in OURS} == OURS
  assert {k: _get(ref, k) for k in REFERENCE} == REFERENCE
  assert {k: _get(both, k) for k in REFERENCE} == REFERENCE
  assert both.stage1.batch_size == get_config("tiny").stage1.batch_size
  epochs = (ref.stage1.num_epochs, ref.stage1.num_epochs_smalltree)
  ours = (full.stage1.num_epochs, full.stage1.num_epochs_smalltree)
  assert epochs == ((1, 1) if name == "cubicc" else ours)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
  "arg,match",
  [
    (
      "tni",
      r"unknown config argument 'tni' for configs/NAME\.py \(did you mean 'tiny'\?\); "
      r"valid: tiny, reference$",
    ),
    ("tiny,smal", r"unknown config argument 'smal' for configs/NAME\.py; valid: tiny, reference$"),
    (
      "tiny,seed=3",
      r"unknown config argument 'seed=3' for configs/NAME\.py; valid: tiny, reference; "
      r"set a value with --config\.KEY=3 \(keys named 'seed': classifier\.seed, "
      r"data\.seed, diffusion\.seed, diffusion\.sampling\.seed, eval\.seed, "
      r"stage1\.seed\)",
    ),
    ("tiny=1", r"config argument 'tiny' of configs/NAME\.py takes no value, got 'tiny=1'"),
  ],
  ids=["typo", "unknown", "key_value", "flag_with_value"],
)
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


def _sequences(c, prefix=""):
  """``{dotted key: value}`` of every list- or tuple-valued key of the ConfigDict ``c``."""
  out = {}
  for k, v in c.items():
    if hasattr(v, "items"):
      out.update(_sequences(v, f"{prefix}{k}."))
    elif isinstance(v, (list, tuple)):
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_every_sequence_key_takes_the_documented_override_forms(name):
  """``--config.KEY=4,4``, ``"(4, 4)"`` and ``"[4, 4]"`` give a tuple of the default's element
  type for every sequence of every config file; ml_collections overrides only tuple fields."""
  from configs import common

  get_config = importlib.import_module(f"configs.{name}").get_config
  found = {**_sequences(get_config()), **_sequences(get_config("tiny"))}
  assert {
    "treevae.latent_channels",
    "diffusion.unet.ch_mults",
    "eval.modes",
    "classifier.thresholds",
  } <= set(found)
  assert [k for k, v in found.items() if not isinstance(v, tuple)] == []
  for key, value in found.items():
    texts = [
      ",".join(map(str, value)),
      f"({', '.join(map(repr, value))})",
      f"[{', '.join(map(str, value))}]",
    ]
    for text in texts:
      got = common.sequence_override(key, text)
      assert got == value and [type(x) for x in got] == [type(x) for x in value], (key, text)
  assert common.sequence_override("treevae.latent_channels", " (4,) ") == (4,)
  assert common.sequence_override("treevae.latent_channels", "4") == (4,)
  assert common.sequence_override("classifier.thresholds", "1,0.5") == (1.0, 0.5)
  assert common.sequence_override("eval.modes", "sample,'recons'") == ("sample", "recons")
  assert common.sequence_override("diffusion.unet.attn_resolutions", "()") == ()
  assert common.sequence_override("diffusion.unet.ch", "4") is None  # not a sequence
  assert common.sequence_override("treevae.nope", "4") is None  # left to ml_collections


@pytest.mark.parametrize(
  "key,text,match",
  [
    (
      "treevae.latent_channels",
      "(4, x)",
      r"'x' is not an int; pass ints separated by commas, "
      r"e\.g\. --config\.treevae\.latent_channels=16,16,16,16,16,16,16 \(or in quotes "
      r"\"\(16, 16, 16, 16, 16, 16, 16\)\"\)$",
    ),
    ("treevae.latent_channels", "4.5,4", r"'4\.5' is not an int"),
    ("treevae.latent_channels", "(4, 4", r"unbalanced brackets; pass ints"),
    ("classifier.thresholds", "0.5,nan", r"'nan' is not a finite number; pass numbers"),
    (
      "eval.modes",
      "sample,,recons",
      r"'' is not a name; pass names separated by commas, e\.g\. "
      r"--config\.eval\.modes=sample,recons,sample_all_leaves",
    ),
  ],
)
def test_a_malformed_sequence_override_names_the_key_and_a_working_form(key, text, match):
  from configs import common

  with pytest.raises(ConfigError, match=rf"^--config\.{key.replace('.', '[.]')}="):
    common.sequence_override(key, text)
  with pytest.raises(ConfigError, match=match):
    common.sequence_override(key, text)
