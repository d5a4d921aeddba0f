"""What every launcher does: join the other processes of a multi-host job, hide accelerators from
TensorFlow, log the topology, check the config, turn expected user errors (a bad flag, a config
file that cannot be loaded, a run directory that is missing or cannot be written) into one-line
messages (exit code 1) instead of tracebacks, and turn a graceful stop (SIGTERM, Ctrl-C) into exit
code 0 with the command that resumes."""

import glob
import json
import os
import shlex
import sys
import traceback

from absl import app, flags, logging

_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-host run: call jax.distributed.initialize() before anything else. On Cloud TPU pods, "
  "SLURM and other clusters JAX finds its peers itself; elsewhere pass the three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (with --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
_TRACEBACK = flags.DEFINE_bool(
  "traceback",
  False,
  "Show the traceback of an expected error (a bad config, missing data, …) "
  "instead of the one-line `error: …` message (for debugging).",
)
_CACHE = flags.DEFINE_string(
  "compilation_cache",
  None,
  "Directory of JAX's persistent compilation cache, so that a re-run or a resume compiles "
  "nothing it compiled before; 'none' turns it off. Default: $TREE_DIFFUSION_COMPILATION_CACHE, "
  "else $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/tree_diffusion/jax (~/.cache/…).",
)


def compilation_cache_dir(default_on: bool = True) -> str | None:
  """The persistent compilation cache directory of this run (None: off)."""
  d = _CACHE.value
  if d is None:
    if not default_on:
      return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = (
      os.environ.get("TREE_DIFFUSION_COMPILATION_CACHE")
      or os.environ.get("JAX_COMPILATION_CACHE_DIR")
      or os.path.join(base, "tree_diffusion", "jax")
    )
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
    try:
      jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
      )
    except (ValueError, RuntimeError) as e:
      from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

      raise ConfigError(
        f"--distributed: jax.distributed.initialize() failed: {_one_line(e).rstrip('.')}; "
        f"outside a cluster that JAX detects itself (Cloud TPU, SLURM, ...) pass "
        f"--coordinator_address=HOST:PORT (of process 0), --num_processes=N and "
        f"--process_id=0..N-1"
      ) from None
    from tree_diffusion import sharding  # pylint: disable=g-import-not-at-top

    sharding.check_processes()  # equal shares of every batch need equal local device counts
  try:  # TensorFlow (only present to prepare tfds data) must not grab GPU memory.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  _use_compilation_cache(compilation_cache)
  import jax  # pylint: disable=g-import-not-at-top

  logging.info(
    "process %d/%d, %d devices (%d local, %s)",
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.local_device_count(),
    jax.devices()[0].platform,
  )
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one process reports progress


def check_config(config):
  """Unknown keys and ill-typed values of a config file, against ``configs/common.py``'s base."""
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from tree_diffusion import validation  # pylint: disable=g-import-not-at-top

  validation.check_types(config, config_common.base())
  _resolve_channels(config)


def _resolve_channels(config):
  """``data.channels=0`` (``configs/folder.py``'s default): the channels the images have, set in
  the config before anything uses it (and so recorded in the run's config.json)."""
  if "data" not in config or config.data.get("channels") != 0:
    return
  from tree_diffusion import data  # pylint: disable=g-import-not-at-top

  channels, notice = data.detect_channels(config.data)
  config.data.channels = channels
  if notice:
    logging.warning("%s", notice)
  else:
    logging.info(
      "data.channels=0: the images are %s, read with %d channel(s)",
      "grey" if channels == 1 else "colour",
      channels,
    )


