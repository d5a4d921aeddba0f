"""A full disk while a launcher writes: one ``error:`` line (exit code 1, no traceback) that says
the disk is full and names what was kept, and nothing the user had is lost. The disk is a small
tmpfs (mounting one needs root, as the tests have here and in CI; skipped otherwise) filled up to
a few kilobytes, or filled while the launcher computes; a fast test injects TensorStore's error
instead."""

import contextlib
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from absl import logging

import launchers
from launchers import ROOT, assert_trees_equal, tiny_config
from launchers import run as _run
from test_reliability import _stage1_run, _stage2_run
from tree_diffusion import checkpoint, errors, files
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.treevae.checkpoints import Stage1Checkpoints

_TINY = "--config=configs/demo.py:tiny"
# What TensorStore (under Orbax) raises when a write finds the disk full.
_TENSORSTORE_FULL = (
  'RESOURCE_EXHAUSTED: Error writing local file "/run/checkpoints/3.orbax-checkpoint-tmp/state/'
  'd/1f2e": Failed to write 161339 bytes to file 9: No space left on device '
  "[os_error_code='28']"
)


# ------------------------------------------------------------------------ without a small disk


@pytest.mark.parametrize(
  "make,full",
  [
    (lambda: ValueError(_TENSORSTORE_FULL), True),
    (lambda: ValueError("RESOURCE_EXHAUSTED: Disk quota exceeded [os_error_code='122']"), True),
    (lambda: OSError(28, "No space left on device"), True),
    (lambda: OSError(122, "Disk quota exceeded"), True),
    (lambda: ValueError("RESOURCE_EXHAUSTED: out of memory allocating 1 GiB"), False),
    (lambda: ValueError("No space left on device in the tree"), False),  # no status code
    (lambda: OSError(13, "Permission denied"), False),
  ],
)
def test_a_full_disk_is_recognised_wherever_it_is_in_the_chain(make, full):
  assert (errors.disk_full(make()) is not None) == full
  try:
    try:
      raise make()
    except Exception as inner:  # pylint: disable=broad-except
      raise RuntimeError("Checkpoint save failed") from inner  # as Orbax re-raises it
  except RuntimeError as e:
    assert (errors.disk_full(e) is not None) == full
  try:
    try:
      raise make()
    except Exception:  # pylint: disable=broad-except
      raise RuntimeError("while handling it")  # the context, not the cause
  except RuntimeError as e:
    assert (errors.disk_full(e) is not None) == full
  assert (errors.disk_full(ExceptionGroup("writes", [KeyError("x"), make()])) is not None) == full
  assert errors.disk_full(RuntimeError("Checkpoint save failed")) is None


class _RaisesWhenFinalised:
  """Raises in ``__del__``: its exception goes to ``sys.unraisablehook``, as TensorStore's
  callbacks' do once Orbax's event loop is closed."""

  def __del__(self):
    raise RuntimeError("Event loop is closed")


@pytest.mark.parametrize(
  "cause",
  [lambda: ValueError(_TENSORSTORE_FULL), lambda: OSError(28, "No space left on device")],
  ids=["tensorstore", "oserror"],
)
def test_orbax_reports_of_a_full_disk_are_held_back_and_others_shown(
  tmp_path, monkeypatch, capfd, caplog, cause
):
  directory = tmp_path / "checkpoints"
  ckpts = Stage2Checkpoints(str(directory))
  ckpts.save(2, {"w": np.zeros((3,), np.float32)}, {})
  real_save = checkpoint.ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    # As Orbax's threads report it on their own, then raise it wrapped in their own error.
    try:
      raise cause()
    except (ValueError, OSError) as e:
      logging.error("[thread=async_save] Failed to run Handler Commit operations", exc_info=True)
      _RaisesWhenFinalised()
      raise RuntimeError("Save failed") from e

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full)
  hook = sys.unraisablehook
  capfd.readouterr()
  caplog.clear()
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpts.save(4, {"w": np.ones((3,), np.float32)}, {})
  assert str(e.value) == (
    f"stage-2 checkpoint 4 was not saved in {directory}: the disk is full; the last complete "
    f"one is checkpoint 2 in {directory} (kept). Free space (or fix the directory) and re-run "
    f"the same command to resume from it"
  )
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err + caplog.text, out + err + caplog.text
  assert "Failed to run" not in err + caplog.text and "Event loop" not in err + caplog.text
  assert sys.unraisablehook is hook  # put back

  def other(self, step, *args, **kwargs):  # any other failure: Orbax's reports are shown
    logging.error("[thread=async_save] Failed to run Handler Commit operations")
    _RaisesWhenFinalised()
    raise RuntimeError("a bug")

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", other)
  with pytest.raises(RuntimeError, match="a bug"):
    ckpts.save(4, {"w": np.ones((3,), np.float32)}, {})
  shown = capfd.readouterr().err + caplog.text
  assert "Failed to run Handler Commit operations" in shown and "Event loop is closed" in shown
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", real_save)
  ckpts.close()
  assert Stage2Checkpoints(str(directory), read_only=True).all_steps() == [2]


