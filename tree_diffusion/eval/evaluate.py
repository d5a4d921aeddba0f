"""Batch evaluation of run directories: the stage-1 export and every selected stage-2 checkpoint.

For each run directory (``WORKDIR``, as written by the launchers) this computes the metrics that
``config.eval.metrics`` names (modules of :mod:`tree_diffusion.eval.metrics`, which documents
them and the row schema of their numbers):

* once, on the stage-1 export and the test split, the ``stage1`` metrics (by default clustering,
  test log-likelihood, the TreeVAE's own FIDs, leaf-size entropy);
* per stage-2 checkpoint (its EMA weights), the generations of each mode in ``eval.modes``, their
  PNG grid, the ``samples`` metrics that read that mode (by default FID of ``sample`` and
  ``recons``, the classifier's per-leaf purity of ``sample_all_leaves`` and the faithfulness of
  each leaf's class mix), and the tree figure;

and writes ``WORKDIR/eval/metrics.json``, ``metrics.csv`` (one row per checkpoint), ``report.md``
(the numbers next to the paper's Table 1) and ``step_<N>/*.png``. The Inception network, the
samplers and the reference features (cached in ``WORKDIR/eval/cache``) are built once and reused
for every checkpoint and run directory of the process. Checkpoints already evaluated with the same
settings are skipped unless ``force``.

All FIDs compare against the full **test** split (Table 1 is "test-set generative
performance"); generated images are quantised as ``round(clip(x, 0, 1) · 255)``.

The module is long because it is the one place that joins the stages, the samplers, the Inception
features shared across runs and the metric modules per checkpoint; the metrics themselves are
modules of :mod:`tree_diffusion.eval.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion import files, inputs
from tree_diffusion.diffusion import generate
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.frozen import load_stage1
from tree_diffusion.errors import ConfigError
from tree_diffusion.eval import classifier as classifier_lib
from tree_diffusion.eval import metrics as metrics_lib
from tree_diffusion.eval import purity as purity_lib
from tree_diffusion.eval.settings import STAGE2_MODES, Settings, select_steps  # noqa: F401 (re-exported)
from tree_diffusion.eval import fid as fid_lib
from tree_diffusion.eval import report
from tree_diffusion.files import write_json
from tree_diffusion.lock import locked_workdir
from tree_diffusion.runs import RunDir, check_workdir, format_eta
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.inference import leaf_examples, predict_leaf_probs
from tree_diffusion.treevae.model import TreeVAE


# ----------------------------------------------------------------------------- evaluator


@dataclasses.dataclass(frozen=True)
class Scope:
  """What the evaluation of a run reads from its config besides ``config.eval`` (:class:`Settings`):
  only :meth:`Evaluator.run` sees the whole config."""

  dataset: str  # config.data.name
  thresholds: tuple[float, ...]  # config.classifier.thresholds
  figure_images_per_leaf: int  # config.diffusion.sampling.figure_images_per_leaf

  @classmethod
  def from_config(cls, config) -> "Scope":
    return cls(
      config.data.name,
      tuple(float(t) for t in config.classifier.thresholds),
      int(config.diffusion.sampling.figure_images_per_leaf),
    )


class Evaluator:
  """Evaluates run directories; holds what is reused across checkpoints and runs."""

  writes = property(lambda self: _writes(), doc="Whether this process writes the files.")

  def __init__(self, settings: Settings, *, mesh=None, log: Callable[[str], Any] = logging.info):
    self.settings, self.mesh, self.log = settings, mesh, log
    self._extractor = None
    self._weights_id = None
    self._reference_memo: dict[str, np.ndarray] = {}

  def with_settings(self, settings: Settings) -> "Evaluator":
    """An evaluator of ``settings`` (runs evaluated with their own configs may differ in
    ``config.eval``): ``self`` if they are its own; else a new one that shares the loaded
    Inception network when the weights and the feature batch are the same, and the real images'
    features (keyed by the dataset, its images and the weights, so valid for every run)."""
    if settings == self.settings:
      return self
    other = Evaluator(settings, mesh=self.mesh, log=self.log)
    other._reference_memo = self._reference_memo
    same_net = (settings.inception_weights, settings.fid_batch_size) == (
      self.settings.inception_weights,
      self.settings.fid_batch_size,
    )
    if same_net:
      other._extractor, other._weights_id = self._extractor, self._weights_id
    return other

  # ------------------------------------------------------------------ Inception features

  def extractor(self):
    if self._extractor is None:
      from tree_diffusion.eval import inception  # pylint: disable=g-import-not-at-top
      from tree_diffusion.eval import inception_weights  # pylint: disable=g-import-not-at-top

      t0 = time.perf_counter()
      params, self._weights_id = inception_weights.load_inception_params(
        self.settings.inception_weights or None, with_id=True
      )
      self._extractor = inception.FeatureExtractor(
        params, batch_size=self.settings.fid_batch_size, mesh=self.mesh
      )
      self.log(f"Inception weights loaded in {time.perf_counter() - t0:.1f} s")
    return self._extractor

  def features(self, images: np.ndarray, what: str) -> np.ndarray:
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int):
      now = time.perf_counter()
      if now - last[0] >= 30.0 and done < total:  # long feature passes report every 30 s
        last[0] = now
        self.log(
          f"Inception features of {what}: {done}/{total}, ETA "
          f"{format_eta((now - t0) / done * (total - done))}"
        )

    out = self.extractor()(images, progress)
    dt = time.perf_counter() - t0
    self.log(
      f"Inception features of {len(images)} {what} in {dt:.1f} s "
      f"({len(images) / max(dt, 1e-9):.1f} images/s)"
    )
    return out

  def reference_features(
    self, workdir: str, dataset: str, split: str, arrays: data_lib.Arrays
  ) -> np.ndarray:
    """Features of a whole real split, cached in ``WORKDIR/eval/cache`` and in memory."""
    self.extractor()
    meta = {
      "dataset": dataset,
      "split": split,
      "num_images": len(arrays),
      "image_shape": list(arrays.images.shape[1:]),
      "images_sha1": fid_lib.images_digest(arrays.images),
      "inception": self._weights_id,
    }
    memo = json.dumps(meta, sort_keys=True)
    path = RunDir(workdir).eval_features(dataset, split)
    if memo in self._reference_memo:
      feats = self._reference_memo[memo]
      if _writes() and fid_lib.load_features(path, meta) is None:
        fid_lib.save_features(path, feats, meta)
      return feats
    compute = lambda: self.features(arrays.images, f"real {split} images")
    if jax.process_count() == 1:
      feats = fid_lib.cached_features(path, meta, compute)
    else:  # process 0's cache decides for all: computing the features is a collective
      feats = _from_process0(fid_lib.load_features(path, meta) if _writes() else None)
      if feats is None:
        feats = np.asarray(compute(), np.float32)
        if _writes():
          fid_lib.save_features(path, feats, meta)
    self._reference_memo[memo] = feats
    return feats

  def data_fid(self, data_config, workdir: str) -> dict:
    """FID between the dataset's own train and test splits (a floor for generated images)."""
    t0 = time.perf_counter()
    train, test = (data_lib.load_arrays(data_config, split) for split in ("train", "test"))
    f_train = self.reference_features(workdir, data_config.name, "train", train)
    f_test = self.reference_features(workdir, data_config.name, "test", test)
    out = {
      "fid_train_vs_test": fid_lib.fid_from_features(f_train, f_test),
      "num_train": len(train),
      "num_test": len(test),
      "wall_time_s": time.perf_counter() - t0,
    }
    self.log(
      f"{data_config.name}: FID(train, test) = {out['fid_train_vs_test']:.3f} "
      f"({len(train)} vs {len(test)} images, {out['wall_time_s']:.0f} s)"
    )
    return out

  # ------------------------------------------------------------------ stage 1

  def stage1(
    self,
    scope: Scope,
    workdir: str,
    model: TreeVAE,
    variables,
    tree: Tree,
    test: data_lib.Arrays,
    test_probs: np.ndarray,
    out_dir: str,
  ) -> dict:
    t0 = time.perf_counter()
    ctx = metrics_lib.Stage1Context(
      self,
      scope.dataset,
      scope.thresholds,
      workdir,
      model,
      variables,
      tree,
      test,
      test_probs,
      out_dir,
    )
    out = {}
    for metric in metrics_lib.of_stage(metrics_lib.load(self.settings.metrics), "stage1"):
      entry = metric.compute(ctx)
      if entry:
        out[metrics_lib.key(metric)] = entry
    out["wall_time_s"] = time.perf_counter() - t0
    return out

  # ------------------------------------------------------------------ stage 2

  def checkpoint(
    self,
    scope: Scope,
    workdir: str,
    stage2: generate.Stage2,
    test: data_lib.Arrays,
    test_probs: np.ndarray,
    classifier,
    out_dir: str,
  ) -> dict:
    s = self.settings
    t0 = time.perf_counter()
    if _writes():
      files.makedirs(out_dir)
    key = jax.random.key(s.seed)
    k = stage2.tree.num_leaves
    metrics = metrics_lib.of_stage(metrics_lib.load(s.metrics), "samples")
    out: dict[str, Any] = {"step": int(stage2.step), "modes": {}}
    for mode in s.modes:
      sampler = stage2.sampler(mode, self.mesh)
      images = None
      if mode == "sample":
        num = s.num_samples
      elif mode == "sample_all_leaves":
        num = s.purity_samples
      else:
        n_rec = s.recons_num or len(test)
        images, num = inputs.to_unit_range(test.images[:n_rec]), None
      t1 = time.perf_counter()
      res = sampler.run(
        stage2.ema_params, stage2.tvae_vars, jax.random.fold_in(key, 10), num=num, images=images
      )
      imgs = generate.to_uint8(res["image"], s.quantize)
      m: dict[str, Any] = {
        "images": int(imgs.shape[0] * (k if sampler.all_leaves else 1)),
        "sampling_s": time.perf_counter() - t1,
      }
      if _writes():
        grid = imgs[: max(1, s.grid_images // k)] if sampler.all_leaves else imgs[: s.grid_images]
        files.save_png(
          files.join(out_dir, f"{mode}.png"),
          generate.image_grid(
            grid.reshape((-1,) + imgs.shape[-3:]) / 255.0, columns=k if sampler.all_leaves else 8
          ),
        )
      ctx = metrics_lib.SamplesContext(
        evaluator=self,
        dataset=scope.dataset,
        thresholds=scope.thresholds,
        workdir=workdir,
        model=stage2.model,
        variables=stage2.tvae_vars,
        tree=stage2.tree,
        test=test,
        test_probs=test_probs,
        out_dir=out_dir,
        stage2=stage2,
        mode=mode,
        result=res,
        images=imgs,
        classifier=classifier,
      )
      for metric in metrics:
        if mode in metric.MODES:
          m.update(metric.compute(ctx))
      if mode == "sample_all_leaves" and _writes():
        self._tree_figure(
          scope, stage2, test, test_probs, res, m.get("purity"), files.join(out_dir, "tree.png")
        )
      out["modes"][mode] = m
    out["wall_time_s"] = time.perf_counter() - t0
    return out

  def _tree_figure(self, scope: Scope, stage2, test, test_probs, res, purity, path):
    """The tree with, per leaf: test images, TreeVAE and diffusion samples, class histogram."""
    from tree_diffusion.treevae import figure  # pylint: disable=g-import-not-at-top

    num = scope.figure_images_per_leaf
    k = stage2.tree.num_leaves
    share, real = leaf_examples(test_probs, test, num)
    vae, ddpm = generate.most_likely_per_leaf(res, num)
    rows_, titles = (
      [real, np.clip(vae, 0, 1), np.clip(ddpm, 0, 1)],
      ["test", "TreeVAE", "diffusion"],
    )
    if purity is not None:
      t = str(float(scope.thresholds[0]))
      hists = [leaf["histogram"] for leaf in purity["thresholds"][t]["leaves"]]
      rows_.append(purity_lib.histogram_images(hists))
      titles.append(f"classes (p>={float(t):g})")
    figure.save_tree_figure(
      path,
      stage2.tree,
      share,
      rows_,
      row_titles=titles,
      title=f"{scope.dataset}: {k} leaves, step {stage2.step}",
    )

  # ------------------------------------------------------------------ a whole run

  def run(
    self,
    config,
    workdir: str,
    checkpoints: str = "all",
    force: bool = False,
    data_fid: bool = False,
  ) -> dict:
    """Evaluates ``workdir``; returns (and writes) its ``eval/metrics.json`` content.

    ``WORKDIR/eval`` is locked meanwhile (a second evaluation of the same workdir refuses in one
    line); the checkpoints are only read, so training may go on in the same workdir.
    """
    eval_dir = RunDir(workdir).eval
    check_workdir(eval_dir)
    with locked_workdir(eval_dir, "evaluation (launch/evaluate.py)"):
      return self._run(config, workdir, checkpoints, force, data_fid)

  def _run(self, config, workdir: str, checkpoints: str, force: bool, data_fid: bool) -> dict:
    s = self.settings
    run_dir = RunDir(workdir)
    eval_dir, metrics_path = run_dir.eval, run_dir.eval_metrics
    stage2_ckpt_dir = run_dir.stage2_checkpoints
    available = Stage2Checkpoints.steps_in(stage2_ckpt_dir)
    try:
      steps = select_steps(available, checkpoints)
    except ConfigError as e:
      if str(e) == "no stage-2 checkpoints":
        raise ConfigError(
          f"no stage-2 checkpoints in {stage2_ckpt_dir}: train stage 2 "
          f"(python -m launch.train_diffusion --workdir={workdir}) or pass "
          f"--checkpoints=none to evaluate stage 1 only"
        ) from None
      raise
    if s.fid:
      self.extractor()  # a missing weights file is an error before any heavy work
    scope = Scope.from_config(config)
    model, variables, tree, export, fingerprint, export_meta = load_stage1(config, workdir)
    test = data_lib.load_arrays(config.data, "test")
    data_lib.check_image_shape(test, config.data)
    metrics = report.read_json(metrics_path)
    if metrics.get("export_fingerprint") != fingerprint:
      metrics = {}
    metrics.update(
      dataset=config.data.name,
      export=export,
      export_fingerprint=fingerprint,
      num_leaves=tree.num_leaves,
      settings=dataclasses.asdict(s),
    )
    if data_fid and s.fid and (force or "data" not in metrics):
      metrics["data"] = self.data_fid(config.data, workdir)
    test_probs = predict_leaf_probs(model, variables, tree, test, s.batch_size)
    skey = s.key()
    if force or metrics.get("stage1", {}).get("settings_key") != skey:
      self.log(f"{workdir}: evaluating the stage-1 export ({tree.num_leaves} leaves)")
      metrics["stage1"] = dict(
        self.stage1(scope, workdir, model, variables, tree, test, test_probs, eval_dir),
        settings_key=skey,
      )
      _write_json(metrics_path, metrics)
      epochs = (export_meta.get("metrics") or {}).get("epochs")
      report.log_scalars(
        run_dir.tensorboard, max(int(epochs or 0) - 1, 0), report.stage1_scalars(metrics["stage1"])
      )
    else:
      self.log(f"{workdir}: stage 1 already evaluated with these settings")
    done = metrics.setdefault("checkpoints", {})
    todo = [st for st in steps if force or done.get(str(st), {}).get("settings_key") != skey]
    if len(todo) < len(steps):
      self.log(
        f"{workdir}: skipping checkpoints {sorted(set(steps) - set(todo))} (already "
        f"evaluated; --force re-evaluates)"
      )
    classifier = (
      self._classifier(config, workdir) if (todo and "sample_all_leaves" in s.modes) else None
    )
    stage2 = None
    t0 = time.perf_counter()
    for i, step in enumerate(todo):
      stage2 = (
        generate.load_stage2(config, workdir, step)
        if stage2 is None
        else generate.with_checkpoint(stage2, workdir, step)
      )
      self.log(f"{workdir}: evaluating stage-2 checkpoint {step} ({i + 1}/{len(todo)})")
      done[str(step)] = dict(
        self.checkpoint(
          scope, workdir, stage2, test, test_probs, classifier, run_dir.eval_step(step)
        ),
        settings_key=skey,
      )
      _write_json(metrics_path, metrics)
      report.log_scalars(
        run_dir.stage2_tensorboard,
        step,
        report.checkpoint_scalars(done[str(step)], metrics["stage1"], config.classifier.thresholds),
      )
      dt = time.perf_counter() - t0
      self.log(
        f"{workdir}: checkpoint {step} done; ETA {format_eta(dt / (i + 1) * (len(todo) - i - 1))}"
      )
    if classifier is not None:
      metrics["classifier"] = {k: classifier.meta.get(k) for k in ("test_accuracy", "model")}
    _write_json(metrics_path, metrics)
    if _writes():
      report.write_csv(run_dir.eval_csv, metrics)
      report.write_report(run_dir.eval_report, metrics, config)
    return metrics

  def _classifier(self, config, workdir: str):
    """The purity classifier (trained here if absent and allowed); ``None`` without labels."""
    train = data_lib.load_arrays(config.data, "train")
    if train.num_classes < 2:
      self.log(
        f"{'no labels' if not train.num_classes else 'a single class'}: the classifier "
        f"purity of generations is skipped"
      )
      return None
    directory = classifier_lib.classifier_dir(config.classifier, workdir)
    if (
      files.exists(files.join(directory, classifier_lib.META_FILE))
      or not self.settings.train_classifier
    ):
      return classifier_lib.load_for_config(
        config, workdir
      )  # a mismatch is an error, not retrained
    self.log(
      f"no classifier in {directory}: training one (config.classifier; disable with "
      f"--config.eval.train_classifier=False)"
    )
    test = data_lib.load_arrays(config.data, "test")
    clf, _ = classifier_lib.train_classifier(config, train, test, mesh=self.mesh, log=self.log)
    if _writes():
      classifier_lib.save_classifier(directory, clf)
    return clf


def _writes() -> bool:
  """Whether this process writes the evaluation's files: in a multi-process job every process
  computes (sampling and Inception features are split over all devices) and process 0 writes."""
  return jax.process_index() == 0


def _from_process0(features: np.ndarray | None) -> np.ndarray | None:
  """Process 0's ``features`` (or its ``None``) on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  shape = np.asarray(features.shape if features is not None else (-1, -1), np.int64)
  shape = multihost_utils.broadcast_one_to_all(shape)
  if shape[0] < 0:
    return None
  local = features if features is not None else np.zeros(tuple(shape), np.float32)
  return np.asarray(multihost_utils.broadcast_one_to_all(local), np.float32)


def _write_json(path: str, obj: dict) -> None:
  if _writes():
    write_json(path, obj, default=ckpt_lib.json_default)
