"""tree_diffusion.load_run and launch/assign.py: new image files placed as the model places the
pixels PIL reads from them; synthetic images per leaf; the launcher's one-line refusals."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import tree_diffusion
from launchers import ODD_NAMES, run
from tree_diffusion import data, image_files
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.model import TreeVAE

TREE = Tree((0, 1, 2, 5, 6))  # leaves 1, 5, 6
MODEL = TreeVAE(latent_channels=(2, 2, 2, 2), bottom_up_channels=(4, 4, 4, 4))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory with a stage-1 export (initial weights), its config and metrics."""
  root = tmp_path_factory.mktemp("trained") / "run"
  variables = MODEL.init(jax.random.key(0), TREE)
  export_lib.export_treevae(str(root / "export"), MODEL, variables, TREE, {})
  config = {
    "data": {"name": "folder", "image_size": 28, "channels": 1, "resize": False},
    "stage1": {"eval_batch_size": 3},
    "diffusion": {"treevae_export": ""},
  }
  (root / "config.json").write_text(json.dumps(config))
  (root / "stage1_metrics.json").write_text(json.dumps({"train": {"leaf_counts": [70, 20, 10]}}))
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """7 digit-like PNGs (4 with odd names, one in a subfolder), a corrupt .png and a .txt."""
  root = tmp_path_factory.mktemp("new") / "images"
  (root / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = list(ODD_NAMES) + ["x.png", "y.png", os.path.join("sub", "z.png")]
  for name in names:
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / name)
  (root / "broken.png").write_bytes(b"not a png")
  (root / "notes.txt").write_text("not an image")
  return root


def test_load_run_places_files_as_the_model_places_their_pixels(workdir, folder):
  run_ = tree_diffusion.load_run(str(workdir))
  assert run_.tree == TREE and run_.image_shape == (28, 28, 1) and run_.batch_size == 3
  assert run_.metrics["train"]["leaf_counts"] == [70, 20, 10] and run_.eval_metrics == {}
  names, skipped = data.list_image_files(str(folder))
  assert [os.path.basename(s) for s in skipped] == ["notes.txt"]
  assert sorted(names) == sorted(list(ODD_NAMES) + ["x.png", "y.png", "sub/z.png", "broken.png"])
  paths = [str(folder / n) for n in names]
  seen = []
  placed = run_.assign_files(paths, progress=lambda done, total: seen.append((done, total)))
  assert [os.path.basename(p) for p in placed.skipped] == ["broken.png"]
  good = [p for p in paths if not p.endswith("broken.png")]
  assert list(placed.files) == good and seen[-1] == (8, 8)
  x = np.stack([np.asarray(Image.open(p), np.float32)[..., None] / 255.0 for p in good])
  want = np.asarray(MODEL.leaf_probabilities(run_.variables, TREE, x))
  np.testing.assert_allclose(placed.probs, want, rtol=1e-5, atol=1e-7)
  assert placed.leaves.tolist() == [TREE.leaves[k] for k in want.argmax(1)]
  # Another size: refused without resize, center-cropped and resized with it.
  big = folder.parent / "big.png"
  Image.fromarray(np.zeros((30, 40), np.uint8)).save(big)
  with pytest.raises(image_files.ImageSizeError):
    run_.assign_files([str(big)])
  assert run_.assign_files([str(big)], resize=True).probs.shape == (1, 3)


def test_export_counts_share_images_by_training_leaf_size(workdir):
  run_ = tree_diffusion.load_run(str(workdir))
  # 13 = one per leaf + 10 shared 70:20:10.
  assert run_.export_counts(None, 13) == {1: 8, 5: 3, 6: 2}
  assert run_.export_counts(None, 4) == {1: 2, 5: 1, 6: 1}  # 1 by size, the rest one each
  assert run_.export_counts(4, None) == {1: 4, 5: 4, 6: 4}
  with pytest.raises(ValueError, match="fewer than the 3 leaves.*total >= 3"):
    run_.export_counts(None, 2)