# ------------------------------------------------------------------------------ on a small disk


@contextlib.contextmanager
def _small_disk(directory, size="32m"):
  """A tmpfs of ``size`` mounted on ``directory`` (skips the test where it cannot be mounted)."""
  directory.mkdir()
  try:
    r = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
      capture_output=True,
      text=True,
    )
  except FileNotFoundError:
    pytest.skip("no mount command")
  if r.returncode != 0:
    pytest.skip(f"a tmpfs cannot be mounted here (needs root): {r.stderr.strip()}")
  try:
    yield directory
  finally:
    if subprocess.run(["umount", str(directory)]).returncode != 0:
      subprocess.run(["umount", "-l", str(directory)], check=True)


def _fill(disk, free: int = 0):
  """Fills ``disk`` up to ``free`` bytes with a file of its own."""
  st = os.statvfs(disk)
  size = st.f_bavail * st.f_frsize - free
  fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    if size > 0:
      os.posix_fallocate(fd, 0, size)
  finally:
    os.close(fd)


def _assert_one_full_disk_error(r, *kept):
  """Exit code 1, one ``error:`` line that says the disk is full and holds ``kept``, no
  traceback."""
  out = r.stdout + r.stderr
  assert "Traceback" not in out and "Exception ignored" not in out, out[-4000:]
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-4000:]
  assert "the disk is full" in lines[0], lines[0]
  for text in kept:
    assert text in lines[0], lines[0]


