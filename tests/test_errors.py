"""Bad inputs to the launchers: each a one-line error (exit code != 0, no traceback)."""

import fcntl
import json
import os
import socket

import pytest

from configs import demo
from launchers import run as _run
from tree_diffusion.treevae import export as export_lib


@pytest.mark.parametrize(
  "args,expect",
  [
    (["--config=configs/demo.py:tiny", "--config.stage1.num_epocs=3"], "num_epocs"),
    (["--config=configs/demo.py:tiny", "--config.stage1.batch_size=abc"], "batch_size"),
    (["--config=configs/demo.py:tiny", "--config.stage1.lr=-1"], "config.stage1.lr must be > 0"),
    (
      [
        "--config=configs/demo.py:tiny",
        "--config.data.name=folder",
        "--config.data.folder={tmp}/empty",
      ],
      "no images (.bmp/.gif/.jpeg/.jpg/.png",
    ),
    (
      ["--config=configs/demo.py:tiny", "--config.stage1.batch_size=7", "--two_devices"],
      "batch size 7 is not divisible by the 2 devices",
    ),
    (
      ["--config=configs/mnist.py:tiny", "--config.data.data_dir={tmp}/tfds"],
      "launch.prepare_data",
    ),
    (["--config=configs/demo.py:tiny", "--config.data.image_size=32"], "image_size"),
    (["--config=configs/demo.py:tiny", "--workdir_is_file"], "not writable"),
  ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, expect):
  workdir = str(tmp_path / "w")
  if "--workdir_is_file" in args:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a for a in args if a != "--workdir_is_file"]
    workdir = str(blocker / "sub")
  env = None
  if "--two_devices" in args:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [a for a in args if a != "--two_devices"]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("not an image")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  r = _run(*args, f"--workdir={workdir}", timeout=120, env=env)
  assert r.returncode != 0
  assert expect in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  if "empty" in " ".join(args):
    assert "skipping non-image file" in r.stderr and "notes.txt" in r.stderr


@pytest.mark.parametrize(
  "args,expect",
  [
    (["--config.diffusion.conditioning=paths"], "unknown conditioning 'paths'"),
    ([], "does not exist: train stage 1 first"),
    (["--config.diffusion.treevae_export={workdir}"], "looks like a training workdir"),
  ],
)
def test_stage2_bad_input_gives_one_line_error(tmp_path, args, expect):
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)  # a stage-1 workdir without its export
  args = [a.replace("{workdir}", str(workdir)) for a in args]
  r = _run(
    "--config=configs/demo.py:tiny",
    f"--workdir={workdir}",
    *args,
    timeout=120,
    script="train_diffusion.py",
  )
  assert r.returncode != 0
  assert expect in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]


def _fake_run(workdir, dataset="mnist_5k", stage2_steps=(2,), config=None):
  """A run directory as far as the launchers look before any heavy work: the stage-1 export's
  meta.json (no weights), empty committed stage-2 checkpoint directories and, given ``config``,
  its recorded config (``diffusion/config.json``)."""
  data = demo.get_config("tiny").data.to_dict()
  data["name"] = dataset
  (workdir / "export").mkdir(parents=True)
  (workdir / "export" / "meta.json").write_text(
    json.dumps(
      {
        "format": export_lib.EXPORT_FORMAT,
        "model": {"image_size": 28, "channels": 1},
        "config": {"data": data},
      }
    )
  )
  (workdir / "stage1_metrics.json").write_text("{}")
  for step in stage2_steps:
    step_dir = workdir / "diffusion" / "checkpoints" / str(step)
    step_dir.mkdir(parents=True)
    (step_dir / "commit_success.txt").write_text("ok")
  if config is not None:
    (workdir / "diffusion").mkdir(exist_ok=True)
    (workdir / "diffusion" / "config.json").write_text(config.to_json_best_effort())
  return workdir


_TINY = "--config=configs/demo.py:tiny"


