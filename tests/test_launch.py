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


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / "run"
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((workdir / "stage1_metrics.json").read_text())
  assert metrics["num_leaves"] >= 2 and 0.0 <= metrics["test"]["nmi"] <= 1.0
  assert (workdir / "tree.png").stat().st_size > 1000
  assert (workdir / "export" / "meta.json").exists()
  from tree_diffusion import checkpoint
  model, variables, tree = checkpoint.load_treevae(str(workdir / "export"))
  assert tree.num_leaves == metrics["num_leaves"]
  # Re-running the same command resumes from the last checkpoint: nothing left to train.
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from checkpoint" in r.stderr

  # Stage 2 on that export, then every sampling mode.
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}", script="train_diffusion.py")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((workdir / "diffusion" / "train_summary.json").read_text())
  assert summary["steps"] == 3 and summary["conditioning"] == "path"
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}", script="sample.py")
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
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}", script="train_diffusion.py")
  assert r.returncode == 0 and "resumed stage 2 from checkpoint 3" in r.stderr, r.stderr[-3000:]
  r = _run("--config=configs/demo.py:tiny", f"--workdir={workdir}", "--modes=sampel",
           script="sample.py", timeout=120)
  assert r.returncode != 0 and "unknown mode" in r.stderr and "Traceback" not in r.stderr


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