def test_export_images_writes_the_treevae_s_prior_samples_per_leaf(workdir, tmp_path):
  run_ = tree_diffusion.load_run(str(workdir))
  assert not run_.has_stage2
  out_dir = tmp_path / "synthetic"
  (out_dir / "leaf_99").mkdir(parents=True)  # an earlier export's folder: replaced
  (out_dir / "keep.txt").write_text("mine")
  out = run_.export_images(str(out_dir), per_leaf=2, seed=3)
  assert out["generator"] == "treevae" and out["counts"] == {1: 2, 5: 2, 6: 2}
  assert sorted(os.listdir(out_dir)) == ["index.csv", "keep.txt", "leaf_1", "leaf_5", "leaf_6"]
  with open(out_dir / "index.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["file"], r["leaf"], r["path"], r["generator"], r["draw"]) for r in rows][:3] == [
    ("leaf_1/0.png", "1", "0/1", "treevae", "0"),
    ("leaf_1/1.png", "1", "0/1", "treevae", "1"),
    ("leaf_5/0.png", "5", "0/2/5", "treevae", "0"),
  ]
  # The TreeVAE's prior samples of the same key (the first chunk's key: fold_in(key, 0)).
  gen = MODEL.generate(run_.variables, TREE, jax.random.fold_in(jax.random.key(3), 0), 2)
  for r in rows:
    k, i = TREE.leaf_index(int(r["leaf"])), int(r["draw"])
    want = np.rint(np.clip(np.asarray(gen["images"][k, i, ..., 0]), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / r["file"])), want)


@pytest.mark.slow
def test_assign_py_writes_the_csv_and_refuses_bad_input_in_one_line(workdir, folder, tmp_path):
  out = tmp_path / "out dir" / "placed ü.csv"
  r = run(
    f"--workdir={workdir}", f"--images={folder}", f"--output={out}", script="assign.py", timeout=300
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "placed 7 images into 3 leaves" in r.stdout and "skipped 2 file(s)" in r.stdout
  with open(out, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r_["file"] for r_ in rows] == sorted(list(ODD_NAMES) + ["x.png", "y.png", "sub/z.png"])
  x = np.stack(
    [np.asarray(Image.open(folder / r_["file"]), np.float32)[..., None] / 255.0 for r_ in rows]
  )
  _, variables, _ = export_lib.load_treevae(str(workdir / "export"))
  want = np.asarray(MODEL.leaf_probabilities(variables, TREE, x))
  for row, p in zip(rows, want):
    k = int(np.argmax(p))
    assert int(row["leaf"]) == TREE.leaves[k] and row["path"] == "/".join(
      map(str, TREE.path(TREE.leaves[k]))
    )
    assert float(row["leaf_probability"]) == pytest.approx(p[k], rel=1e-5)

  def refused(*args, match):
    r = run(*args, script="assign.py", timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr[-3000:]

  blocker = tmp_path / "a file"
  blocker.write_text("")
  refused(
    f"--workdir={workdir}",
    f"--images={folder}",
    f"--output={blocker}/x.csv",
    match="is not writable",
  )
  big = tmp_path / "big"
  big.mkdir()
  Image.fromarray(np.zeros((30, 30), np.uint8)).save(big / "b.png")
  refused(
    f"--workdir={workdir}",
    f"--images={big}",
    f"--output={tmp_path / 'b.csv'}",
    match="pass --resize",
  )
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "bad.png").write_bytes(b"no")
  refused(
    f"--workdir={workdir}",
    f"--images={tmp_path / 'empty'}/*.png",
    f"--output={tmp_path / 'c.csv'}",
    match="could be read as an image",
  )
  (tmp_path / "unfinished").mkdir()
  (tmp_path / "unfinished" / "config.json").write_text("{}")
  refused(
    f"--workdir={tmp_path / 'unfinished'}",
    f"--images={folder}",
    f"--output={tmp_path / 'd.csv'}",
    match="train stage 1 first",
  )
  assert not any(os.path.exists(tmp_path / f"{c}.csv") for c in "bcd")
