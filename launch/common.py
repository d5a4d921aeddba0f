"""What every launcher does: hide accelerators from TensorFlow, log the topology, turn expected
user errors into one-line messages (exit code 1) instead of tracebacks."""

import sys

from absl import app, flags, logging


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
  from tree_diffusion import checkpoint, data, errors  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import inception  # pylint: disable=g-import-not-at-top
  return (data.DataError, checkpoint.CheckpointError, errors.ConfigError, PermissionError,
          FileNotFoundError, inception.InceptionWeightsError)


def _one_line(e: BaseException) -> str:
  # Some errors carry the repr of a multi-line message (escaped newlines and quotes).
  msg = str(e).replace("\\n", " ").replace("\\'", "'")
  return " ".join(msg.split())


def _parse_flags(argv):
  """absl's flag parsing, with a mistyped or ill-typed ``--config.x=…`` as a one-line error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_one_line(e)} (see --help)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: bad --config override: {_one_line(e)}")


def run(main):
  """``absl.app.run(main)`` with expected errors reported as ``error: …`` on one line."""
  def wrapped(argv):
    try:
      return main(argv)
    except _user_errors() as e:
      logging.error("%s", e)
      sys.exit(f"error: {_one_line(e)}")
  app.run(wrapped, flags_parser=_parse_flags)
