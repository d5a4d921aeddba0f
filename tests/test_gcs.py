"""Run directories on Cloud Storage (``gs://``), against a real server: the storage emulator of
``tests/gcs_emulator.py``, started on 127.0.0.1 for this module."""

import json
import os
import signal
import time

import numpy as np
import pytest

import gcs_emulator
from launchers import ROOT, assert_trees_equal
from launchers import run as _run
from launchers import run_with_signals as _run_with_signals

BUCKET = "td-test"


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment, set in this process (and so in the launchers it starts)."""
  proc, env = gcs_emulator.start(BUCKET)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.kill()
    proc.wait()


def _objects(prefix: str) -> list[str]:
  """Every object name under ``gs://BUCKET/prefix`` (listed with the client itself)."""
  import gcsfs

  fs = gcsfs.GCSFileSystem()
  fs.invalidate_cache()
  return sorted(p[len(BUCKET) + 1 :] for p in fs.find(f"{BUCKET}/{prefix}"))


def _no_local_gs_directory(*dirs):
  for d in dirs:
    assert not os.path.exists(os.path.join(d, "gs:")), f"a local gs: directory in {d}"


def test_files_round_trip_through_the_server(gcs, tmp_path, monkeypatch):
  from tree_diffusion import files

  monkeypatch.chdir(tmp_path)
  root = f"gs://{BUCKET}/files"
  files.write_json(files.join(root, "a", "b.json"), {"x": [1, 2]})
  assert files.read_json(f"{root}/a/b.json") == {"x": [1, 2]}
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  files.save_npz(f"{root}/s.npz", images=images, leaf=np.array([3, 1]))
  back = files.load_npz(f"{root}/s.npz")
  np.testing.assert_array_equal(back["images"], images)
  np.testing.assert_array_equal(back["leaf"], [3, 1])
  files.save_png(f"{root}/g.png", images[0])
  import io
  from PIL import Image

  np.testing.assert_array_equal(
    np.asarray(Image.open(io.BytesIO(files.read_bytes(f"{root}/g.png")))), images[0]
  )
  assert files.is_dir(f"{root}/a") and files.is_file(f"{root}/a/b.json")
  assert not files.exists(f"{root}/missing.json")
  assert str(files.as_path(root)) == root  # not made "absolute" against the cwd
  assert _objects("files") == ["files/a/b.json", "files/g.png", "files/s.npz"]
  _no_local_gs_directory(tmp_path)


def test_feature_cache_and_checkpoints_on_the_server(gcs):
  """The Inception feature cache and an Orbax checkpoint manager (TensorStore's own client)."""
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
  from tree_diffusion.eval import fid

  path = f"gs://{BUCKET}/ckpt/eval/cache/features.npz"
  feats = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  fid.save_features(path, feats, {"num_images": 5, "split": "test"})
  np.testing.assert_array_equal(fid.load_features(path, {"num_images": 5, "split": "test"}), feats)
  assert fid.load_features(path, {"num_images": 5, "split": "train"}) is None  # other data
  ckpts = Stage2Checkpoints(f"gs://{BUCKET}/ckpt/checkpoints")
  state = {"w": np.arange(6, dtype=np.float32), "b": np.float32(2.5)}
  for step in (1, 2):
    ckpts.save(step, {k: v * step for k, v in state.items()}, {"note": step})
  ckpts.close()
  assert Stage2Checkpoints.steps_in(f"gs://{BUCKET}/ckpt/checkpoints") == [1, 2]
  reader = Stage2Checkpoints(f"gs://{BUCKET}/ckpt/checkpoints", read_only=True)
  step, got, meta = reader.restore(state)
  reader.close()
  assert step == 2 and meta["note"] == 2
  np.testing.assert_array_equal(got["w"], state["w"] * 2)


