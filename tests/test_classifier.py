"""The purity classifier: histogram metrics by hand, a tiny ResNet on separable images, padded
prediction, save/load, and the launcher on the tiny demo config."""

import json
import math
import os
import subprocess

import ml_collections
import numpy as np
import pytest

import launchers

from tree_diffusion.data import Arrays
from tree_diffusion.errors import ConfigError
from tree_diffusion.eval import classifier as clf
from tree_diffusion.eval import purity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- metrics


def test_leaf_class_histograms_by_hand():
  # 5 prior samples, 3 leaves, 3 classes, threshold 0.5.
  probs = np.array(
    [
      [0.5, 0.3, 0.2],  # leaf 0 kept: p == threshold counts
      [0.7, 0.2, 0.1],
      [0.6, 0.4, 0.0],
      [0.1, 0.4, 0.5],  # leaf 2 kept
      [0.2, 0.49, 0.31],
    ]
  )  # nothing kept; leaf 1 never reaches 0.5
  pred = np.array([[2, 0, 0], [2, 1, 1], [0, 1, 1], [1, 1, 1], [0, 2, 2]])
  out = purity.leaf_class_histograms(probs, pred, num_classes=3, threshold=0.5)
  l0, l1, l2 = out["leaves"]
  # Leaf 0 keeps samples 0, 1, 2 with classes 2, 2, 0.
  assert l0["kept"] == 3 and l0["counts"] == [1, 0, 2]
  assert l0["histogram"] == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-15)
  assert l0["majority_class"] == 2 and l0["majority_fraction"] == pytest.approx(2 / 3, abs=1e-15)
  h0 = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # 0.6365141682948128 nats
  assert l0["entropy"] == pytest.approx(h0, abs=1e-15)
  assert l0["entropy"] == pytest.approx(0.6365141682948128, abs=1e-15)
  # Leaf 1 keeps nothing: weight 0, undefined values reported as None.
  assert l1 == {
    "leaf": 1,
    "kept": 0,
    "counts": [0, 0, 0],
    "histogram": None,
    "majority_class": None,
    "majority_fraction": None,
    "entropy": None,
  }
  # Leaf 2 keeps sample 3 only (class 1): pure, zero entropy.
  assert l2["kept"] == 1 and l2["counts"] == [0, 1, 0] and l2["histogram"] == [0.0, 1.0, 0.0]
  assert l2["majority_class"] == 1 and l2["majority_fraction"] == 1.0 and l2["entropy"] == 0.0
  # Weighted by kept counts 3, 0, 1: (3 · 2/3 + 1 · 1) / 4 = 3/4; entropy 3 · h0 / 4.
  assert out["total_kept"] == 4 and out["empty_leaves"] == [1]
  assert out["weighted_majority_fraction"] == pytest.approx(0.75, abs=1e-15)
  assert out["weighted_entropy"] == pytest.approx(0.75 * h0, abs=1e-15)
  assert isinstance(out["weighted_majority_fraction"], float)
  assert (out["num_samples"], out["num_leaves"], out["num_classes"]) == (5, 3, 3)
  json.dumps(out, allow_nan=False)

  # A tie picks the lowest class; threshold 0.9 keeps nothing anywhere.
  tie = purity.leaf_class_histograms([[1.0], [1.0]], [[1], [0]], 2, 0.5)["leaves"][0]
  assert tie["majority_class"] == 0 and tie["majority_fraction"] == 0.5
  assert tie["entropy"] == pytest.approx(math.log(2), abs=1e-15)
  none = purity.leaf_class_histograms(probs, pred, 3, 0.9)
  assert none["total_kept"] == 0 and none["weighted_majority_fraction"] is None
  assert none["empty_leaves"] == [0, 1, 2]


