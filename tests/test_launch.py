"""The stage-1 launcher end to end on the tiny demo config, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train_treevae.py"), *args],
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