def refresh_report(workdir: str):
  """Writes ``WORKDIR/report.html`` again at the end of a command (process 0). The command's own
  outputs are written by then, so a page that cannot be made is a warning that names the command
  to make it later, not a failure."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return
  from tree_diffusion import html_report  # pylint: disable=g-import-not-at-top

  try:
    path = html_report.write(workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
      "report.html was not refreshed (%s): run python -m launch.report --workdir=%s",
      _one_line(e),
      workdir,
    )
    return
  print(f"report: {path}")


def check_run_dir(workdir: str, flag: str = "--workdir"):
  """A run directory that a command reads must exist (readers never create one).

  Raises:
    ConfigError: ``workdir`` does not exist or is not a directory, with the fix.
  """
  from tree_diffusion import files  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  files.check_bucket(workdir)  # gs://: a missing bucket or no credentials, said as such
  if not files.is_dir(workdir):
    what = "is not a directory" if files.exists(workdir) else "does not exist"
    raise ConfigError(
      f"run directory {workdir} {what}: pass the {flag} of a run (train it first "
      f"with python -m launch.train_treevae)"
    )


def _user_errors():
  from tree_diffusion import checkpoint, data, errors  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import inception  # pylint: disable=g-import-not-at-top

  return (
    data.DataError,
    checkpoint.CheckpointError,
    errors.ConfigError,
    PermissionError,
    FileNotFoundError,
    inception.InceptionWeightsError,
    errors.TrainingDivergedError,
    errors.WorkdirBusyError,
    errors.StorageError,
    errors.DiskFullError,
  )


def _workdir() -> str | None:
  """The launcher's ``--workdir`` (comma-separated if it takes several), for messages."""
  if "workdir" not in flags.FLAGS:
    return None
  value = flags.FLAGS["workdir"].value
  return ",".join(value) if isinstance(value, list) else value


def _threads_say_a_full_disk_in_one_line():
  """A thread that ends on a full disk (tensorboardX's event writer) logs one warning line, not
  its traceback: the command says it in its error line when it writes next."""
  import threading  # pylint: disable=g-import-not-at-top
  from tree_diffusion import errors  # pylint: disable=g-import-not-at-top

  previous = threading.excepthook

  def hook(args):
    if errors.disk_full(args.exc_value) is None:
      previous(args)
      return
    name = args.thread.name if args.thread is not None else "a thread"
    logging.warning("%s stopped: the disk is full (%s)", name, _one_line(args.exc_value))

  threading.excepthook = hook


def _drop_late_reports():
  """After a full disk was reported: what the writers that failed (Orbax's threads, TensorStore's
  callbacks, their asyncio tasks) still log or raise while the process exits is dropped."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  std_logging.disable(std_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None


def resume_command() -> str:
  return " ".join(
    shlex.quote(a) for a in [sys.executable, os.path.relpath(sys.argv[0])] + sys.argv[1:]
  )


def _one_line(e: BaseException) -> str:
  # Some errors carry the repr of a multi-line message (escaped newlines and quotes).
  msg = str(e).replace("\\n", " ").replace("\\'", "'")
  return " ".join(msg.split())


class ConfigFileError(Exception):
  """A ``--config`` file that cannot be loaded. Not a ``ValueError``: absl's flag parser would
  wrap that into a message that holds the config file's traceback."""


def _config_files() -> str:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(here, "configs", "*.py")))
  return ", ".join(n[:-3] for n in names if n not in ("__init__.py", "common.py", "run.py"))


