"""What every launcher does: hide accelerators from TensorFlow, log the topology, turn expected
user errors into one-line messages (exit code 1) instead of tracebacks."""

import sys

from absl import app, logging


def setup():
  try:  # TensorFlow (only present to prepare tfds data) must not grab GPU memory.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)


def _user_errors():
  from tree_diffusion import checkpoint, data  # pylint: disable=g-import-not-at-top
  return (data.DataError, checkpoint.CheckpointError, PermissionError, FileNotFoundError)


def run(main):
  """``absl.app.run(main)`` with expected errors reported as ``error: …`` on one line."""
  def wrapped(argv):
    try:
      return main(argv)
    except _user_errors() as e:
      logging.error("%s", e)
      sys.exit(f"error: {e}")
  app.run(wrapped)