# (launcher, arguments, expected text); {run}: a run with stage-2 checkpoint 2, {run_fm}: the same
# of fashion_mnist, {s1}: a run with stage 1 only, {file}: a regular file, {tmp}: a fresh directory,
# {rec}: {run} with its recorded config (demo:tiny with `path` conditioning).
@pytest.mark.parametrize(
  "script,args,expect",
  [
    # Config arguments and config files.
    (
      "train_treevae.py",
      ["--config=configs/demo.py:tni", "--workdir={tmp}/w"],
      "unknown config argument 'tni' for configs/demo.py (did you mean 'tiny'?); valid: tiny, reference",
    ),
    (
      "train_diffusion.py",
      ["--config=configs/demo.py:tiny,seed=3", "--workdir={tmp}/w"],
      "unknown config argument 'seed=3' for configs/demo.py; valid: tiny, reference; set a value with "
      "--config.KEY=3 (keys named 'seed': classifier.seed, data.seed,",
    ),
    (
      "sample.py",
      ["--config=configs/nope.py", "--workdir={run}"],
      "config file configs/nope.py does not exist",
    ),
    (
      "train_treevae.py",
      ["--config=configs", "--workdir={tmp}/w"],
      "config file configs is a directory",
    ),
    ("evaluate.py", ["--config={tmp}/syntax.py", "--workdir={run}"], "syntax.py:1: "),
    (
      "train_classifier.py",
      ["--config={tmp}/raises.py", "--workdir={tmp}/w"],
      "raises.py failed with RuntimeError: boom (at ",
    ),
    (
      "train_treevae.py",
      ["--config={tmp}/raises.py", "--config.stage1.lr=1", "--workdir={tmp}/w"],
      "raises.py failed with RuntimeError: boom (at ",
    ),
    (
      "train_diffusion.py",
      ["--config={tmp}/valueerror.py", "--workdir={tmp}/w"],
      "valueerror.py failed with ValueError: bad value (at ",
    ),
    (
      "train_treevae.py",
      ["--config={tmp}/noconfig.py", "--workdir={tmp}/w"],
      "noconfig.py defines no get_config(arg=None)",
    ),
    # A sequence-valued key: three forms, each parsed to ints (the run has (2, 2, 2, 2)), and a
    # malformed one.
    (
      "sample.py",
      ["--workdir={rec}", "--config.treevae.latent_channels=4,4,4,4"],
      "--config.treevae.latent_channels=4,4,4,4 contradicts the run's config (2,2,2,2",
    ),
    (
      "sample.py",
      ["--workdir={rec}", "--config.treevae.latent_channels=(4, 4, 4, 4)"],
      "--config.treevae.latent_channels=4,4,4,4 contradicts the run's config (2,2,2,2",
    ),
    (
      "sample.py",
      ["--workdir={rec}", "--config.treevae.latent_channels=[4,4,4,4]"],
      "--config.treevae.latent_channels=4,4,4,4 contradicts the run's config (2,2,2,2",
    ),
    (
      "train_treevae.py",
      [_TINY, "--workdir={tmp}/w", "--config.treevae.latent_channels=(4, x)"],
      "--config.treevae.latent_channels=(4, x): 'x' is not an int; pass ints separated by commas, "
      "e.g. --config.treevae.latent_channels=16,16,16,16,16,16,16",
    ),
    # Sample counts.
    ("sample.py", [_TINY, "--workdir={run}", "--num_samples=0"], "flag --num_samples=0: "),
    ("sample.py", [_TINY, "--workdir={run}", "--num_samples=-5"], "flag --num_samples=-5: "),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--config.diffusion.sampling.num_samples=0"],
      "config.diffusion.sampling.num_samples must be > 0, got 0",
    ),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--config.diffusion.sampling.batch_size=0"],
      "config.diffusion.sampling.batch_size must be > 0, got 0",
    ),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--config.eval.num_samples=-5"],
      "config.eval.num_samples must be > 0, got -5",
    ),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--config.eval.recons_num=-1"],
      "config.eval.recons_num must be >= 0, got -1",
    ),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--config.eval.purity_samples=0"],
      "config.eval.purity_samples must be > 0, got 0",
    ),
    # Sampling steps against the diffusion steps.
    (
      "train_diffusion.py",
      [_TINY, "--workdir={tmp}/w", "--config.diffusion.sampling.steps=2000"],
      "config.diffusion.sampling.steps (2000) must be <= config.diffusion.T (1000)",
    ),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--config.diffusion.sampling.steps=2000"],
      "config.diffusion.sampling.steps (2000) must be <= config.diffusion.T (1000)",
    ),
    # Output directories that cannot be written.
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--samples_is_file"],
      "diffusion/samples is not writable",
    ),
    ("evaluate.py", [_TINY, "--workdir={run}", "--eval_is_file"], "/eval is not writable"),
    (
      "train_classifier.py",
      [_TINY, "--workdir={tmp}/w", "--config.classifier.dir={file}/c"],
      "is not writable",
    ),
    ("summarize.py", ["--workdir={run}", "--summary_is_dir"], "summary.md is a directory"),
    # Several runs at once.
    (
      "evaluate.py",
      [_TINY, "--workdir={run},{run_fm}"],
      "--workdir holds runs of different datasets: {run} (mnist_5k), {run_fm} (fashion_mnist)",
    ),
    ("evaluate.py", [_TINY, "--workdir={run_fm}"], "was trained on other data"),
    (
      "evaluate.py",
      [_TINY, "--workdir={run},{tmp}/nope"],
      "run directory {tmp}/nope does not exist",
    ),
    # Missing or bad flags, runs, checkpoints.
    ("sample.py", [_TINY], "flag --workdir=None"),
    ("train_treevae.py", ["--workdir={tmp}/w"], "flag --config=None"),
    ("sample.py", [_TINY, "--workdir={tmp}/nope"], "run directory {tmp}/nope does not exist"),
    ("sample.py", [_TINY, "--workdir={file}"], "run directory {file} is not a directory"),
    ("sample.py", [_TINY, "--workdir={s1}"], "no stage-2 checkpoint in {s1}/diffusion/checkpoints"),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--step=7"],
      "no stage-2 checkpoint 7 in {run}/diffusion/checkpoints; have [2]",
    ),
    ("sample.py", [_TINY, "--workdir={run}", "--step=-1"], "flag --step=-1: "),
    ("sample.py", [_TINY, "--workdir={run}", "--modes="], "--modes is empty"),
    ("sample.py", [_TINY, "--workdir={run}", "--modes=sampel"], "unknown mode(s) ['sampel']"),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--checkpoints=newest"],
      "--checkpoints='newest': use all, latest, none or comma-separated steps (have [2])",
    ),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--checkpoints=999"],
      "no stage-2 checkpoint(s) [999]; have [2]",
    ),
    ("evaluate.py", [_TINY, "--workdir={s1}"], "no stage-2 checkpoints in {s1}/diffusion"),
    ("evaluate.py", [_TINY, "--workdir={run}", "--modes=bogus"], "unknown mode(s) bogus"),
    ("evaluate.py", [_TINY, "--workdir={run}", "--modes="], "--modes is empty"),
    ("evaluate.py", [_TINY, "--workdir=,"], "--workdir is empty"),
    # --config left out: the run's recorded config, whose trained settings cannot be overridden.
    (
      "sample.py",
      ["--workdir={run}"],
      "run directory {run} has no config.json (it was trained "
      "before runs recorded their config): pass --config with the config it was trained with",
    ),
    ("evaluate.py", ["--workdir={rec},{run}"], "run directory {run} has no config.json"),
    ("sample.py", ["--workdir={tmp}/nope"], "run directory {tmp}/nope does not exist"),
    (
      "sample.py",
      ["--config.diffusion.sampling.steps=10"],
      "--config.diffusion.sampling.steps=10 overrides the run's config, but --workdir names no run",
    ),
    (
      "sample.py",
      ["--workdir={rec}", "--config.diffusion.unet.ch=16"],
      "--config.diffusion.unet.ch=16 contradicts the run's config (8 in "
      "{rec}/diffusion/config.json): only its sampling and evaluation settings",
    ),
    (
      "evaluate.py",
      ["--workdir={rec}", "--config.data.name=mnist"],
      "--config.data.name=mnist contradicts the run's config (mnist_5k in "
      "{rec}/diffusion/config.json)",
    ),
    (
      "evaluate.py",
      ["--workdir={rec}", "--config.treevae.act=relu"],
      "--config.treevae.act=relu contradicts the run's config (swish in ",
    ),
    (
      "sample.py",
      [_TINY, "--workdir={rec}"],
      "--config=configs/demo.py:tiny has "
      "diffusion.conditioning=image+path, which contradicts the run's config (path in "
      "{rec}/diffusion/config.json): leave out --config to use the run's own config, or pass "
      "--config.diffusion.conditioning=path",
    ),
    # ... while sampling settings can (this one is then out of range: the override was applied).
    (
      "sample.py",
      ["--workdir={rec}", "--config.diffusion.sampling.steps=2000"],
      "config.diffusion.sampling.steps (2000) must be <= config.diffusion.T (1000)",
    ),
    ("train_treevae.py", [_TINY, "--workdir={tmp}/w", "stray"], "unexpected argument(s) stray"),
    (
      "train_treevae.py",
      [_TINY, "--workdir={tmp}/w", "--num_processes=0"],
      "flag --num_processes=0: ",
    ),
    (
      "train_treevae.py",
      [_TINY, "--workdir={tmp}/w", "--distributed"],
      "--distributed: jax.distributed.initialize() failed: coordinator_address should be defined",
    ),
    (
      "train_classifier.py",
      [_TINY, "--workdir={tmp}/w", "--config.classifier.batch_size=0"],
      "config.classifier.batch_size must be > 0, got 0",
    ),
    ("prepare_data.py", [], "flag --dataset=None"),
    ("prepare_data.py", ["--dataset=bogus"], "flag --dataset=bogus: value should be one of"),
    ("prepare_data.py", ["--dataset=mnist_5k", "--image_size=0"], "flag --image_size=0: "),
    ("prepare_data.py", ["--dataset=mnist_5k", "--channels=2"], "flag --channels=2: "),
    (
      "prepare_data.py",
      ["--dataset=mnist_5k", "--test_fraction=1.5"],
      "--test_fraction must be in",
    ),
    ("prepare_data.py", ["--dataset=mnist_5k", "stray"], "unexpected argument(s) stray"),
    (
      "prepare_data.py",
      ["--dataset=folder", "--folder={tmp}/nope", "--image_size=28", "--channels=1"],
      "{tmp}/nope",
    ),
    ("summarize.py", [], "flag --workdir=None"),
    ("summarize.py", ["--workdir={tmp}/nope"], "run directory {tmp}/nope does not exist"),
    ("summarize.py", ["--workdir={run}", "--times=stage1=-5"], "--times takes step=seconds"),
    # Run directories in use, damaged or misplaced.
    (
      "train_treevae.py",
      [_TINY, "--workdir={run}", "--run_is_locked"],
      "{run} is in use by process {pid} on ",
    ),
    (
      "train_diffusion.py",
      [_TINY, "--workdir={run}", "--run_is_locked"],
      "{run} is in use by process {pid} on ",
    ),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--samples_are_locked"],
      "{run}/diffusion/samples is in use by process {pid} on ",
    ),
    (
      "evaluate.py",
      [_TINY, "--workdir={run}", "--eval_is_locked"],
      "{run}/eval is in use by process {pid} on ",
    ),
    (
      "sample.py",
      [_TINY, "--workdir={run}", "--meta_is_garbled"],
      "{run}/export/meta.json is garbled (JSONDecodeError: ",
    ),
    (
      "train_diffusion.py",
      [_TINY, "--workdir={run}", "--meta_is_garbled"],
      "rewrite it by re-running python -m launch.train_treevae with the same --config and --workdir",
    ),
    (
      "train_diffusion.py",
      [_TINY, "--workdir={run}", "--export_was_being_swapped"],
      "stage-1 export {run}/export is missing but {run}/export.old-77 holds the previous one",
    ),
    (
      "train_treevae.py",
      [_TINY, "--config.data.name=folder", "--config.data.folder={tmp}", "--workdir={tmp}/w"],
      "workdir {tmp}/w is inside the image folder {tmp}",
    ),
  ],
)
def test_launcher_bad_invocation_gives_one_line_error(tmp_path, script, args, expect):
  run, s1, tmp = tmp_path / "run", tmp_path / "s1", tmp_path / "tmp"
  tmp.mkdir()
  _fake_run(run)
  _fake_run(tmp_path / "run_fm", dataset="fashion_mnist")
  _fake_run(s1, stage2_steps=())
  recorded = demo.get_config("tiny")
  recorded.diffusion.conditioning = "path"
  _fake_run(tmp_path / "rec", config=recorded)
  (tmp_path / "file").write_text("x")
  (tmp / "syntax.py").write_text("def get_config(:\n")
  (tmp / "raises.py").write_text("def get_config(arg=None):\n  raise RuntimeError('boom')\n")
  (tmp / "valueerror.py").write_text("def get_config(arg=None):\n  raise ValueError('bad value')\n")
  (tmp / "noconfig.py").write_text("X = 1\n")
  if "--samples_is_file" in args:
    (run / "diffusion" / "samples").write_text("x")
  if "--eval_is_file" in args:
    (run / "eval").write_text("x")
  if "--summary_is_dir" in args:
    (run / "summary.md").mkdir()
  held = None
  for flag, directory in (
    ("--run_is_locked", run),
    ("--samples_are_locked", run / "diffusion" / "samples"),
    ("--eval_is_locked", run / "eval"),
  ):
    if flag in args:  # held by this process (flock) while the launcher runs
      directory.mkdir(parents=True, exist_ok=True)
      held = open(directory / ".lock", "w")
      fcntl.flock(held, fcntl.LOCK_EX)
      held.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
      held.flush()
  if "--meta_is_garbled" in args:
    (run / "export" / "meta.json").write_text('{"format": "tree_diffusion.tre')
  if "--export_was_being_swapped" in args:
    (run / "export").rename(run / "export.old-77")
  names = dict(
    run=run,
    run_fm=tmp_path / "run_fm",
    s1=s1,
    file=tmp_path / "file",
    tmp=tmp,
    rec=tmp_path / "rec",
    pid=os.getpid(),
  )
  fill = lambda a: a.format(**{k: str(v) for k, v in names.items()})
  args = [
    fill(a)
    for a in args
    if not a.endswith(
      ("_is_file", "_is_dir", "_is_locked", "_is_garbled", "_being_swapped", "_are_locked")
    )
  ]
  try:
    r = _run(*args, timeout=120, script=script)
  finally:
    if held is not None:
      held.close()
  assert r.returncode != 0, r.stderr[-2000:]
  assert fill(expect) in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and fill(expect) in errors[0], r.stderr[-2000:]
  # Said once: not also as a log line before it.
  assert r.stderr.count(errors[0][len("error: ") :]) == 1, r.stderr[-2000:]
