"""Test settings: CPU only, fast compiles (numerics are unaffected), no network."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's most expensive optimisations are skipped: compiles dominate the suite on 2 cores.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir-for-tests")
