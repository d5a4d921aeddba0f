"""Batch evaluation of run directories: the stage-1 export and every selected stage-2 checkpoint.

For each run directory (``WORKDIR``, as written by the launchers) this computes

* stage 1 (the export, once): NMI, accuracy, leaf purity and dendrogram purity on the test split,
  the importance-sampled test log-likelihood (:mod:`tree_diffusion.eval.likelihood`), and the
  TreeVAE's own FID of generations and reconstructions (leaf *drawn* from the leaf
  probabilities, as the diffusion modes do; the reference's TreeVAE-only routine takes the argmax);
* per stage-2 checkpoint (its EMA weights): FID of ``sample`` generations (overall and per drawn
  leaf, each leaf against the test images the TreeVAE assigns to it), FID of ``recons``
  reconstructions, and the classifier's per-leaf purity of ``sample_all_leaves`` generations at
  each threshold, with PNG grids, the tree figure and the per-leaf histogram figure;

and writes ``WORKDIR/eval/metrics.json``, ``metrics.csv`` (one row per checkpoint), ``report.md``
(the numbers next to the paper's Table 1) and ``step_<N>/*.png``. The Inception network, the
samplers and the reference features (cached in ``WORKDIR/eval/cache``) are built once and reused
for every checkpoint and run directory of the process. Checkpoints already evaluated with the same
settings are skipped unless ``force``.

All FIDs compare against the full **test** split (Table 1 is "test-set generative
performance"); generated images are quantised as ``round(clip(x, 0, 1) · 255)``.

The module is long because it is the one place that joins the stages, the samplers and the metrics
per checkpoint; the metrics themselves live in the modules next to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import clustering
from tree_diffusion import data as data_lib
from tree_diffusion import files, inputs, validation
from tree_diffusion.diffusion import generate
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.frozen import load_stage1
from tree_diffusion.diffusion.sampler import check_config as check_sampler_config
from tree_diffusion.errors import ConfigError
from tree_diffusion.eval import classifier as classifier_lib
from tree_diffusion.eval import fid as fid_lib
from tree_diffusion.eval import purity as purity_lib
from tree_diffusion.eval import report
from tree_diffusion.eval.likelihood import LogLikelihood
from tree_diffusion.files import write_json
from tree_diffusion.lock import locked_workdir
from tree_diffusion.runs import RunDir, check_workdir, format_eta
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.inference import leaf_examples, predict_leaf_probs
from tree_diffusion.treevae.model import TreeVAE
from tree_diffusion.writer import MetricWriter, purity_tag

STAGE2_MODES = ("sample", "recons", "sample_all_leaves", "recons_all_leaves")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an evaluation computes (``config.eval``); part of the key that decides re-evaluation."""

  modes: tuple[str, ...] = ("sample", "recons", "sample_all_leaves")
  num_samples: int = 10000
  recons_num: int = 0
  purity_samples: int = 1000
  fid: bool = True
  fid_batch_size: int = 50
  inception_weights: str = ""
  ll_samples: int = 1000
  ll_batch_size: int = 100
  batch_size: int = 500
  train_classifier: bool = True
  grid_images: int = 64
  seed: int = 0

  @classmethod
  def from_config(cls, config, modes: Sequence[str] | None = None) -> "Settings":
    e = config.eval
    fields = {f.name: e[f.name] for f in dataclasses.fields(cls) if f.name in e}
    fields["modes"] = tuple(modes if modes is not None else fields.get("modes", cls.modes))
    validation.check_eval(config)  # the ranges of config.eval and of the classifier
    check_sampler_config(config)
    s = cls(**fields)
    s.validate()
    return s

  def validate(self):
    bad = [m for m in self.modes if m not in STAGE2_MODES]
    if bad:
      raise ConfigError(
        f"unknown mode(s) {', '.join(bad)}; use --modes with some of {','.join(STAGE2_MODES)}"
      )

  def key(self) -> str:
    d = dataclasses.asdict(self)
    d.pop("inception_weights")
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- selection


def select_steps(available: Sequence[int], spec: str) -> list[int]:
  """``all`` | ``latest`` | ``none`` | comma-separated steps → the steps to evaluate.

  Raises:
    ConfigError: a requested step is not among ``available``, or nothing is available.
  """
  available = sorted(int(s) for s in available)
  spec = (spec or "all").strip().lower()
  if spec == "none":
    return []
  if not available:
    raise ConfigError("no stage-2 checkpoints")
  if spec == "all":
    return available
  if spec == "latest":
    return available[-1:]
  try:
    steps = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(
      f"--checkpoints={spec!r}: use all, latest, none or comma-separated steps (have {available})"
    ) from None
  missing = [s for s in steps if s not in available]
  if missing:
    raise ConfigError(f"no stage-2 checkpoint(s) {missing}; have {available}")
  return steps