@pytest.mark.parametrize(
  "probs, pred, c, t, match",
  [
    ([[0.5, 0.5]], [[0, 1, 1]], 2, 0.5, "differ in shape"),
    ([[0.5, 0.5]], [[0, 2]], 2, 0.5, "out of range"),
    ([[0.5, 1.5]], [[0, 1]], 2, 0.5, r"\[0, 1\]"),
    ([[0.5, 0.5]], [[0.0, 1.0]], 2, 0.5, "integers"),
    ([0.5, 0.5], [0, 1], 2, 0.5, r"\[N, K\]"),
    ([[0.5, 0.5]], [[0, 1]], 2, 1.5, "threshold"),
  ],
)
def test_leaf_class_histograms_rejects_bad_input(probs, pred, c, t, match):
  with pytest.raises(ValueError, match=match):
    purity.leaf_class_histograms(probs, pred, c, t)


# ------------------------------------------------------------------------------------- model


def _stripes(n_per_class: int, seed: int) -> Arrays:
  """Three classes of 8×8 uint8 images: horizontal stripes, vertical stripes, flat grey; noisy."""
  rng = np.random.default_rng(seed)
  grid = np.indices((8, 8))
  patterns = [(grid[0] % 2) * 200.0, (grid[1] % 2) * 200.0, np.full((8, 8), 100.0)]
  images, labels = [], []
  for k, p in enumerate(patterns):
    noise = rng.uniform(0, 50, (n_per_class, 8, 8))
    images.append(np.clip(p + noise, 0, 255).astype(np.uint8)[..., None])
    labels.append(np.full(n_per_class, k, np.int32))
  return Arrays(np.concatenate(images), np.concatenate(labels), 3, ("h", "v", "flat"))


def _tiny_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(name="stripes"))
  c.classifier = ml_collections.ConfigDict(
    dict(
      width=4,
      stage_sizes=(1, 1),
      lr=1e-2,
      lr_schedule="constant",
      batch_size=16,
      num_epochs=6,
      num_steps=0,
      augment="flip+shift",
      seed=0,
      eval_batch_size=8,
      log_every_steps=4,
      eval_every_epochs=0,
      dir="",
      thresholds=(0.5, 0.9),
    )
  )
  return c


@pytest.fixture(scope="module")
def trained():
  train, test = _stripes(16, seed=0), _stripes(5, seed=1)
  lines = []
  classifier, metrics = clf.train_classifier(_tiny_config(), train, test, log=lines.append)
  return classifier, metrics, train, test, lines


def test_training_separates_the_classes(trained):
  classifier, metrics, train, test, lines = trained
  pred, probs = clf.predict(classifier.model, classifier.variables, train.images, batch_size=8)
  assert (pred == train.labels).all()
  assert probs.shape == (48, 3) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert metrics["test_accuracy"] == 1.0 and metrics["per_class_accuracy"] == [1.0, 1.0, 1.0]
  assert metrics["steps"] == 18 and metrics["epochs"] == 6.0
  assert any("img/s" in line and "ETA" in line for line in lines)
  assert classifier.meta["image_shape"] == [8, 8, 1] and classifier.meta["test_accuracy"] == 1.0


def test_predict_pads_the_last_batch(trained):
  classifier, _, train, _, _ = trained
  images = train.images[::3][:13]  # 13 images: batches of 8 and 5 (+3 padding)
  pred, probs = clf.predict(classifier.model, classifier.variables, images, batch_size=8)
  assert pred.shape == (13,) and pred.dtype == np.int32
  # Same result image by image (each alone in a batch of 8 padded with zeros).
  for i in range(13):
    p1, q1 = clf.predict(classifier.model, classifier.variables, images[i : i + 1], batch_size=8)
    assert p1[0] == pred[i]
    np.testing.assert_allclose(q1[0], probs[i], rtol=1e-5, atol=1e-6)
  # Floats in [0, 1] are accepted too; x / 255 gives the same probabilities.
  _, qf = clf.predict(classifier.model, classifier.variables, images / 255.0, batch_size=8)
  np.testing.assert_allclose(qf, probs, rtol=1e-5, atol=1e-6)
  # sample_all_leaves layout [N, K, H, W, C].
  pk, _ = clf.classify_all_leaves(classifier, images[:12].reshape(4, 3, 8, 8, 1), batch_size=8)
  assert (pk.reshape(-1) == pred[:12]).all()