def test_the_lock_is_an_object_created_only_if_absent(gcs):
  from tree_diffusion import files, lock
  from tree_diffusion.errors import WorkdirBusyError

  workdir = f"gs://{BUCKET}/locked"
  lock_path = f"{workdir}/{lock.LOCK_FILE}"
  before = time.time()
  with lock.WorkdirLock(workdir, "stage 1"):
    record = files.read_json(lock_path)
    assert record["pid"] == os.getpid() and record["command"] == "stage 1"
    assert before <= record["heartbeat"] <= time.time()  # the clock reading of the acquisition
    with pytest.raises(WorkdirBusyError, match=r"in use by process \d+ on .* \(stage 1\)"):
      with lock.WorkdirLock(workdir, "stage 2"):
        pass
  assert not files.exists(lock_path)  # released: the object is removed

  # A record renewed recently by a process on another host refuses; one whose heartbeat stopped
  # STALE_AFTER_S ago is taken over; so is one of a process of this host that is gone.
  other = {"pid": 1, "host": "another-host", "command": "stage 2", "since": "then"}
  files.write_json(lock_path, {**other, "heartbeat": time.time() - 10})
  with pytest.raises(WorkdirBusyError, match="process 1 on another-host"):
    with lock.WorkdirLock(workdir, "stage 1"):
      pass
  files.write_json(lock_path, {**other, "heartbeat": time.time() - lock.STALE_AFTER_S - 1})
  with lock.WorkdirLock(workdir, "taker"):
    assert files.read_json(lock_path)["command"] == "taker"
  import socket
  import subprocess
  import sys

  gone = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  files.write_json(
    lock_path,
    {**other, "host": socket.gethostname(), "pid": int(gone.stdout), "heartbeat": time.time()},
  )
  with lock.WorkdirLock(workdir, "taker 2"):
    assert files.read_json(lock_path)["command"] == "taker 2"


def test_two_takeovers_of_one_stale_lock_cannot_both_win(gcs):
  """The takeover deletes only the stale generation: a lock created in between survives it."""
  from tree_diffusion import files, lock
  from tree_diffusion.errors import WorkdirBusyError

  workdir = f"gs://{BUCKET}/race"
  lock_path = f"{workdir}/{lock.LOCK_FILE}"
  stale = {"pid": 1, "host": "another-host", "command": "old", "heartbeat": 0.0}
  files.write_json(lock_path, stale)
  first = lock._ObjectLock(
    lock_path,
    {"pid": 2, "host": "h2", "command": "first"},
    busy=lambda holder: WorkdirBusyError(str(holder)),
  )
  _, stale_generation = first._read()
  first.acquire()  # takes the stale lock over
  try:
    # A second process that read the stale record before the takeover now deletes what it saw:
    # a no-op, since the object is a new generation.
    rival = lock._ObjectLock(
      lock_path,
      {"pid": 3, "host": "h3", "command": "rival"},
      busy=lambda holder: WorkdirBusyError(str(holder)),
    )
    rival._delete(stale_generation)
    assert files.read_json(lock_path)["command"] == "first"
  finally:
    first.release()
  assert not files.exists(lock_path)


def test_a_missing_bucket_is_one_line_naming_it_before_any_work(gcs, tmp_path):
  for script, extra in (
    ("train_treevae.py", ["--config=configs/demo.py:tiny"]),
    ("sample.py", ["--config=configs/demo.py:tiny"]),
  ):
    r = _run(*extra, "--workdir=gs://no-such-bucket/run", script=script, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bucket no-such-bucket" in last, r.stderr[-2000:]
    assert "GOOGLE_APPLICATION_CREDENTIALS" in last and "Traceback" not in r.stderr
  _no_local_gs_directory(ROOT)


def _stage2_state(workdir):
  from tree_diffusion import files
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints

  ckpts = Stage2Checkpoints(files.join(workdir, "diffusion", "checkpoints"), read_only=True)
  import orbax.checkpoint as ocp

  step = ckpts.latest_step()
  state = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
    "state"
  ]
  ckpts.close()
  return step, state


