"""TensorBoard output: the writer's scalars, images and hyper-parameters read back from the event
files (parsed here record by record, CRCs checked), locally and on a gs:// logdir (a local Cloud
Storage emulator), the learning rate and sample grids of a tiny stage-2 run, the tree figures of a
tiny stage-1 run, and the evaluation's scalars per checkpoint."""

import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from launchers import tiny_config
from tree_diffusion import writer as writer_lib


# ------------------------------------------------------------------ an independent event reader


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def _masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC32C (rotated right by 15 bits, plus a constant)."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
  crc = 0xFFFFFFFF
  for b in b"123456789":
    crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
  assert crc ^ 0xFFFFFFFF == 0xE3069283  # the standard CRC-32C check value


def _records(path):
  """The payloads of a TFRecord file: u64 length, masked CRC32C of it, data, masked CRC32C."""
  raw = open(path, "rb").read()
  pos, out = 0, []
  while pos < len(raw):
    header = raw[pos : pos + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", raw[pos + 8 : pos + 12])[0] == _masked_crc(header)
    data = raw[pos + 12 : pos + 12 + n]
    assert struct.unpack("<I", raw[pos + 12 + n : pos + 16 + n])[0] == _masked_crc(data)
    out.append(data)
    pos += 16 + n
  assert pos == len(raw)
  return out


def _events(logdir):
  """Every Event proto of every event file in ``logdir`` (not its sub-directories)."""
  from tensorboardX.proto import event_pb2

  out = []
  names = sorted(f for f in os.listdir(logdir) if f.startswith("events.out.tfevents."))
  assert names, os.listdir(logdir)
  for name in names:
    for data in _records(os.path.join(logdir, name)):
      e = event_pb2.Event()
      e.ParseFromString(data)
      out.append(e)
  return out


def _scalars(logdir):
  """``{tag: {step: value}}``."""
  out = {}
  for e in _events(logdir):
    for v in e.summary.value:
      if v.WhichOneof("value") == "simple_value":
        out.setdefault(v.tag, {})[e.step] = v.simple_value
  return out


def _images(logdir):
  """``{tag: {step: uint8 array}}`` (PNGs decoded)."""
  out = {}
  for e in _events(logdir):
    for v in e.summary.value:
      if v.WhichOneof("value") == "image":
        px = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
        assert px.shape[:2] == (v.image.height, v.image.width)
        out.setdefault(v.tag, {})[e.step] = px
  return out


def _hparams(logdir):
  """``(hparams, metric tags)`` of the hparams plugin's session-start and experiment summaries."""
  from tensorboardX.proto import plugin_hparams_pb2

  hp, metrics, names = None, None, None
  for e in _events(logdir):
    for v in e.summary.value:
      if v.metadata.plugin_data.plugin_name != "hparams":
        continue
      data = plugin_hparams_pb2.HParamsPluginData()
      data.ParseFromString(v.metadata.plugin_data.content)
      if v.tag == "_hparams_/session_start_info":
        hp = {
          k: getattr(x, x.WhichOneof("kind")) for k, x in data.session_start_info.hparams.items()
        }
      elif v.tag == "_hparams_/experiment":
        metrics = [m.name.tag for m in data.experiment.metric_infos]
        names = sorted(h.name for h in data.experiment.hparam_infos)
  assert names == sorted(hp)  # the experiment declares the session's hyper-parameters
  return hp, metrics


# ------------------------------------------------------------------ the writer


def test_writer_scalars_images_and_hparams_read_back(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
  w = writer_lib.MetricWriter(str(tmp_path))
  w.write_hparams(
    writer_lib.flatten(
      {
        "diffusion": {
          "lr": 2e-4,
          "unet": {"ch_mults": (1, 2)},
          "conditioning": "path",
          "shuffle": True,
          "num_steps": 3,
          "treevae_export": None,
        }
      }
    ),
    metrics=["train/loss", "eval/fid_gen"],
  )
  w.write_scalars(1, {"train/loss": 0.5, "train/lr": 1e-4})
  w.write_scalars(2, {"train/loss": 0.25})
  w.write_images(2, {"samples/rgb": rgb, "samples/grey": grey, "samples/pil": Image.fromarray(rgb)})
  w.close()
  w.close()  # a second close is harmless
  assert _scalars(tmp_path) == {
    "train/loss": {1: 0.5, 2: 0.25},
    "train/lr": {1: pytest.approx(1e-4)},
  }
  images = _images(tmp_path)
  np.testing.assert_array_equal(images["samples/rgb"][2], rgb)
  np.testing.assert_array_equal(images["samples/pil"][2], rgb)
  np.testing.assert_array_equal(images["samples/grey"][2], np.stack([grey] * 3, -1))
  hp, metrics = _hparams(tmp_path)
  assert hp == {
    "diffusion.lr": pytest.approx(2e-4),
    "diffusion.unet.ch_mults": "[1, 2]",
    "diffusion.conditioning": "path",
    "diffusion.shuffle": True,
    "diffusion.num_steps": 3.0,
  }
  assert metrics == ["train/loss", "eval/fid_gen"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [
    {"step": 1, "train/loss": 0.5, "train/lr": 1e-4},
    {"step": 2, "train/loss": 0.25},
  ]
  assert not [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]  # no sub-runs


def test_writer_refuses_float_or_misshaped_images(tmp_path):
  w = writer_lib.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match="pass uint8 pixels"):
    w.write_images(0, {"x": np.zeros((4, 4, 3), np.float32)})
  with pytest.raises(ValueError, match=r"pass \[H, W\] or \[H, W, C\]"):
    w.write_images(0, {"x": np.zeros((2, 4, 4, 3), np.uint8)})
  w.close()


def test_two_writers_in_one_second_keep_their_own_event_files(tmp_path):
  a = writer_lib.MetricWriter(str(tmp_path))
  b = writer_lib.MetricWriter(str(tmp_path), job="eval")
  a.write_scalars(1, {"train/loss": 1.0})
  b.write_scalars(1, {"eval/fid_gen": 9.0})
  a.close()
  b.close()
  assert _scalars(tmp_path) == {"train/loss": {1: 1.0}, "eval/fid_gen": {1: 9.0}}
  assert json.loads((tmp_path / "metrics.eval.jsonl").read_text()) == {
    "step": 1,
    "eval/fid_gen": 9.0,
  }


def test_a_remote_logdir_rewrites_the_whole_jsonl_file(tmp_path, monkeypatch):
  """On an object store the JSON lines are uploaded whole (each upload replaces the object): the
  lines already there are kept (a resumed run), uploads are spaced by ``remote_flush_secs`` and
  the last one happens at close."""
  uploads = []
  real_write_text = writer_lib.files.write_text

  def write_text(path, text):
    uploads.append((os.fspath(path), text))
    real_write_text(path, text)

  monkeypatch.setattr(writer_lib, "_appendable", lambda logdir: False)
  monkeypatch.setattr(writer_lib.files, "write_text", write_text)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}')  # no final newline
  w = writer_lib.MetricWriter(str(tmp_path), remote_flush_secs=0.0)
  w.write_scalars(2, {"a": 2.0})
  assert len(uploads) == 1 and uploads[0][0] == str(tmp_path / "metrics.jsonl")
  w.close()
  assert len(uploads) == 1  # nothing new since the last upload
  w = writer_lib.MetricWriter(str(tmp_path), remote_flush_secs=3600.0)
  w.write_scalars(3, {"a": 3.0})
  w.write_scalars(4, {"a": 4.0})
  assert len(uploads) == 1  # not yet: the last upload was less than an hour ago
  w.close()
  assert len(uploads) == 2
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": s, "a": float(s)} for s in (1, 2, 3, 4)]


_GCS_WRITER = r"""
import os, sys
import numpy as np
from tree_diffusion import writer as writer_lib
logdir = "gs://bkt/run/tensorboard"
w = writer_lib.MetricWriter(logdir, remote_flush_secs=0.0)
w.write_hparams({"diffusion.lr": 0.5, "data.name": "mnist"}, ["train/loss"])
w.write_scalars(1, {"train/loss": 0.5})
w.write_images(1, {"grid": np.arange(60, dtype=np.uint8).reshape(4, 5, 3)})
w.close()
w = writer_lib.MetricWriter(logdir, remote_flush_secs=0.0)   # a resumed run
w.write_scalars(2, {"train/loss": 0.25})
w.close()
from google.cloud import storage
for blob in storage.Client().list_blobs("bkt", prefix="run/tensorboard/"):
  blob.download_to_filename(os.path.join(sys.argv[1], os.path.basename(blob.name)))
"""


def test_a_gs_logdir_on_a_local_cloud_storage_emulator(tmp_path):
  import subprocess
  import sys
  import gcs_emulator

  proc, env = gcs_emulator.start()
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
      [sys.executable, "-c", _GCS_WRITER, str(tmp_path)],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=root,
      env=dict(os.environ, PYTHONPATH=root, **env),
    )
  finally:
    proc.kill()
    proc.wait()
  assert r.returncode == 0, r.stderr[-3000:]
  assert _scalars(tmp_path) == {"train/loss": {1: 0.5, 2: 0.25}}
  np.testing.assert_array_equal(
    _images(tmp_path)["grid"][1], np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
  )
  assert _hparams(tmp_path) == ({"diffusion.lr": 0.5, "data.name": "mnist"}, ["train/loss"])
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}]