def _run_filling(disk, when: str, *args, script: str, timeout: float = 300):
  """Runs ``launch/<script>`` and fills ``disk`` once a line of its stderr holds ``when``; returns
  the ``CompletedProcess``."""
  p = subprocess.Popen(
    [*launchers.command(script), *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  watchdog = threading.Timer(timeout, p.kill)
  watchdog.start()
  lines, filled = [], False
  try:
    for line in p.stderr:
      lines.append(line)
      if not filled and when in line:
        _fill(disk)
        filled = True
    out = p.stdout.read()
    rc = p.wait()
  finally:
    watchdog.cancel()
  err = "".join(lines)
  assert filled, f"{script} never logged {when!r}; stderr:\n{err[-3000:]}"
  return subprocess.CompletedProcess(p.args, rc, out, err)


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
  """A run with its stage-1 export and stage-2 checkpoint 2 (initial weights, no training)."""
  workdir = tmp_path_factory.mktemp("full_disk") / "run"
  _stage2_run(tiny_config(), workdir, 2)
  return workdir


def test_a_full_disk_during_a_stage1_checkpoint(tmp_path):
  c = tiny_config(stage1__prune=False)
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    # Checkpoint 7 before pruning: with prune=False, the next one (8) is saved at once.
    model, variables, tree = _stage1_run(c, workdir, phase="prune", export=False)
    _fill(disk, 16 << 10)
    r = _run(_TINY, "--config.stage1.prune=False", f"--workdir={workdir}")
    ckpts = workdir / "checkpoints"
    _assert_one_full_disk_error(
      r,
      f"stage-1 checkpoint 8 was not saved in {ckpts}",
      f"the last complete one is checkpoint 7 in {ckpts} (kept)",
    )
    step, restored, restored_tree, _, _ = Stage1Checkpoints(str(workdir)).restore(model)
    assert step == 7 and restored_tree == tree
    assert_trees_equal(restored, variables)


def test_a_full_disk_during_the_stage1_export(tmp_path):
  c = tiny_config()
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    _stage1_run(c, workdir, phase="done", export=False)  # finished but for its export
    _fill(disk, 16 << 10)
    r = _run(_TINY, f"--workdir={workdir}")
    _assert_one_full_disk_error(r, f"the stage-1 export was not written to {workdir}/export")
    assert not [n for n in os.listdir(workdir) if n.startswith("export")]  # nothing half-done
    assert Stage1Checkpoints(str(workdir)).latest_step() == 7


@pytest.mark.slow
def test_a_full_disk_during_a_stage2_checkpoint(tmp_path, stage2_run):
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(stage2_run, workdir)
    _fill(disk, 64 << 10)
    r = _run(_TINY, f"--workdir={workdir}", script="train_diffusion.py")
    ckpts = workdir / "diffusion" / "checkpoints"
    _assert_one_full_disk_error(
      r,
      f"stage-2 checkpoint 3 was not saved in {ckpts}",
      f"the last complete one is checkpoint 2 in {ckpts} (kept)",
    )
    assert Stage2Checkpoints(str(ckpts), read_only=True).all_steps() == [2]
    os.remove(disk / "filler")  # space freed: the same command resumes from checkpoint 2
    r = _run(_TINY, f"--workdir={workdir}", script="train_diffusion.py")
    assert r.returncode == 0 and "resumed stage 2 from checkpoint 2" in r.stderr, r.stderr[-3000:]
    assert Stage2Checkpoints(str(ckpts), read_only=True).all_steps() == [2, 3]


def test_a_full_disk_while_sampling_over_existing_samples_keeps_them(tmp_path, stage2_run):
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(stage2_run, workdir)
    old = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    path = workdir / "diffusion" / "samples" / "sample" / "samples.npz"
    files.save_npz(path, images=old)
    _fill(disk, 4 << 10)
    r = _run(
      _TINY,
      f"--workdir={workdir}",
      "--modes=sample",
      "--num_samples=32",
      "--nofigure",
      script="sample.py",
    )
    _assert_one_full_disk_error(r, f"{path} was not written", "the previous one is kept")
    with np.load(path) as z:
      np.testing.assert_array_equal(z["images"], old)
    assert sorted(os.listdir(path.parent)) == ["samples.npz"]


def test_a_full_disk_while_evaluating_keeps_the_previous_evaluation(tmp_path, stage2_run):
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(stage2_run, workdir)
    path = workdir / "eval" / "metrics.json"
    path.parent.mkdir()
    path.write_text('{"old": 1}')
    r = _run_filling(
      disk,
      "evaluating the stage-1 export",
      _TINY,
      f"--workdir={workdir}",
      "--checkpoints=none",
      "--config.eval.fid=False",
      script="evaluate.py",
    )
    _assert_one_full_disk_error(r, "was not written")
    assert path.read_text() == '{"old": 1}'
    assert not [n for n in os.listdir(path.parent) if ".tmp" in n]


# tensorboardX's thread fails on the first image (64 KB of noise) and ends; its queue holds 10.
_TENSORBOARD_ON_A_FULL_DISK = """
import os, sys
import numpy as np
from tree_diffusion import errors
from tree_diffusion.writer import MetricWriter
disk = sys.argv[1]
w = MetricWriter(os.path.join(disk, "tb"))
st = os.statvfs(disk)
fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
os.close(fd)
noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
try:
  for step in range(30):
    w.write_images(step, {"noise": noise})
  print("all written")
except errors.DiskFullError as e:
  print(e)
"""


def test_a_full_disk_under_tensorboard_is_an_error_not_a_hang(tmp_path):
  with _small_disk(tmp_path / "disk", size="1m") as disk:
    try:  # the writes, and the exit (a queue left to its feeder thread), must end
      r = subprocess.run(
        [sys.executable, "-c", _TENSORBOARD_ON_A_FULL_DISK, str(disk)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
      )
    except subprocess.TimeoutExpired:
      pytest.fail("writing TensorBoard events on a full disk hangs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(
      f"the disk is full: the TensorBoard events in {disk / 'tb'} could not be written"
    ), r.stdout


def test_a_thread_that_meets_a_full_disk_logs_one_line(caplog, capfd):
  from launch import common

  hook = threading.excepthook
  try:
    common._threads_say_a_full_disk_in_one_line()  # pylint: disable=protected-access

    def full():
      raise OSError(28, "No space left on device")

    t = threading.Thread(target=full, name="event-writer")
    t.start()
    t.join()
  finally:
    threading.excepthook = hook
  assert "event-writer stopped: the disk is full ([Errno 28] No space left on device)" in (
    caplog.text
  )
  assert "Traceback" not in caplog.text + capfd.readouterr().err
