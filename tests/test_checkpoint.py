"""Stage-1 checkpoints (round trip with a grown tree) and the export → load_treevae hand-off."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion import checkpoint
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.checkpoints import Stage1Checkpoints
from tree_diffusion.treevae.model import TreeVAE, grow_variables

TINY = TreeVAE(latent_channels=(2,) * 4, bottom_up_channels=(4,) * 4)


def _grown():
  tree0 = Tree.complete(1)
  return grow_variables(TINY, TINY.init(jax.random.key(0), tree0), tree0, 2, jax.random.key(1))


def _grown_other():
  tree0 = Tree.complete(1)
  return grow_variables(TINY, TINY.init(jax.random.key(2), tree0), tree0, 2, jax.random.key(1))[1]


def test_the_schedule_cursor_reads_old_and_new_checkpoints_and_refuses_unknown_phases():
  from tree_diffusion.treevae.cursor import Cursor, Split

  old = {"phase": "grow", "iteration": 1, "not_expandable": [4], "phase_id": 3}  # no optional keys
  c = Cursor.from_json(old)
  assert (c.phase, c.iteration, c.not_expandable, c.phase_id) == ("grow", 1, (4,), 3)
  assert not c.intermediate_done and c.split is None and c.in_phase_step is None
  assert c.to_json() == {**old, "intermediate_done": False}
  inside = {
    "phase": "small_tree",
    "iteration": 2,
    "not_expandable": [],
    "phase_id": 5,
    "intermediate_done": True,
    "split": {"leaf": 4, "n_effective": 3, "num_indices": 96},
    "in_phase": {"step": 40},
  }
  c = Cursor.from_json(inside)
  assert c.split == Split(leaf=4, n_effective=3, num_indices=96) and c.in_phase_step == 40
  assert c.to_json() == inside
  moved = c.to("grow", split=None, in_phase_step=None)
  assert moved.phase == "grow" and moved.split is None and c.phase == "small_tree"  # c unchanged
  with pytest.raises(ValueError, match="unknown stage-1 phase 'grw'"):
    c.to("grw")


def test_checkpoint_round_trip(tmp_path):
  tree, v = _grown()
  ckpts = Stage1Checkpoints(str(tmp_path), max_to_keep=2)
  cursor = {"phase": "grow", "iteration": 1, "not_expandable": [], "phase_id": 3}
  ckpts.save(1, TINY.init(jax.random.key(5), Tree.complete(1)), Tree.complete(1), cursor)
  ckpts.save(2, v, tree, cursor)
  ckpts.close()
  step, restored, rtree, meta, phase = Stage1Checkpoints(str(tmp_path)).restore(TINY)
  assert step == 2 and rtree == tree and meta["cursor"] == cursor and phase == {}
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(restored)


def test_export_and_load_give_identical_outputs(tmp_path):
  tree, v = _grown()
  path = tmp_path / "export"
  export_lib.export_treevae(str(path), TINY, v, tree, {"metrics": {"nmi": 0.5}})
  model, variables, loaded_tree = export_lib.load_treevae(str(path))
  assert model == TINY and loaded_tree == tree
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
  # One compiled function for both (the model and tree are equal, so is the trace).
  probs = jax.jit(lambda v: TINY.leaf_probabilities(v, tree, x))
  np.testing.assert_array_equal(probs(v), probs(variables))
  gen = jax.jit(lambda v: TINY.generate(v, tree, jax.random.key(3), 2)["images"])
  np.testing.assert_array_equal(gen(v), gen(variables))
  meta = json.loads((path / "meta.json").read_text())
  assert meta["metrics"]["nmi"] == 0.5 and meta["tree"]["nodes"] == list(tree.nodes)


def test_load_treevae_refuses_a_training_workdir(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="export"):
    export_lib.load_treevae(str(tmp_path))


# ------------------------------------------------------------------- stage 1 → stage 2


def _stage2_config(**data):
  from configs import demo

  c = demo.get_config("tiny")
  c.data.update(data)
  return c


def test_stage2_loads_the_export_it_is_pointed_at(tmp_path):
  from tree_diffusion.diffusion import frozen

  tree, v = _grown()
  run = tmp_path / "run"
  export_lib.export_treevae(str(run / "export"), TINY, v, tree, {})
  c = _stage2_config()
  model, variables, loaded, path, fingerprint, _ = frozen.load_stage1(c, str(run))
  assert model == TINY and loaded == tree and path == str((run / "export").resolve())
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # The fingerprint identifies the model: another export of other variables has another one.
  export_lib.export_treevae(str(tmp_path / "other"), TINY, _grown_other(), tree, {})
  assert export_lib.export_fingerprint(str(tmp_path / "other")) != fingerprint


@pytest.mark.parametrize(
  "case,match",
  [
    ("missing", "does not exist: train stage 1 first"),
    ("workdir", "looks like a training workdir"),
    ("shape", "was trained on 28x28x1 images but config.data"),
  ],
)
def test_stage2_refuses_a_wrong_export(tmp_path, case, match):
  from tree_diffusion.diffusion import frozen
  from tree_diffusion.errors import ConfigError

  tree, v = _grown()
  run = tmp_path / "run"
  export_lib.export_treevae(str(run / "export"), TINY, v, tree, {})
  (run / "checkpoints").mkdir()
  c = _stage2_config(image_size=32) if case == "shape" else _stage2_config()
  if case == "missing":
    c.diffusion.treevae_export = str(tmp_path / "nowhere")
  if case == "workdir":
    c.diffusion.treevae_export = str(run)
  with pytest.raises((checkpoint.CheckpointError, ConfigError), match=match):
    frozen.load_stage1(c, str(run))


def test_stage2_refuses_checkpoints_of_another_export(tmp_path):
  from tree_diffusion.diffusion import train as train_lib

  tree, v = _grown()
  run = tmp_path / "run"
  export_lib.export_treevae(str(run / "export"), TINY, v, tree, {})
  ckpts = Stage2Checkpoints(str(run / "diffusion" / "checkpoints"))
  ckpts.save(
    5,
    {"w": jnp.zeros((2,))},
    {"export": "/elsewhere/export", "export_fingerprint": "0123456789abcdef"},
  )
  ckpts.close()
  with pytest.raises(checkpoint.CheckpointError, match="trained on the stage-1 export /elsewhere"):
    train_lib.train_and_save(_stage2_config(), str(run))
  with pytest.raises(checkpoint.CheckpointError, match="no stage-2 checkpoint 7"):
    Stage2Checkpoints(str(run / "diffusion" / "checkpoints")).read_meta(7)


# ------------------------------------------------------------- damaged and foreign checkpoints

STATE = {"w": np.arange(50_000, dtype=np.float32), "b": np.ones((3, 3), np.float32)}
ABSTRACT = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in STATE.items()}


def _two_checkpoints(directory, meta=None):
  ckpts = Stage2Checkpoints(str(directory))
  for step in (1, 2):
    ckpts.save(step, {k: v + step for k, v in STATE.items()}, dict(meta or {}, step=step))
  ckpts.close()


def _files(directory):
  return sorted(
    (os.path.relpath(os.path.join(r, f), directory), os.path.getsize(os.path.join(r, f)))
    for r, _, fs in os.walk(directory)
    for f in fs
  )


def _damage(step_dir, how):
  if how == "bad_json":
    (step_dir / "meta" / "metadata").write_text('{"step": ')
    return
  data = max(
    (
      os.path.join(r, f)
      for r, _, fs in os.walk(step_dir / "state")
      for f in fs
      if "/d/" in os.path.join(r, f)
    ),
    key=os.path.getsize,
  )
  with open(data, "r+b") as f:
    if how == "truncated":
      f.truncate(os.path.getsize(data) // 2)
    else:  # garbled bytes in the middle: Orbax reads them back without noticing
      f.seek(os.path.getsize(data) // 2)
      f.write(b"\x5a" * 64)


@pytest.mark.parametrize("how", ["truncated", "garbled", "bad_json"])
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, how):
  directory = tmp_path / "checkpoints"
  _two_checkpoints(directory)
  _damage(directory / "2", how)
  damaged = _files(directory / "2")
  ckpts = Stage2Checkpoints(str(directory))
  step, state, meta = ckpts.restore_latest(lambda meta: ABSTRACT)
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(state["w"], STATE["w"] + 1)
  # The damaged one is moved aside untouched, so that step 2 can be written again.
  assert ckpts.all_steps() == [1] and _files(tmp_path / "checkpoints.unreadable" / "2") == damaged
  ckpts.save(2, STATE, {})
  assert ckpts.all_steps() == [1, 2]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _two_checkpoints(directory)
  _damage(directory / "1", "truncated")
  _damage(directory / "2", "bad_json")
  before = _files(directory)
  with pytest.raises(checkpoint.CheckpointError, match="no stage-2 checkpoint in .* can be read"):
    Stage2Checkpoints(str(directory)).restore_latest(lambda meta: ABSTRACT)
  assert _files(directory) == before


def test_a_half_written_checkpoint_is_ignored_and_removed(tmp_path):
  directory = tmp_path / "checkpoints"
  _two_checkpoints(directory)
  # What a process killed while saving step 3 leaves behind: Orbax's temporary directory.
  shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp")
  (directory / "3.orbax-checkpoint-tmp" / "commit_success.txt").unlink(missing_ok=True)
  ckpts = Stage2Checkpoints(str(directory))
  assert ckpts.restore_latest(lambda meta: ABSTRACT)[0] == 2
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_config_differences_name_each_changed_key():
  saved = {"a": {"x": 1, "y": [1, 2], "s": {"deep": "p"}}, "b": 0.5}
  now = {"a": {"x": 1, "y": [1, 3], "s": {"deep": "q"}, "new": 1}, "b": 0.5}
  assert checkpoint.config_differences(saved, now) == [
    "a.new: '<missing>' (checkpoint) → 1 (now)",
    "a.s.deep: 'p' (checkpoint) → 'q' (now)",
    "a.y: [1, 2] (checkpoint) → [1, 3] (now)",
  ]
  assert checkpoint.config_differences(saved, now, ignore=("a.s", "a.y", "a.new")) == []


def test_a_checkpoint_of_another_config_or_version_is_refused(tmp_path):
  directory = tmp_path / "checkpoints"
  c = _stage2_config()
  _two_checkpoints(directory, {"config": checkpoint.config_sections(c, checkpoint.STAGE2_SECTIONS)})
  restore = lambda c: Stage2Checkpoints(str(directory)).restore_for_training(
    lambda: ABSTRACT, c, lambda step, meta: None
  )
  assert restore(c)[0] == 2
  c.diffusion.num_steps = 50  # only moves the end: resumable
  c.diffusion.log_every_steps = 7
  assert restore(c)[0] == 2
  c.diffusion.lr = 2e-3
  c.data.test_fraction = 0.2
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"another config \(data.test_fraction: 0.1 \(checkpoint\) → 0.2 \(now\); "
    r"diffusion.lr: 0.001 \(checkpoint\) → 0.002 \(now\)\)",
  ):
    restore(c)
  meta_file = directory / "2" / "meta" / "metadata"
  meta_file.write_text(meta_file.read_text().replace(checkpoint.__version__, "0.0.1"))
  with pytest.raises(checkpoint.CheckpointError, match="written by tree_diffusion 0.0.1, this is"):
    restore(_stage2_config())
  assert Stage2Checkpoints(str(directory)).all_steps() == [1, 2]  # nothing moved


def test_stage2_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  from tree_diffusion.diffusion import train as train_lib
  from tree_diffusion.errors import TrainingDivergedError

  tree, v = _grown()
  run = tmp_path / "run"
  export_lib.export_treevae(str(run / "export"), TINY, v, tree, {})

  def diverging_step(state, tvae_vars, images, key, **static):  # step 3 returns NaN
    del tvae_vars, images, key, static
    loss = jnp.where(state.step >= 2, jnp.nan, 1.0)
    return state.replace(step=state.step + 1), {"loss": loss, "grad_norm": jnp.float32(0.5)}

  monkeypatch.setattr(train_lib, "train_step", diverging_step)
  c = _stage2_config()
  c.diffusion.num_steps = 5  # tiny: checkpoints every 2 steps, logs every step
  directory = run / "diffusion" / "checkpoints"
  with pytest.raises(
    TrainingDivergedError,
    match=f"non-finite loss in stage 2 between steps 3 and 3 .mean loss nan, "
    f"grad_norm 0.5.; nothing was saved after it, the last good one is "
    f"checkpoint 2 in {directory} .kept.",
  ):
    train_lib.train_and_save(c, str(run))
  assert Stage2Checkpoints(str(directory)).all_steps() == [2]


def test_after_stage2_diverges_the_command_it_suggests_trains_on_the_same_export(tmp_path):
  """A learning rate that diverges: the error names the learning rate and a new workdir on the
  run's export; that command trains, and a resume of it with another stage-2 setting is refused
  naming the same way forward."""
  from tree_diffusion.diffusion import train as train_lib
  from tree_diffusion.errors import TrainingDivergedError

  tree, v = _grown()
  run = tmp_path / "run"
  export_lib.export_treevae(str(run / "export"), TINY, v, tree, {})
  c = _stage2_config()
  c.diffusion.lr = 1e30
  with pytest.raises(TrainingDivergedError) as e:
    train_lib.train_and_save(c, str(run))
  message = str(e.value)
  assert (
    "Re-run with a lower --config.diffusion.lr (now 1e+30; or a lower "
    "--config.diffusion.grad_clip, now 1) in a new --workdir on this run's stage-1 export: "
    "--workdir=NEW --config.diffusion.treevae_export=" in message
  ), message
  export = re.search(r"--config\.diffusion\.treevae_export=(\S+)", message).group(1)
  assert export == str((run / "export").resolve())
  c.diffusion.lr, c.diffusion.treevae_export = 1e-3, export
  new = tmp_path / "new"
  assert train_lib.train_and_save(c, str(new))["steps"] == c.diffusion.num_steps
  assert not (new / "export").exists()
  # Resuming that run with another learning rate: refused, with the same way forward.
  c.diffusion.lr = 5e-4
  with pytest.raises(
    checkpoint.CheckpointError,
    match=re.escape(
      "diffusion.lr: 0.001 (checkpoint) → 0.0005 (now)): resume "
      "with the original settings, or start afresh with a new "
      "--workdir on this run's stage-1 export: pass "
      f"--config.diffusion.treevae_export={export}"
    ),
  ):
    train_lib.train_and_save(c, str(new))
  # Another dataset is no stage-2 setting: the export is no way forward then.
  c.diffusion.lr, c.data.seed = 1e-3, 1
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"\(now\)\): resume with the original settings, or start afresh "
    r"with a new --workdir$",
  ):
    train_lib.train_and_save(c, str(new))


def test_stage1_divergence_names_the_learning_rate_and_a_new_workdir(tmp_path, monkeypatch):
  from configs import demo
  from tree_diffusion.errors import TrainingDivergedError
  from tree_diffusion.treevae import train as tv_train

  def diverging_step(state, images, key, alpha, lr, **static):
    del images, key, alpha, lr, static
    nan = jnp.float32(jnp.nan)
    return state, {k: nan for k in ("loss", "rec", "kl_root", "kl_nodes", "kl_decisions", "aug")}

  monkeypatch.setattr(tv_train, "train_step", diverging_step)
  c = demo.get_config("tiny")
  with pytest.raises(
    TrainingDivergedError,
    match=r"non-finite loss in stage 1, initial, epoch 1, .* the last good one is "
    r"none yet .*\. Re-run with a lower --config\.stage1\.lr \(now 0\.001\) "
    r"in a new --workdir \(a resume in this one keeps its checkpoints' "
    r"learning rate\), or check the data$",
  ):
    tv_train.train_and_export(c, str(tmp_path / "run"))
