"""A trained run as one object, for a notebook or a script: ``tree_diffusion.load_run(workdir)``.

    import tree_diffusion
    run = tree_diffusion.load_run("runs/demo")
    run.tree, run.config.data.name, run.metrics["test"]["nmi"]
    leaves, probs = run.assign(images)           # floats [N, H, W, C] in [0, 1]
    placed = run.assign_files(["a.png", "b.jpg"])  # decoded as the run's training images were
    images = run.generate(num=8)                 # {leaf id: [8, H, W, C]}: diffusion if stage 2
                                                 # has run, else the TreeVAE

It loads what both stages wrote (the stage-1 export, the run's recorded config and metrics, the
latest stage-2 checkpoint) and imports no training code; it sits in the stage-2 package, the
layer that sees both stages.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from tree_diffusion.treevae import export as export_lib
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion import files, image_files, inputs, sharding
from tree_diffusion.diffusion import generate as generate_lib
from tree_diffusion.errors import ConfigError
from tree_diffusion.runs import RunDir, read_recorded_config
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import assignments, inference
from tree_diffusion.treevae.model import TreeVAE

# What a generator is called in outputs (``index.csv``'s ``generator`` column).
DIFFUSION, TREEVAE = "diffusion", "treevae"
# The columns of ``assign_files`` rows and of ``launch/assign.py``'s CSV: those of
# ``assignments.csv`` without the split and label (new images have neither).
FILE_COLUMNS = (
  "index",
  "file",
  "leaf",
  "leaf_probability",
  "path",
  "second_leaf",
  "second_probability",
)
INDEX_COLUMNS = ("file", "leaf", "path", "generator", "draw")


def _tuples(obj):
  """JSON lists as tuples (the configs' sequence type; tuples are hashable, as jit needs)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded (stage 2's ``diffusion/config.json`` if present, else stage 1's
  ``config.json``) as a ``ConfigDict``.

  Raises:
    ConfigError: the run has no readable recorded config.
  """
  recorded = read_recorded_config(workdir, "train the run again")
  if recorded is None:
    raise ConfigError(
      f"run directory {workdir} has no config.json: train stage 1 there with "
      f"python -m launch.train_treevae (runs trained before runs recorded their config "
      f"cannot be loaded this way)"
    )
  return ml_collections.ConfigDict(_tuples(recorded[1]))


def _read_json_or_empty(path: str) -> dict:
  try:
    obj = files.read_json(path) if files.exists(path) else {}
  except (OSError, ValueError):
    return {}
  return obj if isinstance(obj, dict) else {}


@dataclasses.dataclass(frozen=True)
class PlacedFiles:
  """What :meth:`TrainedRun.assign_files` returns.

  Attributes:
    files: the files placed, as given, in order.
    leaves: each one's most probable leaf (node id), ``[N]``.
    probs: the leaf probabilities ``[N, K]`` (columns in ``tree.leaves`` order).
    skipped: the files that could not be read as images.
  """

  files: tuple[str, ...]
  leaves: np.ndarray
  probs: np.ndarray
  skipped: tuple[str, ...]


@dataclasses.dataclass
class TrainedRun:
  """A trained run: its tree, config, metrics and models.

  Attributes:
    workdir: the run directory.
    config: the config it recorded (``ConfigDict``).
    model, variables, tree: the stage-1 TreeVAE as exported.
    export: the stage-1 export these came from.
    metrics: ``stage1_metrics.json`` (``{}`` when missing).
    eval_metrics: ``eval/metrics.json`` (``{}`` before ``launch/evaluate.py``).
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: TreeVAE
  variables: Any
  tree: Tree
  export: str
  metrics: dict
  eval_metrics: dict
  _stage2: Any = dataclasses.field(default=None, repr=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images the TreeVAE takes and makes."""
    return tuple(self.model.image_shape)

  @property
  def has_stage2(self) -> bool:
    """Whether a stage-2 checkpoint exists (then :meth:`generate` uses the diffusion model)."""
    return bool(Stage2Checkpoints.steps_in(RunDir(self.workdir).stage2_checkpoints))

  @property
  def batch_size(self) -> int:
    """Images per compiled call of :meth:`assign`: stage 1's evaluation batch size, so that
    placing a run's own images reproduces its ``assignments.csv``."""
    return int(self.config.stage1.eval_batch_size)

  # ------------------------------------------------------------------------------- placing

  def assign(
    self, images, batch_size: int | None = None, progress: Callable[[int, int], None] | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Places images into the learned tree (:func:`treevae.inference.assign`), the batches split
    over the local devices.

    Args:
      images: floats ``[N, H, W, C]`` in [0, 1] of :attr:`image_shape` (uint8: convert with
        :func:`tree_diffusion.inputs.to_unit_range`).
      batch_size: images per compiled call (default :attr:`batch_size`).
      progress: called with ``(done, total)`` after each batch.

    Returns:
      ``(leaves [N], probs [N, K])``.
    """
    return inference.assign(
      self.model,
      self.variables,
      self.tree,
      images,
      batch_size or self.batch_size,
      mesh=self._mesh,
      progress=progress,
    )

  @functools.cached_property
  def _mesh(self):
    """The local devices, for :meth:`assign` (``None`` in a multi-process job)."""
    return sharding.make_mesh(jax.local_device_count()) if jax.process_count() == 1 else None

  def decode_files(
    self, paths: Sequence[str], resize: bool | None = None
  ) -> tuple[np.ndarray, list[int]]:
    """Reads image files as the run's training images were read: the run's size and channels,
    center-crop and resize when ``resize`` (default: the run's ``data.resize``), transparency
    composited.

    Returns:
      ``(images, kept)``: uint8 ``[M, H, W, C]`` and the positions in ``paths`` of the ``M`` files
      that could be read.

    Raises:
      ImageSizeError: a file of another size when not resizing.
    """
    size, _, channels = self.image_shape
    resize = bool(self.config.data.get("resize", False)) if resize is None else resize
    decoded = [image_files.decode(p, size, channels, resize) for p in paths]
    kept = [i for i, d in enumerate(decoded) if d is not None]
    if not kept:
      return np.zeros((0,) + self.image_shape, np.uint8), kept
    flat = image_files.flatten([decoded[i] for i in kept], [paths[i] for i in kept])
    return np.stack(flat), kept

  def assign_files(
    self,
    paths: Sequence[str],
    resize: bool | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
  ) -> PlacedFiles:
    """Decodes (:meth:`decode_files`) and places (:meth:`assign`) image files, a batch at a time
    (memory stays one batch of images whatever the number of files).

    Raises:
      ImageSizeError: a file of another size when not resizing.
    """
    batch_size = inputs.count(batch_size or self.batch_size, "batch_size")
    paths = list(paths)
    placed, leaves, probs, skipped = [], [], [], []
    for start in range(0, len(paths), batch_size):
      chunk = paths[start : start + batch_size]
      images, kept = self.decode_files(chunk, resize)
      read = set(kept)
      skipped += [p for i, p in enumerate(chunk) if i not in read]
      if kept:
        leaf, prob = self.assign(inputs.to_unit_range(images), batch_size)
        placed += [chunk[i] for i in kept]
        leaves.append(leaf)
        probs.append(prob)
      if progress is not None:
        progress(min(start + batch_size, len(paths)), len(paths))
    k = self.tree.num_leaves
    return PlacedFiles(
      tuple(placed),
      np.concatenate(leaves) if leaves else np.zeros((0,), np.int64),
      np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
      tuple(skipped),
    )

  # ---------------------------------------------------------------------------- generating

  @property
  def stage2(self):
    """The latest stage-2 checkpoint, loaded once (:func:`diffusion.generate.load_stage2`)."""
    if self._stage2 is None:
      self._stage2 = generate_lib.load_stage2(self.config, self.workdir)
    return self._stage2

  def generate(
    self,
    leaves: Sequence[int] | None = None,
    num: int = 16,
    seed: int = 0,
    generator: str | None = None,
  ) -> dict[int, np.ndarray]:
    """``num`` generated images per leaf.

    Each of ``num`` prior draws is decoded through every leaf's path (the reference's
    ``sample_all_leaves``): image ``i`` of every leaf comes from the same root latent.

    Args:
      leaves: leaf node ids (default: every leaf).
      num: images per leaf.
      seed: the prior draws' seed.
      generator: ``"diffusion"`` or ``"treevae"``; default diffusion when stage 2 has run.

    Returns:
      ``{leaf id: floats [num, H, W, C] in [0, 1]}``.
    """
    num = inputs.count(num, "num")
    leaves = tuple(self.tree.leaves) if leaves is None else tuple(leaves)
    bad = [n for n in leaves if not isinstance(n, (int, np.integer)) or n not in self.tree.leaves]
    if bad:
      raise ValueError(
        f"leaves must be leaf node ids of {self.tree} (its leaves are "
        f"{list(self.tree.leaves)}); got {bad}"
      )
    generator = generator or (DIFFUSION if self.has_stage2 else TREEVAE)
    if generator not in (DIFFUSION, TREEVAE):
      raise ValueError(f"generator must be {DIFFUSION!r} or {TREEVAE!r}; got {generator!r}")
    key = jax.random.key(seed)
    if generator == DIFFUSION:
      s = self.stage2
      out = s.sampler("sample_all_leaves").run(s.ema_params, s.tvae_vars, key, num=num)
      images = np.asarray(out["image"])  # [num, K, H, W, C]
    else:
      images = self._treevae_images(key, num)  # [num, K, H, W, C]
    images = np.clip(images, 0.0, 1.0)
    return {int(n): images[:, self.tree.leaf_index(int(n))] for n in leaves}

  def _treevae_images(self, key, num: int, chunk: int = 256) -> np.ndarray:
    """TreeVAE prior samples through every leaf, ``[num, K, H, W, C]``, ``chunk`` draws per
    compiled call (one compile: the last call is cut)."""
    size = min(num, chunk)
    outs = []
    for i, start in enumerate(range(0, num, size)):
      out = inference.generate(
        self.variables, jax.random.fold_in(key, i), model=self.model, tree=self.tree, num=size
      )
      outs.append(np.asarray(out["images"]).swapaxes(0, 1)[: num - start])
    return np.concatenate(outs)

  def leaf_sizes(self) -> dict[int, int]:
    """Training images per leaf (``stage1_metrics.json``'s ``train.leaf_counts``), ``{}`` when
    unknown."""
    sizes = (self.metrics.get("train") or {}).get("leaf_counts")
    if not isinstance(sizes, list) or len(sizes) != self.tree.num_leaves:
      return {}
    return {int(n): int(s) for n, s in zip(self.tree.leaves, sizes)}

  def export_images(
    self,
    directory: str,
    per_leaf: int | None = None,
    total: int | None = None,
    seed: int = 0,
    generator: str | None = None,
    progress: Callable[[str], None] | None = None,
  ) -> dict:
    """Writes generated images per leaf: ``DIRECTORY/leaf_<id>/<n>.png`` and ``index.csv``
    (columns :data:`INDEX_COLUMNS`; ``draw`` is the prior draw, shared across leaves).

    Args:
      per_leaf: images per leaf; or
      total: images in all, shared in proportion to the leaves' training images (each leaf at
        least one).
      seed, generator: as for :meth:`generate`.

    Returns:
      ``{"generator", "counts": {leaf: n}, "index": path}``. Folders ``leaf_<id>`` and
      ``index.csv`` already in ``directory`` are replaced.
    """
    if (per_leaf is None) == (total is None):
      raise ValueError("pass one of per_leaf (images per leaf) or total (shared by leaf size)")
    counts = self.export_counts(per_leaf, total)
    generator = generator or (DIFFUSION if self.has_stage2 else TREEVAE)
    t0 = time.perf_counter()
    images = self.generate(num=max(counts.values()), seed=seed, generator=generator)
    if progress is not None:
      progress(
        f"generated {sum(counts.values())} images with the {generator} model in "
        f"{time.perf_counter() - t0:.0f} s"
      )
    index = files.join(directory, "index.csv")
    result = {"generator": generator, "counts": counts, "index": index}
    if jax.process_index() != 0:  # every process generated; one writes
      return result
    for name in files.listdir(directory) if files.is_dir(directory) else []:
      if name.startswith("leaf_") and name[5:].isdigit():
        files.rmtree(files.join(directory, name))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for leaf, n in counts.items():
      path = "/".join(str(p) for p in self.tree.path(leaf))
      pixels = generate_lib.to_uint8(images[leaf][:n])
      for i in range(n):
        name = f"leaf_{leaf}/{i}.png"
        files.save_png(
          files.join(directory, name), pixels[i][..., 0] if pixels.shape[-1] == 1 else pixels[i]
        )
        writer.writerow(
          {"file": name, "leaf": leaf, "path": path, "generator": generator, "draw": i}
        )
    files.write_text(index, buf.getvalue())
    return result

  def export_counts(self, per_leaf: int | None, total: int | None) -> dict[int, int]:
    """Images per leaf for :meth:`export_images`: ``per_leaf`` each, or ``total`` shared by the
    leaves' training images (largest remainders; each leaf at least one)."""
    leaves = self.tree.leaves
    if per_leaf is not None:
      per_leaf = inputs.count(per_leaf, "per_leaf")
      return {int(n): per_leaf for n in leaves}
    total = inputs.count(total, "total")
    if total < len(leaves):
      raise ValueError(
        f"total={total} is fewer than the {len(leaves)} leaves, and each leaf gets "
        f"at least one image: pass a total >= {len(leaves)} (or per_leaf)"
      )
    sizes = self.leaf_sizes() or {int(n): 1 for n in leaves}
    weights = np.asarray([max(sizes[int(n)], 0) for n in leaves], np.float64) + 1e-9
    extra = total - len(leaves)
    share = extra * weights / weights.sum()
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: extra - counts.sum()]] += 1
    return {int(n): int(c) + 1 for n, c in zip(leaves, counts)}


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> TrainedRun:
  """Loads a run directory whose stage 1 has finished (see :class:`TrainedRun`).

  ``config``: the run's config with other sampling settings (default: the one it recorded).

  Raises:
    ConfigError: the directory does not exist or holds no recorded config.
    CheckpointError: stage 1 has not finished (no export), or the export cannot be read.
  """
  files.check_path(workdir, "workdir")
  if not files.is_dir(workdir):
    raise ConfigError(
      f"run directory {workdir} does not exist: pass the --workdir of a run "
      f"(train it first with python -m launch.train_treevae)"
    )
  config = read_run_config(workdir) if config is None else config
  run_dir = RunDir(workdir)
  export = config.get("diffusion", {}).get("treevae_export") or run_dir.export
  export = export_lib.resolve_export(export)
  model, variables, tree = export_lib.load_treevae(export)
  return TrainedRun(
    workdir=workdir,
    config=config,
    model=model,
    variables=variables,
    tree=tree,
    export=export,
    metrics=_read_json_or_empty(run_dir.stage1_metrics),
    eval_metrics=_read_json_or_empty(run_dir.eval_metrics),
  )


def placed_rows(tree: Tree, names: Sequence[str], probs: np.ndarray):
  """Rows of :data:`FILE_COLUMNS` for placed files (``probs`` ``[N, K]``)."""
  for row in assignments.probability_rows(tree, probs):
    i = row["index"]
    yield {"file": names[i], **{k: row[k] for k in FILE_COLUMNS if k != "file"}}


def write_placed(path: str, tree: Tree, names: Sequence[str], probs: np.ndarray) -> None:
  """The CSV of :func:`placed_rows`, written atomically (UTF-8; local or ``gs://``)."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=FILE_COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(placed_rows(tree, names, probs))
  files.write_text(path, buf.getvalue())


def relative_names(paths: Sequence[str], root: str | None) -> list[str]:
  """File names for output: relative to ``root`` when given, else as given."""
  if root is None:
    return list(paths)
  return [os.path.relpath(p, root) for p in paths]