@pytest.mark.slow
def test_the_tiny_pipeline_on_a_gs_workdir(gcs, tmp_path):
  """Both stages, stops, a kill and resumes (bit-exact against an uninterrupted run), a second
  writer, sampling, evaluation and the summary, all on gs:// run directories; nothing lands in a
  local ``gs:`` directory."""
  from tree_diffusion import files, lock
  from tree_diffusion.treevae import export as export_lib

  run, stopped = f"gs://{BUCKET}/run", f"gs://{BUCKET}/stopped"
  config = ["--config=configs/demo.py:tiny", "--config.eval.fid=False"]
  args, sargs = config + [f"--workdir={run}"], config + [f"--workdir={stopped}"]

  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = files.read_json(f"{run}/stage1_metrics.json")
  model, variables, tree = export_lib.load_treevae(f"{run}/export")
  assert tree.num_leaves == metrics["num_leaves"]
  # Stopped by SIGTERM inside the first small tree, then resumed: the same export, bit for bit.
  rc, err = _run_with_signals(
    *sargs, script="train_treevae.py", signals=[("small-tree[0]", signal.SIGTERM)]
  )
  assert rc == 0 and "Resume with the same command" in err, err[-3000:]
  r = _run(*sargs)
  assert r.returncode == 0 and "of phase small_tree" in r.stderr, r.stderr[-3000:]
  _, stopped_variables, stopped_tree = export_lib.load_treevae(f"{stopped}/export")
  assert stopped_tree == tree
  assert_trees_equal(variables, stopped_variables)

  # A second writer on the bucket's workdir is refused, as on a local disk.
  with lock.WorkdirLock(run, "another run"):
    r = _run(*args, script="train_diffusion.py", timeout=120)
  assert r.returncode == 1 and "is in use by process" in r.stderr.splitlines()[-1], r.stderr[-2000:]

  r = _run(*args, script="train_diffusion.py")
  assert r.returncode == 0, r.stderr[-3000:]
  # Stage 2 killed (SIGKILL) while its first checkpoint is uploaded, then stopped (SIGTERM) after
  # a step, resumed each time: the same state, bit for bit.
  rc, err = _run_with_signals(
    *sargs,
    script="train_diffusion.py",
    signals=[("saving stage-2 checkpoint 2", signal.SIGKILL, 0.3)],
  )
  assert rc == -signal.SIGKILL, err[-3000:]
  rc, err = _run_with_signals(
    *sargs, script="train_diffusion.py", signals=[("step 1/3", signal.SIGTERM)]
  )
  assert rc == 0 and "stopped by SIGTERM at stage-2 step" in err, err[-3000:]
  r = _run(*sargs, script="train_diffusion.py")
  assert r.returncode == 0 and "resumed stage 2 from checkpoint" in r.stderr, r.stderr[-3000:]
  (step, state), (stopped_step, stopped_state) = _stage2_state(run), _stage2_state(stopped)
  assert step == stopped_step == 3
  assert_trees_equal(state, stopped_state)

  # Sampling and evaluation without --config: the run's own, read from the bucket.
  r = _run(f"--workdir={run}", "--modes=sample,sample_all_leaves", script="sample.py")
  assert r.returncode == 0, r.stderr[-3000:]
  out = files.load_npz(f"{run}/diffusion/samples/sample_all_leaves/samples.npz")
  assert out["images"].shape == (6, tree.num_leaves, 28, 28, 1)
  r = _run(
    f"--workdir={run}",
    "--config.eval.fid=False",
    "--checkpoints=latest",
    "--modes=sample_all_leaves",
    script="evaluate.py",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  ev = files.read_json(f"{run}/eval/metrics.json")
  assert (
    list(ev["checkpoints"]) == ["3"]
    and "purity" in ev["checkpoints"]["3"]["modes"]["sample_all_leaves"]
  )
  r = _run(f"--workdir={run}", script="summarize.py", timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]

  names = _objects("run")
  for expected in (
    "run/config.json",
    "run/export/meta.json",
    "run/stage1_metrics.json",
    "run/assignments.csv",
    "run/report.html",
    "run/tree.png",
    "run/diffusion/train_summary.json",
    "run/diffusion/tree.png",
    "run/diffusion/samples/sample/grid.png",
    "run/diffusion/samples/summary.json",
    "run/eval/metrics.json",
    "run/eval/metrics.csv",
    "run/eval/report.md",
    "run/eval/step_3/tree.png",
    "run/classifier/classifier.json",
    "run/summary.md",
  ):
    assert expected in names, expected
  assert any(n.startswith("run/checkpoints/") for n in names)
  assert any(n.startswith("run/diffusion/checkpoints/3/") for n in names)
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  assert not [n for n in names if n.endswith(lock.LOCK_FILE)]  # every lock released
  assert json.loads(files.read_text(f"{run}/diffusion/samples/summary.json"))["step"] == 3
  _no_local_gs_directory(ROOT, tmp_path)