# ------------------------------------------------------------------ stage 2


def _stage1_export(c, workdir, epochs=None):
  """A stage-1 export of the initial (untrained) TreeVAE of ``c`` in ``workdir/export``."""
  import jax
  from tree_diffusion import data
  from tree_diffusion.treevae import export as export_lib
  from tree_diffusion.treevae import train as tv_train

  model, tree = tv_train.make_model(c), tv_train.initial_tree(c)
  variables = model.init(jax.random.key(0), tree)
  identity = data.identity(*(data.load_arrays(c.data, s) for s in ("train", "test")))
  metrics = {"num_leaves": tree.num_leaves}
  if epochs is not None:
    metrics["epochs"] = epochs
  export_lib.export_treevae(
    str(workdir / "export"), model, variables, tree, {"metrics": metrics}, data_identity=identity
  )
  return tree


def _stage2_params(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(str(workdir / "diffusion" / "checkpoints")) as m:
    step = m.latest_step()
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return step, state


def test_stage2_logs_lr_hparams_and_sample_grids_without_changing_training(tmp_path):
  import jax
  from tree_diffusion.diffusion import generate
  from tree_diffusion.diffusion import train as df_train

  # 3 steps: grids at 2 and 3 (the last); a large rate makes the EMA weights of the steps differ.
  c = tiny_config(diffusion__sample_every=2, diffusion__lr=0.05)
  run, plain = tmp_path / "run", tmp_path / "plain"
  tree = _stage1_export(c, run)
  _stage1_export(c, plain)
  df_train.train_and_save(c, str(run))
  logdir = run / "diffusion" / "tensorboard"

  d = c.diffusion
  lr = lambda step: d.lr * min((step - 1) / d.warmup_steps, 1.0)  # the update taking step-1 → step
  scalars = _scalars(logdir)
  assert sorted(scalars["train/lr"]) == [1, 2, 3]
  for step, value in scalars["train/lr"].items():
    assert value == pytest.approx(lr(step), rel=1e-6), step
  hp, metrics = _hparams(logdir)
  assert hp["diffusion.sample_every"] == 2 and hp["diffusion.lr"] == pytest.approx(d.lr)
  assert hp["data.name"] == c.data.name and hp["diffusion.conditioning"] == d.conditioning
  assert "train/loss" in metrics and "eval/fid_gen" in metrics

  grids = _images(logdir)["samples/sample_all_leaves"]
  assert sorted(grids) == [2, 3] and not np.array_equal(grids[2], grids[3])
  # Each grid is the EMA model of its step (checkpoints 2 and 3) sampling 8 prior draws of the
  # sampling seed through every leaf: rows are draws, columns leaves.
  k, (h, w, _) = tree.num_leaves, (28, 28, 1)
  for step in (2, 3):
    s = generate.load_stage2(c, str(run), step)
    out = s.sampler("sample_all_leaves").run(
      s.ema_params, s.tvae_vars, jax.random.key(d.sampling.seed), num=8
    )
    assert out["image"].shape == (8, k, h, w, 1)
    px = np.rint(np.clip(out["image"], 0, 1) * 255).astype(np.uint8)
    grid = grids[step]
    assert grid.shape == (8 * (h + 2) + 2, k * (w + 2) + 2, 3)
    for r in range(8):
      for j in range(k):
        y, x = 2 + r * (h + 2), 2 + j * (w + 2)
        np.testing.assert_array_equal(grid[y : y + h, x : x + w], np.repeat(px[r, j], 3, -1))

  # Sampling leaves training as it is: the same run without grids ends bit for bit the same.
  df_train.train_and_save(tiny_config(diffusion__sample_every=0, diffusion__lr=0.05), str(plain))
  assert "samples/sample_all_leaves" not in _images(plain / "diffusion" / "tensorboard")
  (step, state), (plain_step, plain_state) = _stage2_params(run), _stage2_params(plain)
  assert step == plain_step == 3
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ stage 1


@pytest.mark.slow
def test_stage1_logs_the_tree_after_each_growth_and_its_hparams(tmp_path):
  from launchers import write_image_folder
  from tree_diffusion.treevae import train as tv_train

  write_image_folder(tmp_path / "images", 64)
  c = tiny_config(
    data__name="folder",
    data__folder=str(tmp_path / "images"),
    data__data_dir=str(tmp_path / "tfds"),
    stage1__prune=False,
  )
  metrics = tv_train.train_and_export(c, str(tmp_path / "run"))
  logdir = tmp_path / "run" / "tensorboard"
  scalars, trees = _scalars(logdir), _images(logdir)["tree"]
  leaves = scalars["tree/num_leaves"]  # per epoch of every phase, at steps 0, 1, …
  assert sorted(leaves) == list(range(metrics["epochs"]))
  # Tiny: 1 epoch per phase and one growth (2 → 3 leaves): the initial tree after epoch 0, the
  # grown one after its small-tree epoch 1, the final one after fine-tuning (epoch 2).
  assert leaves == {0: 2.0, 1: 3.0, 2: 3.0} and metrics["num_leaves"] == 3
  assert sorted(trees) == [0, 1, 2]
  assert trees[1].shape[1] > trees[0].shape[1]  # one more leaf column
  final = np.asarray(Image.open(tmp_path / "run" / "tree.png").convert("RGB"))
  np.testing.assert_array_equal(trees[2], final)
  assert sorted(scalars["train/lr"]) == [0, 1, 2]
  assert scalars["train/lr"][0] == pytest.approx(c.stage1.lr)
  hp, tags = _hparams(logdir)
  assert hp["stage1.lr"] == pytest.approx(c.stage1.lr) and hp["data.name"] == "folder"
  assert hp["treevae.latent_channels"] == "[2, 2, 2, 2]" and "diffusion.lr" not in hp
  assert "train/loss" in tags and "eval/fid_gen" in tags


# ------------------------------------------------------------------ evaluation


def _fake_inception(images, progress=None):
  """4 features per image (quadrant means): FIDs without the Inception network."""
  x = np.asarray(images, np.float64)[..., 0]
  h, w = x.shape[1] // 2, x.shape[2] // 2
  return np.stack(
    [
      x[:, :h, :w].mean((1, 2)),
      x[:, :h, w:].mean((1, 2)),
      x[:, h:, :w].mean((1, 2)),
      x[:, h:, w:].mean((1, 2)),
    ],
    1,
  )


def test_evaluation_logs_each_checkpoint_at_its_step(tmp_path):
  from tree_diffusion.diffusion import train as df_train
  from tree_diffusion.eval import evaluate

  c = tiny_config()
  run = tmp_path / "run"
  _stage1_export(c, run, epochs=5)  # stage 1's last epoch: step 4
  df_train.train_and_save(c, str(run))  # checkpoints 2 and 3
  ev = evaluate.Evaluator(evaluate.Settings.from_config(c))
  ev._extractor, ev._weights_id = _fake_inception, "fake"
  metrics = ev.run(c, str(run))
  assert sorted(metrics["checkpoints"]) == ["2", "3"]

  stage2 = _scalars(run / "diffusion" / "tensorboard")
  nmi = metrics["stage1"]["clustering"]["nmi"]
  for step in (2, 3):
    modes = metrics["checkpoints"][str(step)]["modes"]
    assert stage2["eval/fid_gen"][step] == pytest.approx(modes["sample"]["fid"], rel=1e-6)
    assert stage2["eval/fid_rec"][step] == pytest.approx(modes["recons"]["fid"], rel=1e-6)
    assert stage2["eval/nmi"][step] == pytest.approx(nmi, rel=1e-6)
    for t in c.classifier.thresholds:
      fraction = modes["sample_all_leaves"]["purity"]["thresholds"][str(float(t))][
        "weighted_majority_fraction"
      ]
      logged = stage2.get(f"eval/purity_p{t:g}", {})
      if fraction is None:  # nothing kept at this threshold
        assert step not in logged
      else:
        assert logged[step] == pytest.approx(fraction, rel=1e-6)
  assert sorted(stage2["eval/fid_gen"]) == sorted(stage2["eval/purity_p0.5"]) == [2, 3]
  assert sorted(stage2["train/loss"]) == [1, 2, 3]  # training's own events are still there

  s1 = metrics["stage1"]
  stage1 = _scalars(run / "tensorboard")
  assert stage1["eval/fid_gen"] == {4: pytest.approx(s1["fid"]["gen"], rel=1e-6)}
  assert stage1["eval/fid_rec"] == {4: pytest.approx(s1["fid"]["rec"], rel=1e-6)}
  assert stage1["eval/nmi"] == {4: pytest.approx(nmi, rel=1e-6)}
  assert stage1["eval/log_likelihood"] == {
    4: pytest.approx(s1["log_likelihood"]["log_likelihood"], rel=1e-6)
  }