def test_save_load_round_trip(trained, tmp_path):
  classifier, _, _, test, _ = trained
  clf.save_classifier(str(tmp_path), classifier)
  assert sorted(os.listdir(tmp_path)) == ["classifier.json", "classifier.msgpack"]
  loaded = clf.load_classifier(str(tmp_path), image_shape=(8, 8, 1), num_classes=3)
  assert loaded.model == classifier.model
  import jax

  a, b = (
    jax.tree_util.tree_flatten_with_path(classifier.variables)[0],
    jax.tree_util.tree_flatten_with_path(loaded.variables)[0],
  )
  assert [p for p, _ in a] == [p for p, _ in b]
  for (_, x), (_, y) in zip(a, b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
  meta = json.loads((tmp_path / "classifier.json").read_text())
  assert meta["dataset"] == "stripes" and meta["class_names"] == ["h", "v", "flat"]
  assert meta["classifier_config"]["width"] == 4 and meta["test_accuracy"] == 1.0
  p1, _ = clf.predict(loaded.model, loaded.variables, test.images, 8)
  p0, _ = clf.predict(classifier.model, classifier.variables, test.images, 8)
  assert (p0 == p1).all()

  for kwargs, match in [
    (dict(image_shape=(28, 28, 1)), "trained on 8x8x1 images"),
    (dict(num_classes=10), "has 3 classes"),
  ]:
    with pytest.raises(ConfigError, match=match) as e:
      clf.load_classifier(str(tmp_path), **kwargs)
    assert "\n" not in str(e.value) and "python -m launch.train_classifier" in str(e.value)
  with pytest.raises(ConfigError, match="no classifier in") as e:
    clf.load_classifier(str(tmp_path / "missing"))
  assert "\n" not in str(e.value) and "python -m launch.train_classifier --config=" in str(e.value)
  # Through a config: WORKDIR/classifier or classifier.dir, and the dataset name must match.
  config = _tiny_config()
  config.data.update(dict(image_size=8, channels=1))
  config.classifier.dir = str(tmp_path)
  assert clf.load_for_config(config, "/unused").meta["dataset"] == "stripes"
  config.data.name = "mnist_5k"
  with pytest.raises(ConfigError, match="trained on stripes, not mnist_5k"):
    clf.load_for_config(config, "/unused")


def test_unlabelled_data_is_a_one_line_error():
  images = np.zeros((4, 8, 8, 1), np.uint8)
  unlabelled = Arrays(images, np.full(4, -1, np.int32), 0)
  with pytest.raises(ConfigError, match="the dataset has no labels; a classifier needs labels"):
    clf.train_classifier(_tiny_config(), unlabelled)


def test_figure(trained, tmp_path):
  pytest.importorskip("matplotlib")
  classifier, _, train, _, _ = trained
  images = train.images[:12].reshape(4, 3, 8, 8, 1)
  probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
  pred, _ = clf.classify_all_leaves(classifier, images, batch_size=8)
  path = purity.save_leaf_histogram_figure(
    str(tmp_path / "purity.png"),
    images,
    probs,
    pred,
    3,
    0.5,
    class_names=classifier.class_names,
    images_per_leaf=2,
    title="stripes",
  )
  from PIL import Image

  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 200
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# ------------------------------------------------------------------------------------- launcher


@pytest.mark.slow
def test_launcher_tiny_end_to_end(tmp_path):
  r = subprocess.run(
    [
      *launchers.command("train_classifier.py"),
      "--config=configs/demo.py:tiny",
      f"--workdir={tmp_path}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "classifier: test accuracy" in r.stdout and "img/s" in r.stderr
  loaded = clf.load_classifier(
    str(tmp_path / "classifier"), image_shape=(28, 28, 1), num_classes=10
  )
  assert loaded.meta["dataset"] == "mnist_5k" and loaded.meta["test_images"] == 1000
  assert loaded.meta["steps"] == 4
