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
_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache, so that a re-run or a resume compiles "
    "nothing it compiled before; 'none' turns it off. Default: $TREE_DIFFUSION_COMPILATION_CACHE, "
    "else $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/tree_diffusion/jax (~/.cache/…).")


def compilation_cache_dir(default_on: bool = True) -> str | None:
  """The persistent compilation cache directory of this run (None: off)."""
  d = _CACHE.value
  if d is None:
    if not default_on:
      return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = (os.environ.get("TREE_DIFFUSION_COMPILATION_CACHE")
         or os.environ.get("JAX_COMPILATION_CACHE_DIR")
         or os.path.join(base, "tree_diffusion", "jax"))
  return None if d.strip().lower() in ("", "none", "off") else os.path.abspath(d)


def _use_compilation_cache(default_on: bool):
  import jax  # pylint: disable=g-import-not-at-top
  d = compilation_cache_dir(default_on)
  if d is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  try:
    os.makedirs(d, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache %s cannot be created (%s): compiling without it", d, e)
    return
  jax.config.update("jax_compilation_cache_dir", d)
  # Every program: a tree change brings a dozen step programs of 20-60 s each on a CPU, and the
  # small ones (samplers, metrics) add up; an entry is written once.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("compilation cache: %s (--compilation_cache=none turns it off)", d)


def setup(compilation_cache: bool = True):
  """``compilation_cache``: use the persistent cache unless ``--compilation_cache=none`` (False:
  only when the flag names a directory, as the benchmark does to time real compiles)."""
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
  _use_compilation_cache(compilation_cache)
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
