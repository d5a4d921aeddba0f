"""Careless but ordinary use of run directories, in-process: re-running a finished stage, two
writers on one workdir, a reader next to a trainer, a dataset that changes under a run, too few
images. Each case ends in the right result or a one-line error before any work, and nothing a
user had is lost. (The launchers' one-line errors are checked end to end in test_errors.py.)"""

import errno
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from launchers import tiny_config, write_image_folder
from tree_diffusion import checkpoint, data, lock, runs
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.errors import ConfigError, WorkdirBusyError
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.checkpoints import Stage1Checkpoints


def _folder_config(tmp_path, n=64):
  """demo:tiny on a flat folder of ``n`` real digits (the 'test' split: 10 % of them)."""
  write_image_folder(tmp_path / "images", n)
  return tiny_config(
    data__name="folder",
    data__folder=str(tmp_path / "images"),
    data__data_dir=str(tmp_path / "tfds"),
  )


def _identity(c):
  return data.identity(*(data.load_arrays(c.data, s) for s in ("train", "test")))


def _stage1_run(c, workdir, phase="done", export=True, identity=None):
  """A stage-1 workdir as train_and_export leaves it after ``phase`` (without training: the
  variables are the initial ones), with its export when ``export``."""
  from tree_diffusion.treevae import train as tv_train

  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  variables = model.init(jax.random.key(0), tree)
  identity = _identity(c) if identity is None else identity
  ckpts = Stage1Checkpoints(str(workdir))
  ckpts.save(
    7,
    variables,
    tree,
    {"phase": phase, "iteration": 0, "not_expandable": [], "phase_id": 3},
    extra={
      "global_epoch": 3,
      "data_identity": identity,
      "config": checkpoint.config_sections(c, checkpoint.STAGE1_SECTIONS),
    },
  )
  ckpts.close()
  if export:
    export_lib.export_treevae(
      str(workdir / "export"),
      model,
      variables,
      tree,
      {"metrics": {"test": {"nmi": 0.5}, "num_leaves": tree.num_leaves, "wall_time_s": 1.0}},
      data_identity=identity,
    )
  return model, variables, tree


