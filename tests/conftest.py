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
_HEAVY_FILES = (
  "test_model.py",
  "test_diffusion.py",
  "test_errors.py",
  "test_checkpoint.py",
  "test_precision.py",
  "test_likelihood.py",
  "test_classifier.py",
  "test_inception.py",
  "test_reliability.py",
)


# The files of the slow tests, longest first (about 170-240 s down to 20 s on 2 cores): the two
# longest start at once, one on each worker, and the shorter ones fill in around them.
_SLOW_FILES = (
  "test_gcs.py",
  "test_launch.py",
  "test_multihost.py",
  "test_run_config.py",
  "test_tensorboard.py",
  "test_full_disk.py",
  "test_multidevice.py",
)


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first, so that with two workers they overlap the rest of the suite
  instead of running last on their own; then the heavy files; then the rest."""
  del config

  def rank(item):
    name = item.path.name
    if item.get_closest_marker("slow") is not None:  # the end-to-end tests first of all
      return (0, _SLOW_FILES.index(name) if name in _SLOW_FILES else len(_SLOW_FILES))
    return (1 if name in _HEAVY_FILES else 2, 0)

  items.sort(key=rank)