# ------------------------------------------------------------------------- TreeVAE passes


@functools.partial(jax.jit, static_argnames=("model", "tree", "num"))
def _tvae_generate(variables, key, *, model: TreeVAE, tree: Tree, num: int):
  out = model.generate(variables, tree, key, num)
  logits = jnp.log(jnp.maximum(out["leaf_probs"], 1e-30))
  leaf = jax.random.categorical(jax.random.fold_in(key, 7), logits)
  return out["images"][leaf, jnp.arange(num)], leaf


@functools.partial(jax.jit, static_argnames=("model", "tree"))
def _tvae_reconstruct(variables, x, key, *, model: TreeVAE, tree: Tree):
  out, _ = model.apply(variables, tree, x, key, train=False, return_recon=True)
  logits = jnp.log(jnp.maximum(out["leaf_probs"], 1e-30))
  leaf = jax.random.categorical(jax.random.fold_in(key, 7), logits)
  return out["recon"][leaf, jnp.arange(x.shape[0])], leaf


def _batched(fn, total: int, batch: int):
  """Runs ``fn(i, n)`` → (images, leaves) for fixed-size batches; concatenates the first ``total``."""
  imgs, leaves = [], []
  for i, start in enumerate(range(0, total, batch)):
    a, b = fn(i, batch)
    n = min(batch, total - start)
    imgs.append(generate.to_uint8(np.asarray(a)[:n]))
    leaves.append(np.asarray(b)[:n])
  return np.concatenate(imgs), np.concatenate(leaves)


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


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
  """Evaluates run directories; holds what is reused across checkpoints and runs."""

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
    self, workdir: str, config, split: str, arrays: data_lib.Arrays
  ) -> np.ndarray:
    """Features of a whole real split, cached in ``WORKDIR/eval/cache`` and in memory."""
    self.extractor()
    meta = {
      "dataset": config.data.name,
      "split": split,
      "num_images": len(arrays),
      "image_shape": list(arrays.images.shape[1:]),
      "images_sha1": fid_lib.images_digest(arrays.images),
      "inception": self._weights_id,
    }
    memo = json.dumps(meta, sort_keys=True)
    path = RunDir(workdir).eval_features(config.data.name, split)
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

  def data_fid(self, config, workdir: str) -> dict:
    """FID between the dataset's own train and test splits (a floor for generated images)."""
    t0 = time.perf_counter()
    train, test = (data_lib.load_arrays(config.data, split) for split in ("train", "test"))
    f_train = self.reference_features(workdir, config, "train", train)
    f_test = self.reference_features(workdir, config, "test", test)
    out = {
      "fid_train_vs_test": fid_lib.fid_from_features(f_train, f_test),
      "num_train": len(train),
      "num_test": len(test),
      "wall_time_s": time.perf_counter() - t0,
    }
    self.log(
      f"{config.data.name}: FID(train, test) = {out['fid_train_vs_test']:.3f} "
      f"({len(train)} vs {len(test)} images, {out['wall_time_s']:.0f} s)"
    )
    return out

  # ------------------------------------------------------------------ stage 1

  def stage1(
    self,
    config,
    workdir: str,
    model: TreeVAE,
    variables,
    tree: Tree,
    test: data_lib.Arrays,
    test_probs: np.ndarray,
    out_dir: str,
  ) -> dict:
    s = self.settings
    t0 = time.perf_counter()
    labels = test.labels if test.num_classes else None
    out = {"clustering": clustering.summary(tree, labels, test_probs)}
    key = jax.random.key(s.seed)
    ll = LogLikelihood(model, tree, s.ll_samples, s.ll_batch_size, self.mesh)
    out["log_likelihood"] = ll.run(variables, test, jax.random.fold_in(key, 1), log=self.log)
    self.log(
      f"stage 1: test log-likelihood {out['log_likelihood']['log_likelihood']:.2f} "
      f"({s.ll_samples} importance samples)"
    )
    if s.fid:
      ref = self.reference_features(workdir, config, "test", test)
      ref_leaves = test_probs.argmax(1)
      k = tree.num_leaves
      gen, gen_leaf = _batched(
        lambda i, b: _tvae_generate(
          variables,
          jax.random.fold_in(jax.random.fold_in(key, 2), i),
          model=model,
          tree=tree,
          num=b,
        ),
        s.num_samples,
        s.batch_size,
      )
      n_rec = s.recons_num or len(test)
      x = inputs.to_unit_range(test.images[:n_rec])
      pad = -len(x) % s.batch_size
      xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
      rec, rec_leaf = _batched(
        lambda i, b: _tvae_reconstruct(
          variables,
          xp[i * b : (i + 1) * b],
          jax.random.fold_in(jax.random.fold_in(key, 3), i),
          model=model,
          tree=tree,
        ),
        n_rec,
        s.batch_size,
      )
      g, r = self.features(gen, "TreeVAE samples"), self.features(rec, "TreeVAE reconstructions")
      out["fid"] = {
        "gen": fid_lib.fid_from_features(g, ref),
        "rec": fid_lib.fid_from_features(r, ref),
        "num_gen": int(len(gen)),
        "num_rec": int(len(rec)),
        "reference": "test",
        "num_reference": int(len(ref)),
        "gen_per_leaf": fid_lib.per_group_fid(g, gen_leaf, ref, ref_leaves, k),
      }
      if _writes():
        for name, imgs in (("treevae_sample.png", gen), ("treevae_recons.png", rec)):
          files.save_png(
            files.join(out_dir, name), generate.image_grid(imgs[: s.grid_images] / 255.0, columns=8)
          )
      self.log(f"stage 1: TreeVAE FID gen {out['fid']['gen']:.2f}, rec {out['fid']['rec']:.2f}")
    out["wall_time_s"] = time.perf_counter() - t0
    return out

  # ------------------------------------------------------------------ stage 2

  def checkpoint(
    self,
    config,
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
    ref = ref_leaves = None
    if s.fid and ({"sample", "recons"} & set(s.modes)):
      ref = self.reference_features(workdir, config, "test", test)
      ref_leaves = test_probs.argmax(1)
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
      imgs = generate.to_uint8(res["image"])
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
      if mode in ("sample", "recons") and s.fid:
        f = self.features(imgs, f"{mode} images")
        m["fid"] = fid_lib.fid_from_features(f, ref)
        m["fid_per_leaf"] = fid_lib.per_group_fid(f, res["leaf"], ref, ref_leaves, k)
        self.log(f"step {stage2.step}: FID {mode} {m['fid']:.2f} ({len(imgs)} images)")
      if mode == "sample_all_leaves":
        if classifier is not None:
          m["purity"] = purity_lib.leaf_purity_report(
            classifier,
            imgs,
            res["leaf_probs"],
            config.classifier.thresholds,
            s.batch_size,
            mesh=self.mesh,
          )
          pred = np.asarray(m["purity"].pop("predicted"))
          for t in config.classifier.thresholds if _writes() else ():  # process 0 writes
            purity_lib.save_leaf_histogram_figure(
              files.join(out_dir, f"leaf_histograms_p{t:g}.png"),
              imgs,
              res["leaf_probs"],
              pred,
              classifier.model.num_classes,
              t,
              class_names=classifier.class_names,
              leaf_labels=[str(n) for n in stage2.tree.leaves],
              title=f"{config.data.name}, step {stage2.step}: classes of samples with "
              f"p(leaf) ≥ {t:g}",
            )
          # The TreeVAE's own decodings of the same prior samples through the same leaves, kept
          # by the same leaf probabilities: the column the diffusion model is compared with.
          m["purity_treevae"] = purity_lib.leaf_purity_report(
            classifier,
            generate.to_uint8(res["vae_image"]),
            res["leaf_probs"],
            config.classifier.thresholds,
            s.batch_size,
            mesh=self.mesh,
          )
          m["purity_treevae"].pop("predicted")
          first_t = str(float(config.classifier.thresholds[0]))
          first, tvae = (m[k]["thresholds"][first_t] for k in ("purity", "purity_treevae"))
          self.log(
            f"step {stage2.step}: weighted majority fraction at p ≥ {first['threshold']}: "
            f"diffusion {first['weighted_majority_fraction']}, TreeVAE "
            f"{tvae['weighted_majority_fraction']} ({first['total_kept']} kept)"
          )
        if _writes():
          self._tree_figure(
            config, stage2, test, test_probs, res, m.get("purity"), files.join(out_dir, "tree.png")
          )
      out["modes"][mode] = m
    out["wall_time_s"] = time.perf_counter() - t0
    return out

  def _tree_figure(self, config, stage2, test, test_probs, res, purity, path):
    """The tree with, per leaf: test images, TreeVAE and diffusion samples, class histogram."""
    from tree_diffusion.treevae import figure  # pylint: disable=g-import-not-at-top

    num = config.diffusion.sampling.figure_images_per_leaf
    k = stage2.tree.num_leaves
    share, real = leaf_examples(test_probs, test, num)
    vae, ddpm = generate.most_likely_per_leaf(res, num)
    rows_, titles = (
      [real, np.clip(vae, 0, 1), np.clip(ddpm, 0, 1)],
      ["test", "TreeVAE", "diffusion"],
    )
    if purity is not None:
      t = str(float(config.classifier.thresholds[0]))
      hists = [leaf["histogram"] for leaf in purity["thresholds"][t]["leaves"]]
      rows_.append(histogram_images(hists))
      titles.append(f"classes (p>={float(t):g})")
    figure.save_tree_figure(
      path,
      stage2.tree,
      share,
      rows_,
      row_titles=titles,
      title=f"{config.data.name}: {k} leaves, step {stage2.step}",
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
      metrics["data"] = self.data_fid(config, workdir)
    test_probs = predict_leaf_probs(model, variables, tree, test, s.batch_size)
    skey = s.key()
    if force or metrics.get("stage1", {}).get("settings_key") != skey:
      self.log(f"{workdir}: evaluating the stage-1 export ({tree.num_leaves} leaves)")
      metrics["stage1"] = dict(
        self.stage1(config, workdir, model, variables, tree, test, test_probs, eval_dir),
        settings_key=skey,
      )
      _write_json(metrics_path, metrics)
      epochs = (export_meta.get("metrics") or {}).get("epochs")
      _log_scalars(
        run_dir.tensorboard, max(int(epochs or 0) - 1, 0), stage1_scalars(metrics["stage1"])
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
          config, workdir, stage2, test, test_probs, classifier, run_dir.eval_step(step)
        ),
        settings_key=skey,
      )
      _write_json(metrics_path, metrics)
      _log_scalars(
        run_dir.stage2_tensorboard,
        step,
        checkpoint_scalars(done[str(step)], metrics["stage1"], config.classifier.thresholds),
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
    directory = classifier_lib.classifier_dir(config, workdir)
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


def stage1_scalars(stage1: dict) -> dict[str, float]:
  """TensorBoard scalars of the stage-1 evaluation: the TreeVAE's own FIDs, the test clustering
  metrics and the log-likelihood (those that were computed)."""
  fid, clus = stage1.get("fid") or {}, stage1.get("clustering") or {}
  out = {
    "eval/fid_gen": fid.get("gen"),
    "eval/fid_rec": fid.get("rec"),
    "eval/log_likelihood": (stage1.get("log_likelihood") or {}).get("log_likelihood"),
    **{f"eval/{k}": clus.get(k) for k in ("nmi", "accuracy", "leaf_purity", "dendrogram_purity")},
  }
  return {k: float(v) for k, v in out.items() if v is not None}


def checkpoint_scalars(checkpoint: dict, stage1: dict, thresholds=()) -> dict[str, float]:
  """TensorBoard scalars of one stage-2 checkpoint: FID(gen) and FID(rec), the weighted majority
  fraction of generations kept at each threshold, and stage 1's test NMI (those computed)."""
  modes = checkpoint.get("modes") or {}
  purity = ((modes.get("sample_all_leaves") or {}).get("purity") or {}).get("thresholds") or {}
  out = {
    "eval/fid_gen": (modes.get("sample") or {}).get("fid"),
    "eval/fid_rec": (modes.get("recons") or {}).get("fid"),
    "eval/nmi": (stage1.get("clustering") or {}).get("nmi"),
    **{
      purity_tag(t): (purity.get(str(float(t))) or {}).get("weighted_majority_fraction")
      for t in thresholds
    },
  }
  return {k: float(v) for k, v in out.items() if v is not None}


def _log_scalars(logdir: str, step: int, scalars: dict[str, float]) -> None:
  """``scalars`` at ``step`` into the run's TensorBoard directory ``logdir`` (an event file of the
  evaluation's own, closed at once: what was evaluated stays logged if a later checkpoint fails)."""
  if scalars:
    writer = MetricWriter(logdir, job="eval")
    writer.write_scalars(step, scalars)
    writer.close()


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