def _snapshot(directory):
  """Every file under ``directory``: (inode, bytes); equal snapshots = untouched files."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = (os.stat(p).st_ino, fh.read())
  return out


# ------------------------------------------------------------------- re-running a finished stage


def test_rerunning_a_finished_stage1_leaves_its_export_untouched(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(), tmp_path / "run"
  _stage1_run(c, workdir)
  (workdir / "tree.png").write_bytes(b"figure")
  before = _snapshot(workdir / "export")
  metrics = tv_train.train_and_export(c, str(workdir))
  assert metrics["test"]["nmi"] == 0.5  # the finished run's metrics, not recomputed
  assert _snapshot(workdir / "export") == before


def test_rerunning_a_finished_stage1_repairs_a_garbled_export(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(), tmp_path / "run"
  model, variables, tree = _stage1_run(c, workdir)
  expected = export_lib.fingerprint(model, variables, tree, _identity(c))
  (workdir / "export" / "meta.json").write_text('{"format": "tree_diffusion.treevae.exp')
  with pytest.raises(
    checkpoint.CheckpointError, match="is garbled .*re-running python -m launch.train_treevae"
  ):
    export_lib.load_treevae(str(workdir / "export"))
  tv_train.train_and_export(c, str(workdir))
  export_lib.load_treevae(str(workdir / "export"))
  assert export_lib.export_fingerprint(str(workdir / "export")) == expected


def test_the_export_fingerprint_is_only_what_stage2_uses(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c = tiny_config()
  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  v = model.init(jax.random.key(0), tree)
  identity = {"train": 4, "test": 1, "classes": 0, "hash": "aa"}
  fp = {}
  for name, variables, metrics, ident in [
    ("a", v, {"wall_time_s": 1.0}, identity),
    ("same_model_other_metrics", v, {"wall_time_s": 2.0}, identity),
    ("other_variables", model.init(jax.random.key(1), tree), {"wall_time_s": 1.0}, identity),
    ("other_data", v, {"wall_time_s": 1.0}, dict(identity, hash="bb")),
  ]:
    export_lib.export_treevae(
      str(tmp_path / name), model, variables, tree, {"metrics": metrics}, data_identity=ident
    )
    fp[name] = export_lib.export_fingerprint(str(tmp_path / name))
  assert fp["a"] == fp["same_model_other_metrics"]
  assert len({fp["a"], fp["other_variables"], fp["other_data"]}) == 3


def test_an_export_is_replaced_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
  from tree_diffusion.treevae import train as tv_train

  c = tiny_config()
  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  path = str(tmp_path / "export")
  export_lib.export_treevae(path, model, model.init(jax.random.key(0), tree), tree, {})
  before = _snapshot(path)

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", disk_full)
  with pytest.raises(
    checkpoint.CheckpointError, match=r"the disk is full \(the previous export there is kept\)"
  ):
    export_lib.export_treevae(path, model, model.init(jax.random.key(1), tree), tree, {})
  assert _snapshot(path) == before
  assert os.listdir(tmp_path) == ["export"]  # the partial one removed at once
  export_lib.load_treevae(path)


# ------------------------------------------------------------------------- one writer per workdir


def test_run_dir_names_the_layout_the_readme_documents():
  r = runs.RunDir("runs/demo")
  assert [r.checkpoints, r.export, r.tensorboard, r.stage1_metrics, r.tree_figure] == [
    "runs/demo/checkpoints",
    "runs/demo/export",
    "runs/demo/tensorboard",
    "runs/demo/stage1_metrics.json",
    "runs/demo/tree.png",
  ]
  assert [
    r.stage2,
    r.stage2_checkpoints,
    r.stage2_tensorboard,
    r.stage2_summary,
    r.stage2_tree_figure,
  ] == [
    "runs/demo/diffusion",
    "runs/demo/diffusion/checkpoints",
    "runs/demo/diffusion/tensorboard",
    "runs/demo/diffusion/train_summary.json",
    "runs/demo/diffusion/tree.png",
  ]
  assert [r.samples(), r.samples("recons"), r.samples_summary] == [
    "runs/demo/diffusion/samples",
    "runs/demo/diffusion/samples/recons",
    "runs/demo/diffusion/samples/summary.json",
  ]
  assert [
    r.classifier,
    r.eval,
    r.eval_metrics,
    r.eval_csv,
    r.eval_report,
    r.eval_cache,
    r.eval_step(1000),
    r.summary,
  ] == [
    "runs/demo/classifier",
    "runs/demo/eval",
    "runs/demo/eval/metrics.json",
    "runs/demo/eval/metrics.csv",
    "runs/demo/eval/report.md",
    "runs/demo/eval/cache",
    "runs/demo/eval/step_1000",
    "runs/demo/summary.md",
  ]
  assert (
    runs.RunDir("gs://bucket/run").stage2_checkpoints == "gs://bucket/run/diffusion/checkpoints"
  )


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  with lock.WorkdirLock(str(tmp_path), "stage 1"):
    with pytest.raises(WorkdirBusyError) as e:
      with lock.WorkdirLock(str(tmp_path), "stage 2"):
        pass
  msg = str(e.value)
  assert f"process {os.getpid()} on {socket.gethostname()}" in msg and "stage 1" in msg
  assert "\n" not in msg
  with lock.WorkdirLock(str(tmp_path), "stage 2"):  # released on exit
    pass


def test_the_lock_is_held_across_processes_and_released_when_its_holder_dies(tmp_path):
  hold = (
    "import sys, time; from tree_diffusion import lock\n"
    "with lock.WorkdirLock(sys.argv[1], 'holder'):\n"
    "  print('locked', flush=True); time.sleep(60)\n"
  )
  p = subprocess.Popen(
    [sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=f"process {p.pid} on .*holder"):
      with lock.WorkdirLock(str(tmp_path)):
        pass
  finally:
    p.kill()
    p.wait()
  # Killed: the kernel released its flock; its record is left in the file and taken over.
  assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == p.pid
  with lock.WorkdirLock(str(tmp_path), "next"):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_without_flock_a_live_recorded_process_refuses_and_with_it_a_reused_pid_does_not(
  tmp_path, monkeypatch
):
  """A file system without locks (flock fails with ENOLCK, as on some NFS mounts): the record of
  a live process on this host still refuses. Where flock works, a record whose process id is
  alive again (reused by another program) is taken over: the flock says its holder is gone."""
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (tmp_path / lock.LOCK_FILE).write_text(
      json.dumps({"pid": live.pid, "host": socket.gethostname(), "command": "stage 2"})
    )
    with lock.WorkdirLock(str(tmp_path)):
      pass
    (tmp_path / lock.LOCK_FILE).write_text(
      json.dumps({"pid": live.pid, "host": socket.gethostname(), "command": "stage 2"})
    )

    def no_locks(fd, op):
      raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with pytest.raises(WorkdirBusyError, match=f"process {live.pid} .*stage 2"):
      with lock.WorkdirLock(str(tmp_path)):
        pass
  finally:
    live.kill()
    live.wait()


@pytest.mark.parametrize("content", ["1", '{"pid": "x"}', "garbage\x00"])
def test_a_garbled_lock_record_is_taken_over(tmp_path, content):
  (tmp_path / lock.LOCK_FILE).write_text(content)
  with lock.WorkdirLock(str(tmp_path), "next"):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["command"] == "next"


def test_training_commands_refuse_a_locked_workdir_before_any_work(tmp_path):
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(), tmp_path / "run"
  _stage1_run(c, workdir, phase="grow", export=True)
  with lock.WorkdirLock(str(workdir), "another run"):
    before = _snapshot(workdir)
    with pytest.raises(WorkdirBusyError, match="another run"):
      tv_train.train_and_export(c, str(workdir))
    with pytest.raises(WorkdirBusyError, match="another run"):
      df_train.train_and_save(c, str(workdir))
    assert _snapshot(workdir) == before


# ------------------------------------------------------------------- readers next to a trainer


def _stage2_run(c, workdir, step):
  """A stage-1 run with a stage-2 checkpoint at ``step`` (initial parameters, no training)."""
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.diffusion.conditioning import make_denoiser

  model, _, tree = _stage1_run(c, workdir, export=True)
  d = c.diffusion
  denoiser = make_denoiser(d.conditioning, d.unet, d.dtype)
  state = df_train.init_state(
    denoiser,
    df_train.StepConfig.from_config(d),
    jax.random.key(0),
    df_train.example_condition(denoiser, model, tree),
    model.image_shape,
  )
  export = str((workdir / "export").resolve())
  ckpts = Stage2Checkpoints(str(workdir / "diffusion" / "checkpoints"))
  ckpts.save(
    step,
    state.replace(step=np.int32(step)),
    {
      "export": export,
      "conditioning": denoiser.conditioning.name,
      "data_identity": _identity(c),
      "export_fingerprint": export_lib.export_fingerprint(export),
      "config": checkpoint.config_sections(c, checkpoint.STAGE2_SECTIONS),
    },
  )
  ckpts.close()
  return workdir / "diffusion" / "checkpoints"


def test_rerunning_a_finished_stage2_changes_nothing(tmp_path):
  from tree_diffusion.diffusion import train as df_train

  c, workdir = tiny_config(), tmp_path / "run"
  _stage2_run(c, workdir, c.diffusion.num_steps)
  (workdir / "diffusion" / "train_summary.json").write_text('{"steps": 3, "wall_time_s": 60.0}')
  before = _snapshot(workdir / "diffusion")
  assert df_train.train_and_save(c, str(workdir)) == {"steps": 3, "wall_time_s": 60.0}
  after = _snapshot(workdir / "diffusion")
  # The config is recorded (this run predates it), once: a second re-run changes no file at all.
  assert json.loads(after.pop("config.json")[1])["diffusion"]["num_steps"] == 3
  assert after == before
  before = _snapshot(workdir / "diffusion")
  df_train.train_and_save(c, str(workdir))
  assert _snapshot(workdir / "diffusion") == before


def test_sampling_next_to_a_running_trainer_leaves_its_checkpoints_alone(tmp_path):
  from tree_diffusion.diffusion import generate

  c, workdir = tiny_config(), tmp_path / "run"
  directory = _stage2_run(c, workdir, 2)
  in_flight = directory / "4.orbax-checkpoint-tmp-1234567"  # what a trainer is writing
  in_flight.mkdir()
  (in_flight / "part").write_text("being written")
  before = _snapshot(directory)
  s = generate.load_stage2(c, str(workdir))
  s = generate.with_checkpoint(s, str(workdir), 2)
  assert s.step == 2
  assert _snapshot(directory) == before


# ------------------------------------------------------------------ data that changes under a run


def test_identity_names_what_changed():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8)
  labels = np.array([0, 1, 0, 1, 0, 1], np.int32)
  a = lambda im, lab: data.Arrays(im, lab, 2)
  base = data.identity(a(images[:4], labels[:4]), a(images[4:], labels[4:]))
  assert {k: base[k] for k in ("train", "test", "classes")} == {"train": 4, "test": 2, "classes": 2}
  assert (
    data.identity_change(base, data.identity(a(images[:4], labels[:4]), a(images[4:], labels[4:])))
    is None
  )
  edited = images.copy()
  edited[0, 0, 0, 0] ^= 1
  assert data.identity_change(
    base, data.identity(a(edited[:4], labels[:4]), a(edited[4:], labels[4:]))
  ) == ("same counts (4 train, 2 test), other contents or another train/test split")
  # The same six images, another split.
  assert data.identity_change(
    base, data.identity(a(images[2:], labels[2:]), a(images[:2], labels[:2]))
  ) == ("same counts (4 train, 2 test), other contents or another train/test split")
  assert data.identity_change(
    base, data.identity(a(images[:3], labels[:3]), a(images[4:], labels[4:]))
  ) == ("train 4 -> 3 images")


def _remove_images(folder, n):
  for name in sorted(os.listdir(folder))[:n]:
    os.remove(os.path.join(folder, name))


def test_stage1_refuses_to_resume_on_a_changed_dataset(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = _folder_config(tmp_path), tmp_path / "run"
  _stage1_run(c, workdir, phase="grow", export=False)
  _remove_images(tmp_path / "images", 3)
  # 64 images: 6 held out for 'test' (10 %, rounded), 58 train; 61: 6 and 55.
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"dataset changed since stage-1 checkpoint 7 .*\(train 58 -> 55 images\)"
    r": put the images back",
  ):
    tv_train.train_and_export(c, str(workdir))
  assert not (workdir / "export").exists()


def test_stage2_refuses_a_dataset_that_changed_since_stage1(tmp_path):
  from tree_diffusion.diffusion import train as df_train

  c, workdir = _folder_config(tmp_path), tmp_path / "run"
  _stage1_run(c, workdir)
  _remove_images(tmp_path / "images", 3)
  with pytest.raises(
    ConfigError,
    match=r"dataset changed since the stage-1 export .*"
    r"\(train 58 -> 55 images\)",
  ):
    df_train.train_and_save(c, str(workdir))
  assert not (workdir / "diffusion" / "checkpoints").exists()


def test_a_moved_or_copied_folder_is_the_same_dataset(tmp_path, caplog):
  """Stage-1 resume, stage 2 on the export and stage-2 resume accept the same images at another
  path, with an info line naming both paths; other images at the new path are still refused."""
  import logging
  import shutil
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.diffusion.conditioning import make_denoiser
  from tree_diffusion.treevae import train as tv_train

  c, workdir = _folder_config(tmp_path), tmp_path / "run"
  old, new, other = (str(tmp_path / n) for n in ("images", "copy", "other"))
  identity = _identity(c)
  model, variables, tree = _stage1_run(c, workdir, export=False)
  export_lib.export_treevae(
    str(workdir / "export"),
    model,
    variables,
    tree,
    {
      "config": json.loads(c.to_json_best_effort()),
      "metrics": {"test": {"nmi": 0.5}, "num_leaves": tree.num_leaves},
    },
    data_identity=identity,
  )
  (workdir / "tree.png").write_bytes(b"figure")
  d = c.diffusion
  denoiser = make_denoiser(d.conditioning, d.unet, d.dtype)
  state = df_train.init_state(
    denoiser,
    df_train.StepConfig.from_config(d),
    jax.random.key(0),
    df_train.example_condition(denoiser, model, tree),
    model.image_shape,
  )
  export = str(workdir / "export")
  ckpts = Stage2Checkpoints(str(workdir / "diffusion" / "checkpoints"))
  ckpts.save(
    d.num_steps,
    state.replace(step=np.int32(d.num_steps)),
    {
      "export": export,
      "conditioning": denoiser.conditioning.name,
      "data_identity": identity,
      "export_fingerprint": export_lib.export_fingerprint(export),
      "config": checkpoint.config_sections(c, checkpoint.STAGE2_SECTIONS),
    },
  )
  ckpts.close()
  (workdir / "diffusion" / "train_summary.json").write_text('{"steps": 3}')
  # A byte-for-byte copy (new modification times, so a new build of the dataset), the original
  # gone.
  shutil.copytree(old, new, copy_function=shutil.copyfile)
  shutil.copytree(old, other)
  shutil.rmtree(old)
  c.data.folder = new
  with caplog.at_level(logging.INFO):
    assert tv_train.train_and_export(c, str(workdir))["test"]["nmi"] == 0.5
    assert df_train.train_and_save(c, str(workdir)) == {"steps": 3}
  said = [r.getMessage() for r in caplog.records]
  for what in ("stage-1 checkpoint 7", f"the stage-1 export {export}", "stage-2 checkpoint 3"):
    assert (
      f"{what} was trained on the images in {old}; they are now read from {new} (the same "
      f"images, labels and split)"
    ) in said, said
  # Other images at another path: refused as before.
  _remove_images(other, 3)
  c.data.folder = other
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"dataset changed since stage-1 checkpoint "
    r"7 .*\(train 58 -> 55 images\)",
  ):
    tv_train.train_and_export(c, str(workdir))
  with pytest.raises(
    ConfigError,
    match=r"dataset changed since the stage-1 export .*"
    r"\(train 58 -> 55 images\)",
  ):
    df_train.train_and_save(c, str(workdir))


# ------------------------------------------------------------------------------- too few images


def test_fewer_training_images_than_one_batch_are_refused_before_any_work(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(stage1__batch_size=4096), tmp_path / "run"  # mnist_5k: 4,000 train
  with pytest.raises(
    ConfigError,
    match="4000 training images are fewer than one batch of 4096.*--config.stage1.batch_size",
  ):
    tv_train.train_and_export(c, str(workdir))
  assert not (workdir / "checkpoints").exists() and not (workdir / "export").exists()


def test_a_rerun_rewrites_a_metrics_file_cut_short_after_the_export(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(), tmp_path / "run"
  _stage1_run(c, workdir)
  (workdir / "tree.png").write_bytes(b"figure")
  (workdir / "stage1_metrics.json").write_text('{"test": {"nm')  # the disk filled up here
  tv_train.train_and_export(c, str(workdir))
  assert json.loads((workdir / "stage1_metrics.json").read_text())["test"]["nmi"] == 0.5


def test_a_stale_old_export_does_not_block_the_next_swap(tmp_path):
  from tree_diffusion.treevae import train as tv_train

  c = tiny_config()
  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  path = tmp_path / "export"
  export_lib.export_treevae(str(path), model, model.init(jax.random.key(0), tree), tree, {})
  (tmp_path / f"export.old-{os.getpid()}").mkdir()  # a run killed after its swap
  (tmp_path / f"export.old-{os.getpid()}" / "x").write_text("x")
  export_lib.export_treevae(str(path), model, model.init(jax.random.key(1), tree), tree, {})
  export_lib.load_treevae(str(path))
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_rerunning_a_finished_stage1_with_other_metric_settings_recomputes_only_the_metrics(
  tmp_path,
):
  from tree_diffusion.treevae import train as tv_train

  c, workdir = tiny_config(), tmp_path / "run"
  _stage1_run(c, workdir)
  meta = json.loads((workdir / "export" / "meta.json").read_text())
  meta["config"] = json.loads(c.to_json_best_effort())  # final_elbo=True (demo:tiny)
  (workdir / "export" / "meta.json").write_text(json.dumps(meta))
  fingerprint = export_lib.export_fingerprint(str(workdir / "export"))
  c.stage1.final_elbo = False
  metrics = tv_train.train_and_export(c, str(workdir))
  assert metrics["test"]["nmi"] != 0.5 and "elbo" not in metrics["test"]  # computed again
  assert export_lib.export_fingerprint(str(workdir / "export")) == fingerprint
