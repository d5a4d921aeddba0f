"""What every launcher does: join the other processes of a multi-host job, hide accelerators from
TensorFlow, log the topology, check the config, turn expected user errors into one-line messages
(exit code 1) instead of tracebacks, and turn a graceful stop (SIGTERM, Ctrl-C) into exit code 0
with the command that resumes."""

import os
import shlex
import sys

from absl import app, flags, logging

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host run: call jax.distributed.initialize() before anything else. On Cloud TPU pods, "
    "SLURM and other clusters JAX finds its peers itself; elsewhere pass the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def setup():
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    # CPU processes (tests, debugging) need a collectives backend; GPUs and TPUs have their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:  # TensorFlow (only present to prepare tfds data) must not grab GPU memory.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("process %d/%d, %d devices (%d local, %s)", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].platform)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)   # one process reports progress


def check_config(config):
  """Unknown keys and ill-typed values of a config file, against ``configs/common.py``'s base."""
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from tree_diffusion import validation  # pylint: disable=g-import-not-at-top
  validation.check_types(config, config_common.base())


def _user_errors():
  from tree_diffusion import checkpoint, data, errors  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import inception  # pylint: disable=g-import-not-at-top
  return (data.DataError, checkpoint.CheckpointError, errors.ConfigError, PermissionError,
          FileNotFoundError, inception.InceptionWeightsError, errors.TrainingDivergedError)


def resume_command() -> str:
  return " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(sys.argv[0])]
                  + sys.argv[1:])


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
    msg = _one_line(e)
    while len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":   # str(KeyError) quotes
      msg = msg[1:-1]
    sys.exit(f"error: bad --config override: {msg}")


def run(main):
  """``absl.app.run(main)`` with expected errors reported as ``error: …`` on one line, and a
  graceful stop (:class:`preemption.Preempted`) as exit code 0 with the command that resumes."""
  def wrapped(argv):
    from tree_diffusion import preemption  # pylint: disable=g-import-not-at-top
    try:
      return main(argv)
    except preemption.Preempted as e:
      logging.warning("%s. Resume with the same command: %s", e, resume_command())
      sys.exit(0)
    except _user_errors() as e:
      logging.error("%s", e)
      sys.exit(f"error: {_one_line(e)}")
  app.run(wrapped, flags_parser=_parse_flags)
