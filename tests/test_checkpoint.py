"""Stage-1 checkpoints (round trip with a grown tree) and the export → load_treevae hand-off."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion import checkpoint
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE, grow_variables

TINY = TreeVAE(latent_channels=(2,) * 4, bottom_up_channels=(4,) * 4)


def _grown():
  tree0 = Tree.complete(1)
  return grow_variables(TINY, TINY.init(jax.random.key(0), tree0), tree0, 2, jax.random.key(1))


def test_checkpoint_round_trip(tmp_path):
  tree, v = _grown()
  ckpts = checkpoint.Stage1Checkpoints(str(tmp_path), max_to_keep=2)
  cursor = {"phase": "grow", "iteration": 1, "not_expandable": [], "phase_id": 3}
  ckpts.save(1, TINY.init(jax.random.key(5), Tree.complete(1)), Tree.complete(1), cursor)
  ckpts.save(2, v, tree, cursor)
  ckpts.close()
  step, restored, rtree, meta = checkpoint.Stage1Checkpoints(str(tmp_path)).restore(TINY)
  assert step == 2 and rtree == tree and meta["cursor"] == cursor
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(restored)


def test_export_and_load_give_identical_outputs(tmp_path):
  tree, v = _grown()
  path = tmp_path / "export"
  checkpoint.export_treevae(str(path), TINY, v, tree, {"metrics": {"nmi": 0.5}})
  model, variables, loaded_tree = checkpoint.load_treevae(str(path))
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
    checkpoint.load_treevae(str(tmp_path))


# ------------------------------------------------------------------- stage 1 → stage 2


def _stage2_config(**data):
  from configs import demo
  c = demo.get_config("tiny")
  c.data.update(data)
  return c


def test_stage2_loads_the_export_it_is_pointed_at(tmp_path):
  from tree_diffusion.diffusion import train as train_lib
  tree, v = _grown()
  run = tmp_path / "run"
  checkpoint.export_treevae(str(run / "export"), TINY, v, tree, {})
  c = _stage2_config()
  model, variables, loaded, path, fingerprint, _ = train_lib.load_stage1(c, str(run))
  assert model == TINY and loaded == tree and path == str((run / "export").resolve())
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # The fingerprint identifies the export: another export has another one.
  checkpoint.export_treevae(str(tmp_path / "other"), TINY, v, tree,
                            {"metrics": {"nmi": 0.1}})
  assert checkpoint.export_fingerprint(str(tmp_path / "other")) != fingerprint


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist: train stage 1 first"),
    ("workdir", "looks like a training workdir"),
    ("shape", "was trained on 28x28x1 images but config.data"),
])
def test_stage2_refuses_a_wrong_export(tmp_path, case, match):
  from tree_diffusion.diffusion import train as train_lib
  from tree_diffusion.errors import ConfigError
  tree, v = _grown()
  run = tmp_path / "run"
  checkpoint.export_treevae(str(run / "export"), TINY, v, tree, {})
  (run / "checkpoints").mkdir()
  c = _stage2_config(image_size=32) if case == "shape" else _stage2_config()
  if case == "missing":
    c.diffusion.treevae_export = str(tmp_path / "nowhere")
  if case == "workdir":
    c.diffusion.treevae_export = str(run)
  with pytest.raises((checkpoint.CheckpointError, ConfigError), match=match):
    train_lib.load_stage1(c, str(run))


def test_stage2_refuses_checkpoints_of_another_export(tmp_path):
  from tree_diffusion.diffusion import train as train_lib
  tree, v = _grown()
  run = tmp_path / "run"
  checkpoint.export_treevae(str(run / "export"), TINY, v, tree, {})
  ckpts = checkpoint.Stage2Checkpoints(str(run / "diffusion" / "checkpoints"))
  ckpts.save(5, {"w": jnp.zeros((2,))}, {"export": "/elsewhere/export",
                                         "export_fingerprint": "0123456789abcdef"})
  ckpts.close()
  with pytest.raises(checkpoint.CheckpointError, match="trained on the stage-1 export /elsewhere"):
    train_lib.train_and_save(_stage2_config(), str(run))
  with pytest.raises(checkpoint.CheckpointError, match="no stage-2 checkpoint 7"):
    checkpoint.Stage2Checkpoints(str(run / "diffusion" / "checkpoints")).read_meta(7)
