"""Bad inputs to the launchers: each a one-line error (exit code != 0, no traceback)."""

import pytest

from launchers import run as _run


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/demo.py:tiny", "--config.stage1.num_epocs=3"], "num_epocs"),
    (["--config=configs/demo.py:tiny", "--config.stage1.batch_size=abc"], "batch_size"),
    (["--config=configs/demo.py:tiny", "--config.stage1.lr=-1"], "config.stage1.lr must be > 0"),
    (["--config=configs/demo.py:tiny", "--config.data.name=folder",
      "--config.data.folder={tmp}/empty"], "no images (.bmp/.gif/.jpeg/.jpg/.png"),
    (["--config=configs/demo.py:tiny", "--config.stage1.batch_size=7", "--two_devices"],
     "batch size 7 is not divisible by the 2 devices"),
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
  env = None
  if "--two_devices" in args:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [a for a in args if a != "--two_devices"]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("not an image")
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  r = _run(*args, f"--workdir={workdir}", timeout=120, env=env)
  assert r.returncode != 0
  assert expect in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  if "empty" in " ".join(args):
    assert "skipping non-image file" in r.stderr and "notes.txt" in r.stderr


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
