"""Multi-host data parallelism on one machine: two processes joined by ``jax.distributed``."""

import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

import launchers

from test_multidevice import ROOT, TRAJECTORY, XLA_FAST, _check_trajectories


@pytest.mark.slow
def test_two_processes_over_loopback_match_1_device():
  """Two processes x 4 CPU devices joined by jax.distributed (gloo on 127.0.0.1), each feeding its
  own rows of every batch: the same 5-step stage-1 trajectory as one device (stage 2 on the same
  mesh in one process: tests/test_multidevice.py)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {XLA_FAST}",
  )
  init = (
    "import jax\n"
    "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
    f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=PID)\n"
    "STAGE = 1\n"
  )
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", init.replace("PID", str(i)) + TRAJECTORY],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
      cwd=ROOT,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  res = json.loads(outs[0][0].strip().splitlines()[-1])
  assert res["devices"] == 8
  _check_trajectories(res)


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FAST}",
  )


def _launch(script, args, devices=(4,)):
  """``launch/<script>`` as one process, or (several ``devices``) as that many processes joined
  over loopback with ``--distributed``; returns ``[(exit code, stdout, stderr)]`` per process."""
  cmd = [*launchers.command(script), *args]
  if len(devices) > 1:
    port = _port()
    cmds = [
      cmd
      + [
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={len(devices)}",
        f"--process_id={i}",
      ]
      for i in range(len(devices))
    ]
  else:
    cmds = [cmd]
  procs = [
    subprocess.Popen(
      c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(n), cwd=ROOT
    )
    for c, n in zip(cmds, devices)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _tiny_run(tmp_path):
  """A run directory of demo:tiny on a folder of 64 digits: a stage-1 export and one stage-2
  checkpoint, both with random weights drawn on the host (nothing trained: what is compared is
  the computation, and random weights give images that vary with the noise and the input)."""
  import jax
  import numpy as np
  from configs import demo
  from launchers import write_image_folder
  from tree_diffusion import checkpoint, data
  from tree_diffusion.treevae import export as export_lib  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.diffusion.conditioning import make_denoiser
  from tree_diffusion.treevae import train as tv_train

  write_image_folder(tmp_path / "images")
  flags = [
    "--config=configs/demo.py:tiny",
    "--config.data.name=folder",
    f"--config.data.folder={tmp_path / 'images'}",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
  ]
  c = demo.get_config("tiny")
  c.data.name, c.data.folder, c.data.data_dir = (
    "folder",
    str(tmp_path / "images"),
    str(tmp_path / "tfds"),
  )
  identity = data.identity(*(data.load_arrays(c.data, s) for s in ("train", "test")))
  workdir, rng = tmp_path / "run", np.random.default_rng(0)
  noisy = lambda tree, scale: jax.tree_util.tree_map(
    lambda a: np.asarray(a) + (scale * rng.standard_normal(a.shape)).astype(a.dtype), tree
  )
  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  variables = jax.device_get(model.init(jax.random.key(0), tree))
  variables["params"] = noisy(variables["params"], 0.3)
  export = str(workdir / "export")
  export_lib.export_treevae(
    export,
    model,
    variables,
    tree,
    {"metrics": {"test": {}, "num_leaves": tree.num_leaves}},
    data_identity=identity,
  )
  d = c.diffusion
  den = make_denoiser(d.conditioning, d.unet, d.dtype)
  shapes = jax.eval_shape(
    lambda: df_train.init_state(
      den,
      df_train.StepConfig.from_config(d),
      jax.random.key(1),
      df_train.example_condition(den, model, tree),
      model.image_shape,
    )
  )
  params = noisy(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes.params), 0.3)
  state = df_train.DiffusionState(
    step=np.int32(3),
    params=params,
    ema_params=params,
    opt_state=jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes.opt_state),
  )
  ckpts = Stage2Checkpoints(str(workdir / "diffusion" / "checkpoints"))
  ckpts.save(
    3,
    state,
    {
      "export": os.path.abspath(export),
      "conditioning": den.conditioning.name,
      "data_identity": identity,
      "export_fingerprint": export_lib.export_fingerprint(export),
      "config": checkpoint.config_sections(c, checkpoint.STAGE2_SECTIONS),
    },
  )
  ckpts.close()
  return workdir, flags


@pytest.mark.slow
def test_sampling_and_evaluation_on_two_processes_match_one(tmp_path):
  """launch/sample.py and launch/evaluate.py with --distributed, two processes x 4 CPU devices over
  loopback: the same samples.npz, bit for bit, and the same FIDs as one process with 4 devices.

  The one-process runs use half the batch (sampling batch 4, Inception batch 8), so that every
  device runs the same per-device shapes (1 sample, 2 Inception images) in both: the kernels are
  then the same and so are the bits (other per-device shapes would change float32 rounding).
  """
  import numpy as np

  workdir, flags = _tiny_run(tmp_path)
  samples, ev = workdir / "diffusion" / "samples", workdir / "eval"
  modes = ["--modes=sample,recons_all_leaves", "--nofigure"]
  one = _launch(
    "sample.py",
    flags + [f"--workdir={workdir}", *modes, "--config.diffusion.sampling.batch_size=4"],
  )
  assert one[0][0] == 0, one[0][2][-3000:]
  samples.rename(tmp_path / "samples_one")
  samples.mkdir()
  with open(samples / ".lock", "w") as held:  # another sampler holds it: both processes refuse
    fcntl.flock(held, fcntl.LOCK_EX)
    held.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    held.flush()
    busy = _launch("sample.py", flags + [f"--workdir={workdir}", *modes], devices=(4, 4))
  for rc, _, err in busy:
    assert rc == 1 and "error:" in err and "is in use by" in err and "Traceback" not in err, err
  two = _launch("sample.py", flags + [f"--workdir={workdir}", *modes], devices=(4, 4))
  for rc, _, err in two:
    assert rc == 0, err[-3000:]
  # Process 0 reports (the rest of stdout is gloo's, interleaved by its threads).
  assert "sample: 6 images" in two[0][1] and "images in" not in two[1][1]
  for mode in ("sample", "recons_all_leaves"):
    a = (tmp_path / "samples_one" / mode / "samples.npz").read_bytes()
    b = (samples / mode / "samples.npz").read_bytes()
    assert a == b, mode  # the file, bit for bit
    out = np.load(samples / mode / "samples.npz")
    assert out["images"].std() > 3 and len(set(out["leaf"].ravel())) > 1  # not degenerate

  fid_flags = flags + [f"--workdir={workdir}", "--checkpoints=latest", "--modes=sample"]
  one = _launch("evaluate.py", fid_flags + ["--config.diffusion.sampling.batch_size=4"])
  assert one[0][0] == 0, one[0][2][-3000:]
  ev.rename(tmp_path / "eval_one")
  two = _launch("evaluate.py", fid_flags, devices=(4, 4))
  for rc, _, err in two:
    assert rc == 0, err[-3000:]
  m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "eval_one", ev))
  step = m1["checkpoints"]["3"]["modes"]["sample"]
  fids = lambda m, s: [
    m["stage1"]["fid"]["gen"],
    m["stage1"]["fid"]["rec"],
    s["fid"],
    *(g["fid"] for g in m["stage1"]["fid"]["gen_per_leaf"] + s["fid_per_leaf"]),
  ]
  f1 = fids(m1, m1["checkpoints"]["3"]["modes"]["sample"])
  f2 = fids(m2, m2["checkpoints"]["3"]["modes"]["sample"])
  assert [f is None for f in f1] == [f is None for f in f2] and step["fid"] > 1
  f1, f2 = (np.asarray([f for f in fs if f is not None], np.float64) for fs in (f1, f2))
  print("FIDs", f1.tolist(), "max relative difference", np.max(np.abs(f1 - f2) / f1))
  # The FIDs are computed in float64 from the gathered features; with the same per-device shapes
  # those are the same bits (measured: equal FIDs). 1e-6 would still admit a float32 rounding
  # difference in the features (about 1e-7 relative), as other summation orders would give.
  np.testing.assert_allclose(f2, f1, rtol=1e-6)
  # The importance-sampled likelihood: the same draws (keyed by batch, 8 test images per batch in
  # both), 2 images per device on one process and 1 on two; float32 rounding only.
  ll1, ll2 = (m["stage1"]["log_likelihood"]["log_likelihood"] for m in (m1, m2))
  print("log-likelihood", ll1, ll2, "relative difference", abs(ll1 - ll2) / abs(ll1))
  assert abs(ll1 - ll2) <= 1e-5 * abs(ll1)


def test_processes_with_unequal_device_counts_are_refused_in_one_line(tmp_path):
  """Every process feeds an equal share of each batch: 4 + 2 devices is refused by every process
  right after joining, before anything is read, naming the counts."""
  res = _launch(
    "sample.py", ["--config=configs/demo.py:tiny", f"--workdir={tmp_path}"], devices=(4, 2)
  )
  for rc, _, err in res:
    assert rc == 1, err[-3000:]
    assert (
      "error: the processes of this job have different numbers of devices (process 0: 4, "
      "process 1: 2)" in err
    ), err[-3000:]
    assert "CUDA_VISIBLE_DEVICES to 2 devices" in err and "Traceback" not in err
