"""Runs carry their config: each training command records it (``config.json``,
``diffusion/config.json``), and ``launch/sample.py`` / ``launch/evaluate.py`` default to it, with
``--config.x=…`` overrides of sampling and evaluation settings only."""

import json

import numpy as np
import pytest

from configs import demo
from configs import run as run_config
from launchers import run as _run
from launchers import write_image_folder
from tree_diffusion import checkpoint, runs
from tree_diffusion.errors import ConfigError


def _assert_recorded(path, expected):
  """The JSON file ``path`` holds ``expected`` (a ConfigDict), key by key (tuples as lists)."""
  saved = json.loads(path.read_text())

  def walk(want, got, prefix):
    assert sorted(got) == sorted(want), prefix
    for k, v in want.items():
      if isinstance(v, dict):
        walk(v, got[k], f"{prefix}{k}.")
      else:
        assert got[k] == (list(v) if isinstance(v, tuple) else v), f"{prefix}{k}: {got[k]!r}"

  walk(expected.to_dict(), saved, "")


def test_a_recorded_config_reads_back_as_it_was(tmp_path):
  c = demo.get_config("tiny")
  c.diffusion.conditioning, c.diffusion.unet.ch = "path", 16
  rd = runs.RunDir(str(tmp_path))
  assert rd.own_config() is None
  with pytest.raises(
    ConfigError,
    match=rf"run directory {tmp_path} has no config.json \(it was "
    r"trained before runs recorded their config\): pass --config",
  ):
    run_config.get_config(str(tmp_path))
  assert runs.save_config(rd.config, demo.get_config("tiny"))
  assert rd.own_config() == str(tmp_path / "config.json")
  assert runs.save_config(rd.stage2_config, c)
  assert not runs.save_config(rd.stage2_config, c)  # the same config: not rewritten
  assert rd.own_config() == str(tmp_path / "diffusion" / "config.json")  # stage 2's first
  _assert_recorded(tmp_path / "diffusion" / "config.json", c)
  got = run_config.get_config(str(tmp_path))
  assert got.diffusion.conditioning == "path" and got.diffusion.unet.ch == 16
  assert got.diffusion.unet.ch_mults == (1, 2) and isinstance(got.eval.modes, tuple)
  assert got.diffusion.lr == 1e-3 and got.data.name == "mnist_5k"
  assert got.to_dict() == c.to_dict()
  # A config recorded by an older version (a key missing) gets that key's default; an unknown key
  # is refused.
  saved = json.loads((tmp_path / "diffusion" / "config.json").read_text())
  del saved["diffusion"]["shuffle"]
  saved["diffusion"]["sampling"]["new_knob"] = 1
  (tmp_path / "diffusion" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"unknown config key 'diffusion.sampling.new_knob'"):
    run_config.get_config(str(tmp_path))
  del saved["diffusion"]["sampling"]["new_knob"]
  (tmp_path / "diffusion" / "config.json").write_text(json.dumps(saved))
  assert run_config.get_config(str(tmp_path)).diffusion.shuffle is True


def test_only_sampling_and_evaluation_settings_may_contradict_a_run():
  saved = json.loads(demo.get_config("tiny").to_json_best_effort())
  c = demo.get_config("tiny")
  # Settings of sampling and evaluation, and where the data and the export are: accepted.
  c.diffusion.sampling.steps, c.diffusion.sampling.batch_size = 10, 2
  c.eval.num_samples, c.eval.modes, c.classifier.width = 100, ("sample",), 2
  c.stage1.eval_batch_size, c.diffusion.dtype = 3, "bfloat16"
  c.data.data_dir, c.diffusion.treevae_export = "/elsewhere", "/elsewhere/export"
  assert checkpoint.run_config_contradictions(c, saved) == []
  # What was trained: refused, each key with both values.
  c.diffusion.unet.ch, c.diffusion.conditioning, c.data.name = 16, "path", "mnist"
  c.treevae.latent_channels, c.diffusion.prediction = [3] * 4, "eps"
  assert checkpoint.run_config_contradictions(c, saved) == [
    ("data.name", "mnist_5k", "mnist"),
    ("diffusion.conditioning", "image+path", "path"),
    ("diffusion.prediction", "x0", "eps"),
    ("diffusion.unet.ch", 8, 16),
    ("treevae.latent_channels", [2, 2, 2, 2], [3, 3, 3, 3]),
  ]
  # A key the recorded config does not have (an older version's) is not compared.
  del saved["diffusion"]["unet"]["ch"]
  assert ("diffusion.unet.ch", 8, 16) not in checkpoint.run_config_contradictions(c, saved)


