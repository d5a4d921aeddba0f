"""Per-leaf purity of generated images, from the classifier's predictions (the reference's
``sample_all_leaves`` evaluation): for each leaf, the images whose probability of reaching it is at
least a threshold are kept, classified, and summarised as a histogram of predicted classes.

* :func:`leaf_class_histograms` summarises one threshold (pure NumPy, float64, Python floats):
  per leaf the kept count, the class histogram, the majority fraction ``max_c h(c)`` and the
  entropy ``H(h)`` in nats; overall the majority fraction averaged over leaves weighted by their
  kept counts (a leaf with nothing kept has weight 0 and ``None`` for the undefined values).
* :func:`leaf_purity_report` reports each threshold of the classes of every image through every
  leaf (:func:`~tree_diffusion.eval.classifier.classify_all_leaves`).
* :func:`save_leaf_histogram_figure` draws, per leaf, a few kept images above the histogram.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from tree_diffusion import files
from tree_diffusion.eval.classifier import Classifier, to_float


# ------------------------------------------------------------------------------------- metrics


def leaf_class_histograms(
  leaf_probs: Any, predicted: Any, num_classes: int, threshold: float
) -> dict:
  """Class histograms of the generated images kept for each leaf.

  Args:
    leaf_probs: ``[N, K]`` probability of prior sample n reaching leaf k.
    predicted: ``[N, K]`` int, the class of the image generated from sample n through leaf k.
    num_classes: number of classes C.
    threshold: sample n is kept for leaf k when ``leaf_probs[n, k] >= threshold``.

  Returns:
    ``{"threshold", "num_samples", "num_leaves", "num_classes", "total_kept",
    "weighted_majority_fraction", "weighted_entropy", "empty_leaves", "leaves"}`` where ``leaves``
    has, per leaf k: ``leaf``, ``kept``, ``counts`` [C], ``histogram`` [C] (counts / kept),
    ``majority_class`` (lowest index on ties), ``majority_fraction`` ``max_c h(c)`` and ``entropy``
    ``-Σ h log h`` in nats. A leaf with nothing kept has ``kept`` 0, zero counts and None for the
    others, and weight 0 in the averages (which are None when nothing at all is kept).

  Raises:
    ValueError: mismatched shapes, probabilities outside [0, 1], classes outside [0, C).
  """
  probs = np.asarray(leaf_probs, np.float64)
  pred = np.asarray(predicted)
  if probs.ndim != 2:
    raise ValueError(f"leaf_probs must be [N, K]; got shape {probs.shape}")
  if pred.shape != probs.shape:
    raise ValueError(f"predicted and leaf_probs differ in shape: {pred.shape} vs {probs.shape}")
  if pred.size and pred.dtype.kind not in "iu":
    raise ValueError(f"predicted must hold integers; got dtype {pred.dtype}")
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be positive; got {num_classes}")
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
    raise ValueError(
      f"predicted out of range: [{pred.min()}, {pred.max()}] but only "
      f"{num_classes} classes (0 … {num_classes - 1})"
    )
  if not np.all(np.isfinite(probs)) or (probs.size and (probs.min() < 0 or probs.max() > 1)):
    raise ValueError("leaf_probs must be finite probabilities in [0, 1]")
  if not 0.0 <= float(threshold) <= 1.0:
    raise ValueError(f"threshold must be in [0, 1]; got {threshold}")

  kept = probs >= float(threshold)
  leaves, total, weighted_majority, weighted_entropy = [], 0, 0.0, 0.0
  for k in range(probs.shape[1]):
    counts = np.bincount(pred[kept[:, k], k].astype(np.int64), minlength=num_classes)
    n_k = int(counts.sum())
    entry = {
      "leaf": k,
      "kept": n_k,
      "counts": [int(v) for v in counts],
      "histogram": None,
      "majority_class": None,
      "majority_fraction": None,
      "entropy": None,
    }
    if n_k:
      h = counts.astype(np.float64) / n_k
      nz = h[h > 0]
      majority = float(h.max())
      entropy = float(-np.sum(nz * np.log(nz)))
      entry.update(
        histogram=[float(v) for v in h],
        majority_class=int(np.argmax(h)),
        majority_fraction=majority,
        entropy=entropy,
      )
      total += n_k
      weighted_majority += n_k * majority
      weighted_entropy += n_k * entropy
    leaves.append(entry)
  return {
    "threshold": float(threshold),
    "num_samples": int(probs.shape[0]),
    "num_leaves": int(probs.shape[1]),
    "num_classes": int(num_classes),
    "total_kept": total,
    "weighted_majority_fraction": weighted_majority / total if total else None,
    "weighted_entropy": weighted_entropy / total if total else None,
    "empty_leaves": [e["leaf"] for e in leaves if not e["kept"]],
    "leaves": leaves,
  }


def leaf_purity_report(
  classifier: Classifier,
  predicted: np.ndarray,
  leaf_probs: np.ndarray,
  thresholds: Sequence[float] = (0.5, 0.9),
) -> dict:
  """Summarises the classes ``predicted`` ``[N, K]`` (:func:`classify_all_leaves` of
  ``sample_all_leaves`` images) at every threshold.

  Returns:
    ``{"classifier_test_accuracy", "thresholds": {str(t): leaf_class_histograms(...)}}``.
  """
  c = classifier.model.num_classes
  return {
    "classifier_test_accuracy": classifier.meta.get("test_accuracy"),
    "thresholds": {
      str(float(t)): leaf_class_histograms(leaf_probs, predicted, c, t) for t in thresholds
    },
  }


# ------------------------------------------------------------------------------------- figure


def _leaf_grid(images: np.ndarray, order: np.ndarray, n: int, columns: int) -> np.ndarray:
  """The first ``n`` images of ``order`` as a row-major grid (float [0, 1] RGB, blanks white)."""
  h, w, ch = images.shape[1:]
  rows, gap = -(-n // columns), max(1, h // 14)
  grid = np.ones((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), np.float32)
  for i, row in enumerate(order[:n]):
    im = to_float(images[row : row + 1])[0]
    y, x = divmod(i, columns)
    grid[y * (h + gap) : y * (h + gap) + h, x * (w + gap) : x * (w + gap) + w] = (
      np.repeat(im, 3, -1) if ch == 1 else im
    )
  return grid


def save_leaf_histogram_figure(
  path: str,
  images: np.ndarray,
  leaf_probs: np.ndarray,
  predicted: np.ndarray,
  num_classes: int,
  threshold: float,
  *,
  class_names: Sequence[str] = (),
  images_per_leaf: int = 4,
  leaf_labels: Sequence[str] = (),
  title: str | None = None,
) -> str:
  """Per leaf, a column of kept images (most likely first) above its class histogram; a PNG.

  Args:
    path: the PNG to write.
    images: ``sample_all_leaves`` images ``[N, K, H, W, C]`` (uint8 or float in [0, 1]).
    leaf_probs: ``[N, K]``.
    predicted: ``[N, K]`` classes.
    num_classes: number of classes.
    threshold: the keep threshold (as in :func:`leaf_class_histograms`).
    class_names: x tick labels (default: class indices).
    images_per_leaf: images shown per leaf.
    leaf_labels: names of the leaves in the titles (default: their index).
    title: figure title.

  Returns:
    ``path``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  images = np.asarray(images)
  summary = leaf_class_histograms(leaf_probs, predicted, num_classes, threshold)
  n, k = summary["num_samples"], summary["num_leaves"]
  if images.ndim != 5 or images.shape[:2] != (n, k):
    raise ValueError(f"images must be [{n}, {k}, H, W, C]; got shape {images.shape}")
  names = [str(s) for s in class_names] or [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} classes")
  labels = [str(s) for s in leaf_labels] or [str(i) for i in range(k)]
  probs = np.asarray(leaf_probs, np.float64)
  per = max(int(images_per_leaf), 1)

  columns = 1 if per <= 3 else 2
  rows = -(-per // columns)
  col_w = max(1.6, 0.22 * num_classes + 0.6)
  fig = Figure(figsize=(col_w * k, 0.8 * rows + 2.6), dpi=100, layout="constrained")
  grid = fig.add_gridspec(2, k, height_ratios=(0.8 * rows, 1.2))
  for j, leaf in enumerate(summary["leaves"]):
    order = np.argsort(-probs[:, j], kind="stable")
    order = order[probs[order, j] >= threshold]
    ax = fig.add_subplot(grid[0, j])
    ax.imshow(
      _leaf_grid(images[:, j], order, per, columns), vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    maj = "—" if leaf["majority_fraction"] is None else f"{leaf['majority_fraction']:.2f}"
    ax.set_title(f"leaf {labels[j]}\nkept {leaf['kept']}, maj {maj}", fontsize=8)
    bar = fig.add_subplot(grid[1, j])
    hist = leaf["histogram"] or [0.0] * num_classes
    bar.bar(np.arange(num_classes), hist, color="tab:blue" if leaf["kept"] else "lightgrey")
    bar.set_ylim(0, 1)
    bar.set_xticks(np.arange(num_classes))
    bar.set_xticklabels(names, fontsize=6, rotation=90 if max(map(len, names)) > 2 else 0)
    bar.tick_params(axis="y", labelsize=6)
    if j:
      bar.set_yticklabels([])
    if not leaf["kept"]:
      bar.text(
        0.5,
        0.5,
        "none kept",
        transform=bar.transAxes,
        ha="center",
        va="center",
        fontsize=7,
        color="grey",
      )
  wm = summary["weighted_majority_fraction"]
  head = title + "\n" if title else ""
  fig.suptitle(
    f"{head}p(leaf) ≥ {threshold:g}: {summary['total_kept']} kept, weighted majority "
    f"fraction {'—' if wm is None else f'{wm:.3f}'}",
    fontsize=9,
  )
  buf = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buf)
  files.write_bytes(path, buf.getvalue())
  return path


def histogram_images(
  histograms: Sequence[Sequence[float] | None], height: int = 40, bar: int = 4
) -> np.ndarray:
  """Class histograms drawn as small bar-chart images ``[K, 1, H, W, 3]`` in [0, 1] (a figure row).

  The majority class is drawn in orange, the others in blue; ``None`` (nothing kept) is blank.
  """
  k = len(histograms)
  c = max((len(h) for h in histograms if h is not None), default=1)
  w = c * bar + (c + 1)
  out = np.ones((k, 1, height, w, 3), np.float32)
  for i, h in enumerate(histograms):
    out[i, 0, -1, :] = 0.6  # baseline
    if h is None:
      continue
    h = np.asarray(h, np.float64)
    top = int(np.argmax(h))
    for j, v in enumerate(h):
      rows = int(round(float(v) * (height - 2)))
      x0 = 1 + j * (bar + 1)
      colour = (0.95, 0.55, 0.1) if j == top else (0.2, 0.4, 0.8)
      if rows:
        out[i, 0, height - 1 - rows : height - 1, x0 : x0 + bar] = colour
  return out
