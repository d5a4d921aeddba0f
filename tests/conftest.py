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


# Files whose tests compile the most (about 30 s to 2 min each on 2 cores), run right after the
# slow ones: with whole files handed to two workers in this order (--dist loadfile
# --no-loadscope-reorder in setup.cfg), the quick files left for the end let both workers finish
# together.
_HEAVY_FILES = ("test_model.py", "test_diffusion.py", "test_errors.py", "test_checkpoint.py",
                "test_precision.py", "test_likelihood.py", "test_classifier.py",
                "test_inception.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first, so that with two workers they overlap the rest of the suite
  instead of running last on their own; then the heavy files; then the rest."""
  del config

  def rank(item):
    if item.get_closest_marker("slow") is not None:   # the end-to-end test first of all
      return (0, item.path.name != "test_launch.py")
    return (1 if item.path.name in _HEAVY_FILES else 2, False)

  items.sort(key=rank)
