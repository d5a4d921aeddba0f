"""Test settings: CPU only, fast compiles (numerics are unaffected), no network."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's most expensive optimisations are skipped: compiles dominate the suite on 2 cores.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir-for-tests")
# A persistent compilation cache for this session, inherited by the launchers the end-to-end tests
# run as subprocesses: a resumed run or a second launcher reuses the executables of the first.
# With pytest-xdist the workers inherit the directory of the controller, which removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="tree_diffusion_test_jax_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first, so that with two workers they overlap the rest of the suite
  instead of running last on their own."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