def _short(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def _where(e: BaseException) -> str:
  """`` (at file:line)``: the innermost frame of ``e``'s traceback outside installed packages."""
  frames = [f for f in traceback.extract_tb(e.__traceback__) if "-packages" not in f.filename]
  return f" (at {_short(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _load_config_file(parse, flag: str, value: str):
  """``parse(value)`` (ml_collections' loader) with every way a config file can fail as one
  :class:`ConfigFileError` that names the file and the fix."""
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  path = value.partition(":")[0]
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ConfigFileError(
      f"--{flag}={value}: config file {path} {what} (relative paths start at {os.getcwd()}); "
      f"pass --{flag}=configs/NAME.py[:tiny] with NAME among {_config_files()}"
    )
  try:
    config = parse(value)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections re-raises a TypeError/ValueError as a new one holding the traceback text.
    if (
      isinstance(e, (TypeError, ValueError))
      and e.__context__ is not None
      and str(e).startswith("Error whilst parsing config file")
    ):
      e = e.__context__
    if isinstance(e, ConfigError):  # the file's own message (e.g. an unknown config argument)
      raise ConfigFileError(f"--{flag}={value}: {_one_line(e)}") from None
    if isinstance(e, SyntaxError):
      raise ConfigFileError(
        f"--{flag}={value}: {_short(e.filename or path)}:{e.lineno}: {e.msg}: fix the config file"
      ) from None
    if isinstance(e, AttributeError) and "get_config" in str(e):
      raise ConfigFileError(
        f"--{flag}={value}: {path} defines no get_config(arg=None): not a "
        f"config file? (use one of configs/: {_config_files()})"
      ) from None
    raise ConfigFileError(
      f"--{flag}={value}: loading {path} failed with {type(e).__name__}: {_one_line(e)}"
      f"{_where(e)}: fix the config file"
    ) from None
  if not isinstance(config, ConfigDict):
    # ml_collections defers an IOError raised while loading until the config is used.
    cause = getattr(config, "_error", None) if config is not None else None
    if isinstance(cause, BaseException):
      raise ConfigFileError(
        f"--{flag}={value}: loading {path} failed with "
        f"{type(cause).__name__}: {_one_line(cause)}{_where(cause)}: fix the "
        f"config file"
      ) from None
    raise ConfigFileError(
      f"--{flag}={value}: get_config() of {path} returned "
      f"{type(config).__name__}, not an ml_collections.ConfigDict: fix the "
      f"config file"
    )
  return config


def _guard_config_files():
  """Routes the loading of every ``DEFINE_config_file`` flag through :func:`_load_config_file`."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top

  for name in list(flags.FLAGS):
    parser = flags.FLAGS[name].parser
    if isinstance(parser, config_flags.ConfigFileFlagParser) and not hasattr(parser, "_guarded"):
      parse = parser.parse
      parser.parse = lambda value, parse=parse, name=name: _load_config_file(parse, name, value)
      parser._guarded = True  # pylint: disable=protected-access


# The config file that reads a run's recorded config (``--config=configs/run.py:WORKDIR``).
RUN_CONFIG_FILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "run.py"
)
_RUN_CONFIG = {"workdir_flag": None, "defaulted": False}


_GLOB_CHARS = set("*?[")


def expand_runs(entries: list[str], flag: str = "--workdir") -> list[str]:
  """``entries`` with each pattern (``*``, ``?``, ``[``) replaced by the directories it matches,
  sorted: ``runs/mnist_seed*`` or ``gs://bucket/mnist_seed*``.

  Raises:
    ConfigError: a pattern matches no directory.
  """
  from tree_diffusion import files  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  out = []
  for entry in entries:
    if not _GLOB_CHARS & set(entry):
      out.append(entry)
      continue
    head, _, pattern = entry.rstrip("/").rpartition("/")
    parent = files.as_path(head or ".")
    found = sorted(str(p) for p in parent.glob(pattern) if p.is_dir()) if parent.is_dir() else []
    if not found:
      raise ConfigError(f"{flag}={entry} matches no directory; check the pattern (quote it)")
    out += [f if head else os.path.relpath(f) for f in found]
  return out


def config_defaults_to_run(workdir_flag: str = "workdir"):
  """Makes ``--config`` optional for this launcher: left out, it is the config the run in
  ``--workdir`` (the first one of a list) was trained with, ``configs/run.py:WORKDIR``.

  absl parses ``--config=configs/run.py:WORKDIR`` then, placed before the other flags, so that
  ``--config.x=…`` overrides apply to it exactly as to a config file given on the command line
  (ml_collections defines a flag for every ``--config.x`` it finds in ``sys.argv``). The workdir is
  read from the command line before absl parses it.
  """
  _RUN_CONFIG["workdir_flag"] = workdir_flag


def config_from_run() -> bool:
  """Whether ``--config`` was left out and is the run's own config (:func:`config_defaults_to_run`)."""
  return bool(_RUN_CONFIG["defaulted"])


def _flag_value(argv, name: str) -> str | None:
  """The value of ``--name=V`` / ``--name V`` in ``argv`` (the last one; ``None``: absent)."""
  value, i = None, 1
  while i < len(argv):
    a = argv[i]
    if a == "--":
      break
    for prefix in (f"--{name}", f"-{name}"):
      if a == prefix and i + 1 < len(argv):
        value, i = argv[i + 1], i + 1
      elif a.startswith(prefix + "="):
        value = a[len(prefix) + 1 :]
    i += 1
  return value


def _with_run_config(argv):
  """``argv`` with ``--config=configs/run.py:WORKDIR`` first when the launcher defaults its config
  to the run's and ``--config`` is not given."""
  flag = _RUN_CONFIG["workdir_flag"]
  if flag is None or any(
    a == "--" or a.split("=", 1)[0] in ("--config", "-config") for a in argv[1:]
  ):
    return argv
  workdir = (_flag_value(argv, flag) or "").split(",")[0].strip()
  if workdir and _GLOB_CHARS & set(workdir):
    try:
      workdir = expand_runs([workdir])[0]
    except Exception as e:  # pylint: disable=broad-except
      sys.exit(f"error: {_one_line(e)}")
  if not workdir:
    overrides = [a for a in argv[1:] if a.startswith(("--config.", "-config."))]
    if overrides:  # absl would call them unknown flags
      sys.exit(
        f"error: {overrides[0]} overrides the run's config, but --{flag} names no run: "
        f"pass --{flag}=RUN (or a --config file)"
      )
    return argv  # absl (or the launcher) reports the missing --workdir
  from configs import run as run_config  # pylint: disable=g-import-not-at-top
  from tree_diffusion.runs import RunDir  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    check_run_dir(workdir, f"--{flag}")
    if RunDir(workdir).own_config() is None:
      raise ConfigError(run_config.no_config_message(workdir))
  except Exception as e:  # pylint: disable=broad-except
    if "--traceback" in argv:
      raise
    sys.exit(f"error: {_one_line(e)}")
  _RUN_CONFIG["defaulted"] = True
  return [argv[0], f"--config={_short(RUN_CONFIG_FILE)}:{workdir}", *argv[1:]]


def run_config(workdir: str):
  """The config ``workdir`` was trained with (``configs/run.py``), with the command line's
  ``--config.x=…`` overrides applied: for a launcher of several runs whose ``--config`` was left
  out, every run but the first (whose config is ``--config``'s value).

  Raises:
    ConfigError: the run has no recorded config (with the fix), or it cannot be read.
  """
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  from configs import run as run_config_file  # pylint: disable=g-import-not-at-top

  config = run_config_file.get_config(workdir)
  for key, value in flags.FLAGS["config"].override_values.items():
    config_path.set_value(key, config, value)
  config.lock()
  return config


def _value_text(v) -> str:
  if isinstance(v, str):
    return v
  if isinstance(v, (list, tuple)):  # the comma form sequence keys take on a command line
    return ",".join(_value_text(x) for x in v) if v else "()"
  return json.dumps(v)


def check_against_run(config, workdir: str):
  """Refuses ``config`` where it contradicts the config ``workdir`` was trained with (its
  ``diffusion/config.json``, else ``config.json``; nothing to check for a run without one). Only
  the settings of sampling and evaluation (``checkpoint.RUN_SETTINGS``) may differ.

  Raises:
    ConfigError: one line naming the key (the ``--config.x=…`` override if it is one), both
      values, the file and the fix.
  """
  from tree_diffusion import checkpoint, files  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.runs import RunDir  # pylint: disable=g-import-not-at-top

  path = RunDir(workdir).own_config()
  if path is None:
    return
  try:
    saved = files.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"{path} cannot be read ({type(e).__name__}: {_one_line(e)}): remove it, or "
      f"re-run the run's training command to write it again"
    ) from None
  diffs = checkpoint.run_config_contradictions(config, saved)
  if not diffs:
    return
  overridden = set(flags.FLAGS["config"].override_values)
  diffs.sort(key=lambda d: d[0] not in overridden)  # the command line's own overrides first
  key, was, now = diffs[0]
  also = [d[0] for d in diffs[1:]]
  also = f"; also {', '.join(also[:4])}{', …' if len(also) > 4 else ''}" if also else ""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top

  settings = ", ".join(
    s + (".*" if isinstance(config_path.get_value(s, config), type(config)) else "")
    for s in checkpoint.RUN_SETTINGS
  )
  where = f"({_value_text(was)} in {path}{also})"
  if key in overridden:
    raise ConfigError(
      f"--config.{key}={_value_text(now)} contradicts the run's config {where}: only its "
      f"sampling and evaluation settings ({settings}) may be overridden; leave out "
      f"--config.{key}"
    )
  raise ConfigError(
    f"--config={flags.FLAGS['config'].config_filename} has {key}={_value_text(now)}, which "
    f"contradicts the run's config {where}: leave out --config to use the run's own config, or "
    f"pass --config.{key}={_value_text(was)}"
  )


def _typed_sequences(argv):
  """``argv`` with the value of every ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) whose key
  holds a sequence written as the tuple ml_collections parses, in the default's element type
  (``configs.common.sequence_override``: ``4,4``, ``(4, 4)`` and ``[4, 4]`` alike).

  Raises:
    ConfigError: a value that is not such a sequence (the key, the bad element, a working form).
  """
  from configs import common as config_common  # pylint: disable=g-import-not-at-top

  out, i = list(argv[:1]), 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      return out + list(argv[i:])
    dashes = "--" if arg.startswith("--config.") else "-" if arg.startswith("-config.") else ""
    if not dashes:
      out.append(arg)
      i += 1
      continue
    key, eq, value = arg[len(dashes) + len("config.") :].partition("=")
    if eq:
      taken = [arg]
    elif i + 1 < len(argv):  # --config.KEY VALUE
      taken, value = [arg, argv[i + 1]], argv[i + 1]
    else:  # no value: absl says so
      taken, value = [arg], None
    parsed = None if value is None else config_common.sequence_override(key, value)
    out += taken if parsed is None else [f"{dashes}config.{key}={parsed!r}"]
    i += len(taken)
  return out


def _parse_flags(argv):
  """absl's flag parsing, with a mistyped or ill-typed ``--config.x=…`` and a config file that
  cannot be loaded as one-line errors."""
  _guard_config_files()
  argv = _with_run_config(argv)
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    argv = _typed_sequences(argv)
  except ConfigError as e:
    sys.exit(f"error: {_one_line(e)}")
  try:
    return flags.FLAGS(argv)
  except ConfigFileError as e:
    sys.exit(f"error: {_one_line(e)}")
  except flags.Error as e:
    sys.exit(f"error: {_one_line(e)} (see --help)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = _one_line(e)
    while len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":  # str(KeyError) quotes
      msg = msg[1:-1]
    sys.exit(f"error: bad --config override: {msg}")


def run(main):
  """``absl.app.run(main)`` with expected errors reported as ``error: …`` on one line, and a
  graceful stop (:class:`preemption.Preempted`) as exit code 0 with the command that resumes."""

  def wrapped(argv):
    from tree_diffusion import errors, preemption  # pylint: disable=g-import-not-at-top

    if len(argv) > 1:  # every launcher takes flags only; a stray word is a mistyped flag
      sys.exit(
        f"error: unexpected argument(s) {' '.join(shlex.quote(a) for a in argv[1:])}: "
        f"flags take the form --name=value (see --help)"
      )
    _threads_say_a_full_disk_in_one_line()
    try:
      return main(argv)
    except preemption.Preempted as e:
      logging.warning("%s. Resume with the same command: %s", e, resume_command())
      sys.exit(0)
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, evaluation, data)
      if _TRACEBACK.value:
        raise
      print(
        "error: interrupted (Ctrl-C); what was written before stays valid: re-run the same "
        "command to continue",
        file=sys.stderr,
      )
      sys.exit(130)
    except _user_errors() as e:
      if _TRACEBACK.value:
        raise
      if errors.disk_full(e) is not None:
        _drop_late_reports()
      sys.exit(f"error: {_one_line(e)}")  # said once (no log line of the same before it)
    except Exception as e:  # pylint: disable=broad-except  (a full disk in any writer)
      full = errors.disk_full(e)
      if full is None or _TRACEBACK.value:
        raise
      _drop_late_reports()
      path = getattr(full, "filename", None)
      where = f" writing {path}" if path else ""
      disk = os.path.dirname(os.fspath(path)) if path else _workdir()
      sys.exit(
        f"error: the disk is full{where}: free space on the disk that holds "
        f"{disk or 'the run directory'} and re-run the same command (a training command "
        f"resumes from its last complete checkpoint; a file being replaced is kept as it "
        f"was)"
      )

  app.run(wrapped, flags_parser=_parse_flags)
