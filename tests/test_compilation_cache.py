"""Where the launchers keep JAX's persistent compilation cache (launch/common.py)."""

import os

import pytest
from absl import flags
from absl.testing import flagsaver

from launch import common


@pytest.fixture(autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def test_cache_directory_from_flag_environment_or_default(monkeypatch, tmp_path):
  for var in ("TREE_DIFFUSION_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert common.compilation_cache_dir() == str(tmp_path / "xdg" / "tree_diffusion" / "jax")
  assert common.compilation_cache_dir(default_on=False) is None  # the benchmark's default
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert common.compilation_cache_dir() == str(tmp_path / "jax")
  monkeypatch.setenv("TREE_DIFFUSION_COMPILATION_CACHE", str(tmp_path / "ours"))
  assert common.compilation_cache_dir() == str(tmp_path / "ours")
  with flagsaver.flagsaver(compilation_cache=str(tmp_path / "flag")):
    assert common.compilation_cache_dir() == str(tmp_path / "flag")
    assert common.compilation_cache_dir(default_on=False) == str(tmp_path / "flag")
  for off in ("none", "None", "off", ""):
    with flagsaver.flagsaver(compilation_cache=off):
      assert common.compilation_cache_dir() is None
  monkeypatch.setenv("TREE_DIFFUSION_COMPILATION_CACHE", "none")
  assert common.compilation_cache_dir() is None
  with flagsaver.flagsaver(compilation_cache="relative/dir"):
    assert common.compilation_cache_dir() == os.path.abspath("relative/dir")