def test_the_training_functions_record_their_config(tmp_path):
  """Library callers get config.json too (here re-runs of finished stages, which train nothing)."""
  from test_reliability import _stage1_run, _stage2_run
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.treevae import train as tv_train

  c = demo.get_config("tiny")
  c.stage1.eval_batch_size = 12  # a value no config file has
  c.diffusion.sampling.steps = 7
  workdir = tmp_path / "run"
  _stage1_run(c, workdir)
  (workdir / "tree.png").write_bytes(b"figure")
  tv_train.train_and_export(c, str(workdir))
  _assert_recorded(workdir / "config.json", c)
  assert json.loads((workdir / "config.json").read_text())["stage1"]["eval_batch_size"] == 12
  _stage2_run(c, workdir, c.diffusion.num_steps)
  (workdir / "diffusion" / "train_summary.json").write_text('{"steps": 3}')
  df_train.train_and_save(c, str(workdir))
  _assert_recorded(workdir / "diffusion" / "config.json", c)
  assert (
    json.loads((workdir / "diffusion" / "config.json").read_text())["diffusion"]["sampling"][
      "steps"
    ]
    == 7
  )


@pytest.mark.slow
def test_an_ablation_is_sampled_and_evaluated_with_each_runs_own_config(tmp_path):
  """Two stage-2 runs on one stage-1 export, `path` and `image+path` conditioning: sampled and
  evaluated (in one call) without --config, with overrides of sampling and evaluation settings."""
  write_image_folder(tmp_path / "images")
  data = ["--config.data.name=folder", f"--config.data.folder={tmp_path / 'images'}"]
  s1, a, b = tmp_path / "s1", tmp_path / "a", tmp_path / "b"
  r = _run("--config=configs/demo.py:tiny", *data, "--config.stage1.prune=False", f"--workdir={s1}")
  assert r.returncode == 0, r.stderr[-3000:]
  expected = demo.get_config("tiny")
  expected.data.name, expected.data.folder = "folder", str(tmp_path / "images")
  expected.stage1.prune = False
  _assert_recorded(s1 / "config.json", expected)

  export = f"--config.diffusion.treevae_export={s1 / 'export'}"
  for workdir, conditioning in ((a, "path"), (b, "image+path")):
    r = _run(
      "--config=configs/demo.py:tiny",
      *data,
      export,
      f"--config.diffusion.conditioning={conditioning}",
      f"--workdir={workdir}",
      script="train_diffusion.py",
    )
    assert r.returncode == 0, r.stderr[-3000:]
  expected_a = demo.get_config("tiny")
  expected_a.data.name, expected_a.data.folder = "folder", str(tmp_path / "images")
  expected_a.diffusion.treevae_export = str(s1 / "export")
  expected_a.diffusion.conditioning = "path"
  _assert_recorded(a / "diffusion" / "config.json", expected_a)
  assert not (a / "config.json").exists()  # run a has no stage 1 of its own

  # Sampling: the run's own config, a sampling setting overridden.
  r = _run(
    f"--workdir={a}",
    "--modes=sample",
    "--config.diffusion.sampling.num_samples=3",
    "--nofigure",
    script="sample.py",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  out = np.load(a / "diffusion" / "samples" / "sample" / "samples.npz")
  assert out["images"].shape == (3, 28, 28, 1)
  # What was trained cannot be overridden.
  r = _run(
    f"--workdir={a}", "--config.diffusion.conditioning=image+path", script="sample.py", timeout=120
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    f"error: --config.diffusion.conditioning=image+path contradicts the run's config (path in "
    f"{a}/diffusion/config.json): only its sampling and evaluation settings "
    f"(diffusion.sampling.*, diffusion.dtype, stage1.eval_batch_size, eval.*, classifier.*) may "
    f"be overridden; leave out --config.diffusion.conditioning"
  ], r.stderr[-2000:]
  # One explicit --config serves every run, as before: it contradicts run a.
  r = _run(
    "--config=configs/demo.py:tiny",
    *data,
    export,
    f"--workdir={a},{b}",
    script="evaluate.py",
    timeout=120,
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert (
    f"error: --config=configs/demo.py:tiny has diffusion.conditioning=image+path, which "
    f"contradicts the run's config (path in {a}/diffusion/config.json)"
  ) in r.stderr

  # The ablation evaluated in one call, each run with its own config and the same overrides.
  r = _run(
    f"--workdir={a},{b}",
    "--checkpoints=latest",
    "--config.eval.fid=False",
    "--config.eval.ll_samples=3",
    script="evaluate.py",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  # An ablation is not one configuration: no mean ± std across its runs.
  assert "no mean ± std across the runs" in r.stderr and "diffusion.conditioning" in r.stderr
  assert not (tmp_path / "across_runs").exists()
  for workdir in (a, b):
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert sorted(metrics["checkpoints"]) == ["3"]
    assert metrics["settings"]["fid"] is False and metrics["settings"]["ll_samples"] == 3
    assert metrics["export"] == str((s1 / "export").resolve())
    assert np.isfinite(metrics["stage1"]["log_likelihood"]["log_likelihood"])
    assert set(metrics["checkpoints"]["3"]["modes"]) == {"sample", "recons", "sample_all_leaves"}
