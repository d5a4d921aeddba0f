"""Stage-1 training: the grow → prune → fine-tune schedule around the jitted steps of
:mod:`tree_diffusion.treevae.step`.

The schedule is a host-side state machine whose position (the *cursor*) is saved with every
checkpoint, so a run resumes at the phase where it stopped.

The module is long because the phases and the end of a run (final metrics, export, tree figure)
all act on one run state (``_Run``) that only stage-1 training needs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import clustering
from tree_diffusion import data as data_lib
from tree_diffusion import files, loop, preemption, sharding, validation
from tree_diffusion.loop import TrainState
from tree_diffusion import writer as writer_lib
from tree_diffusion.errors import ConfigError
from tree_diffusion.lock import locked_workdir
from tree_diffusion.runs import RunDir, check_workdir, format_eta, save_config
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import assignments, growing
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.checkpoints import Stage1Checkpoints
from tree_diffusion.treevae.cursor import Cursor, Split
from tree_diffusion.treevae.inference import generate, predict_leaf_probs, test_examples
from tree_diffusion.treevae.model import (
  TreeVAE,
  grow_variables,
  merge_split_variables,
  prune_variables,
  split_variables,
)
from tree_diffusion.treevae.step import (  # noqa: F401 (also re-exported for the tests)
  StepConfig,
  _train_step,
  eval_terms,
  init_state,
  initial_tree,
  loss_terms,
  make_model,
  split_step,
  step_config,
  train_step,
)
from tree_diffusion.writer import MetricWriter

PyTree = Any


# --------------------------------------------------------------------------------- schedule


def kl_weight(epoch: int, kl_start: float, decay: float) -> float:
  """KL annealing within a phase: ``min(1, kl_start + epoch·decay)`` during ``epoch``."""
  return float(min(1.0, kl_start + epoch * decay))


def step_lr(epoch: int, lr: float, decay_lr: float, decay_stepsize: int) -> float:
  """PyTorch StepLR stepped once per epoch."""
  return float(lr * decay_lr ** (epoch // decay_stepsize))


@dataclasses.dataclass
class _Run:
  """What the phases of one run share (not part of the checkpoint). Of the config, the phases see
  only the ``stage1`` section and the dataset's name: :func:`_train_and_export` is the one place
  that sees the whole config."""

  c: Any  # config.stage1
  dataset: str  # config.data.name
  model: TreeVAE
  train: data_lib.Arrays
  test: data_lib.Arrays
  writer: MetricWriter
  key: jax.Array
  mesh: Any
  ckpts: Stage1Checkpoints | None = None
  stop: preemption.StopRequest = dataclasses.field(default_factory=preemption.never)
  global_epoch: int = 0
  images_per_second: list = dataclasses.field(default_factory=list)


def _step_config(run: _Run) -> StepConfig:
  return step_config(run.c)


def train_phase(
  run: _Run,
  name: str,
  variables,
  tree: Tree,
  epochs: int,
  *,
  phase_id: int,
  parent: int | None = None,
  indices: np.ndarray | None = None,
  decay_kl: float | None = None,
  resume_state: TrainState | None = None,
  save_in_phase=None,
):
  """Trains for ``epochs`` with a fresh optimiser, StepLR and KL annealer; returns new variables.

  Everything a step sees is a function of ``(phase_id, state.step)``: the batch order (a seeded
  permutation per epoch), the step's key, α and the learning rate. So a phase resumed from
  ``resume_state`` (a checkpoint taken inside it) continues bit for bit as if never stopped.
  ``save_in_phase(state)`` writes such a checkpoint (every ``stage1.checkpoint_every_steps`` and
  when ``run.stop`` asks for a stop, after which :class:`preemption.Preempted` is raised).
  """
  c = run.c
  if epochs <= 0:
    return variables
  cfg = _step_config(run)
  # Contrastive batches hold two views of batch_size/2 images.
  load_bs = c.batch_size // 2 if cfg.contrastive else c.batch_size
  n = len(run.train) if indices is None else len(indices)
  steps_per_epoch = data_lib.num_batches(n, load_bs, drop_remainder=True)
  if steps_per_epoch == 0:
    logging.warning(
      "%s: %d samples are fewer than one batch of %d; phase skipped", name, n, load_bs
    )
    return variables
  decay_kl = c.decay_kl if decay_kl is None else decay_kl
  # Everything the steps see lives on the mesh, replicated: inputs whose sharding differs from the
  # steps' outputs (e.g. freshly initialised arrays) would make jit retrace and recompile.
  variables = sharding.replicate(variables, run.mesh)
  trained = variables if parent is None else split_variables(variables, tree, parent)
  state = init_state(trained, cfg) if resume_state is None else resume_state
  state = sharding.replicate(state, run.mesh)
  phase_key = sharding.replicate(jax.random.fold_in(run.key, phase_id), run.mesh)
  total = epochs * steps_per_epoch
  done = int(state.step)  # steps of this phase already taken
  logging.info(
    "%s: %d epochs × %d steps on %d samples, tree %s%s",
    name,
    epochs,
    steps_per_epoch,
    n,
    tree,
    f" (resumed at step {done})" if done else "",
  )
  progress = loop.Progress(total, c.batch_size, done, rates=run.images_per_second)
  rows = sharding.process_rows(run.mesh, load_bs)  # this process's block of every batch

  def check_finite(sums, count, epoch):
    means = {k: float(v) / max(count, 1) for k, v in jax.device_get(sums).items()}
    terms = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
    loop.check_finite(
      means["loss"],
      f"stage 1, {name}, epoch {epoch + 1}, phase step {done} (mean of the last "
      f"{count} steps: {terms})",
      f"Re-run with a lower --config.stage1.lr (now {c.lr:g}) in "
      f"a new --workdir (a resume in this one keeps its checkpoints' learning rate), or check "
      f"the data",
      last_good="none" if run.ckpts is None else run.ckpts.describe_latest(),
    )
    return means

  def save(epoch, sums, count):
    check_finite(sums, count, epoch)  # never save a diverged state
    return save_in_phase(state)

  for epoch in range(done // steps_per_epoch, epochs):
    alpha = kl_weight(epoch, c.kl_start, decay_kl)
    lr = step_lr(epoch, c.lr, c.decay_lr, c.decay_stepsize)
    # On the mesh once per epoch: the steps then never wait for a host-to-device copy.
    alpha_d, lr_d = sharding.replicate((np.float32(alpha), np.float32(lr)), run.mesh)
    progress.start_window(done)
    sums, count = None, 0
    epoch_batches = data_lib.batches(
      run.train,
      load_bs,
      shuffle=True,
      seed=c.seed + phase_id,
      epoch=epoch,
      drop_remainder=True,
      indices=indices,
      part=rows,
      skip=done - epoch * steps_per_epoch,
    )
    for batch in sharding.prefetch(
      ({"image": b["image"]} for b in epoch_batches), run.mesh, load_bs
    ):
      images = batch["image"]
      if parent is None:
        state, terms = train_step(
          state, images, phase_key, alpha_d, lr_d, model=run.model, tree=tree, cfg=cfg
        )
      else:
        state, terms = split_step(
          state,
          variables,
          images,
          phase_key,
          alpha_d,
          lr_d,
          model=run.model,
          tree=tree,
          parent=parent,
          cfg=cfg,
        )
      sums = terms if sums is None else jax.tree_util.tree_map(jnp.add, sums, terms)
      done, count = done + 1, count + 1
      if done == total or save_in_phase is None:
        continue  # the phase's end is saved by the schedule
      loop.checkpoint_if_due(
        run.stop,
        done,
        c.checkpoint_every_steps,
        functools.partial(save, epoch, sums, count),
        lambda saved: (
          f"in {name} at phase step {done}/{total}; checkpoint {saved} saved in "
          f"{run.ckpts.directory}"
        ),
      )
    means = check_finite(sums, count, epoch)
    ips, eta = progress.report(done)  # the first epoch of a process includes compilation
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars.update(
      {
        "train/alpha": alpha,
        "train/lr": lr,
        "train/images_per_second": ips,
        "tree/num_leaves": tree.num_leaves,
      }
    )
    log_line = (
      f"{name} epoch {epoch + 1}/{epochs}: loss {means['loss']:.2f} rec {means['rec']:.2f} "
      f"kl_root {means['kl_root']:.2f} kl_nodes {means['kl_nodes']:.2f} "
      f"kl_dec {means['kl_decisions']:.3f} aug {means['aug']:.3f} α {alpha:.3f} "
      f"lr {lr:.1e} | {ips:.0f} img/s, phase ETA {format_eta(eta)}"
    )
    last = epoch == epochs - 1
    if parent is None:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    if c.eval_every_epochs and ((epoch + 1) % c.eval_every_epochs == 0 or last):
      if run.test.num_classes and parent is None:
        probs = predict_leaf_probs(run.model, variables, tree, run.test, c.eval_batch_size)
        nmi = clustering.nmi(run.test.labels, probs.argmax(1))
        scalars["test/nmi"] = nmi
        log_line += f" | test NMI {nmi:.3f}"
    run.writer.write_scalars(run.global_epoch, scalars)
    run.global_epoch += 1
    if c.log_every_epochs and ((epoch + 1) % c.log_every_epochs == 0 or last or epoch == 0):
      logging.info(log_line)
  if parent is not None:
    variables = merge_split_variables(
      variables, tree, parent, {"params": state.params, "batch_stats": state.batch_stats}
    )
  return variables


# --------------------------------------------------------------------------------- the run


# The schedule is a state machine over ``Cursor.phase`` (see ``cursor.py``). Each pass of the loop
# in :func:`train_and_export` runs one phase and saves a checkpoint; a checkpoint taken inside a
# training phase also holds the phase's train state (``Cursor.in_phase_step`` is then set and the
# pass resumes instead of restarting).


def _read_cursor(meta: dict, where: str) -> Cursor:
  try:
    return Cursor.from_json(meta["cursor"])
  except (KeyError, TypeError, ValueError) as e:
    raise ckpt_lib.CheckpointError(
      f"{where} holds no readable schedule cursor ({e}): start afresh with a new --workdir"
    ) from None


def _grow_decision(run: _Run, variables, tree: Tree, cursor: Cursor, phase_id: int):
  """The ``grow`` state: intermediate training is due, or pick a leaf and grow it.

  Returns ``(variables, tree, cursor, indices)``; ``indices`` are the rows the new small tree
  trains on (``None`` unless the next state is ``small_tree``).
  """
  c = run.c
  it = cursor.iteration
  if (
    c.intermediate_fulltrain
    and it > 0
    and it % 3 == 0
    and not cursor.intermediate_done
    and c.num_epochs_intermediate_fulltrain > 0
  ):
    return variables, tree, cursor.to("intermediate"), None

  probs = predict_leaf_probs(run.model, variables, tree, run.train, c.eval_batch_size)
  decision = growing.select_leaf(
    tree,
    probs,
    batch_size=growing.min_samples_to_split(c),
    max_depth=run.model.max_depth,
    num_clusters=c.num_clusters_tree,
    not_expandable=frozenset(cursor.not_expandable),
  )
  not_expandable = tuple(sorted(set(cursor.not_expandable) | set(decision.not_expandable)))
  logging.info(
    "growing iteration %d: %s (effective leaves %d; counts %s)",
    it,
    decision.reason,
    decision.n_effective,
    decision.counts,
  )
  if decision.leaf is None:
    return variables, tree, cursor.to("prune", not_expandable=not_expandable), None
  indices = growing.subset_indices(probs, tree, decision.leaf, decision.threshold).astype(np.int32)
  grow_key = jax.random.fold_in(jax.random.fold_in(run.key, 10_000), phase_id)
  tree, variables = grow_variables(run.model, variables, tree, decision.leaf, grow_key)
  split = Split(
    leaf=int(decision.leaf), n_effective=int(decision.n_effective), num_indices=int(len(indices))
  )
  return (
    variables,
    tree,
    cursor.to("small_tree", split=split, not_expandable=not_expandable),
    indices,
  )


def _after_small_tree(run: _Run, variables, tree: Tree, cursor: Cursor) -> Cursor:
  """The cursor after a small tree: the next growth iteration, or pruning when enough leaves."""
  c = run.c
  it = cursor.iteration + 1
  phase = "grow"
  if it >= c.max_growth_iterations:
    phase = "prune"
  elif cursor.split.n_effective + 1 == c.num_clusters_tree:
    probs = predict_leaf_probs(run.model, variables, tree, run.train, c.eval_batch_size)
    if growing.effective_leaves(probs).sum() >= c.num_clusters_tree:
      phase = "prune"
  return cursor.to(phase, iteration=it, intermediate_done=False, split=None)


def _prune(run: _Run, variables, tree: Tree):
  """Removes leaves with < 1% of the argmax assignments, one at a time."""
  c = run.c
  while True:
    probs = predict_leaf_probs(run.model, variables, tree, run.train, c.eval_batch_size)
    leaf = growing.leaf_to_prune(tree, probs)
    if leaf is None:
      return variables, tree
    tree = tree.prune([leaf])
    variables = prune_variables(variables, tree)
    logging.info("pruned leaf %d -> %s", leaf, tree)


def _phase_abstract(run: _Run):
  """Abstract arrays beside the variables in a checkpoint: the small tree's row indices and, for
  a checkpoint inside a training phase, that phase's train state."""
  cfg = _step_config(run)

  def fn(meta: dict, tree: Tree, variables) -> dict:
    cursor = _read_cursor(meta, "a stage-1 checkpoint")
    out = {}
    if cursor.phase == "small_tree":
      out["indices"] = jax.ShapeDtypeStruct((cursor.split.num_indices,), jnp.int32)
    if cursor.in_phase_step is not None:
      trained = (
        split_variables(variables, tree, cursor.split.leaf)
        if cursor.phase == "small_tree"
        else variables
      )
      out["train_state"] = jax.eval_shape(lambda v: init_state(v, cfg), trained)
    return out

  return fn


def train_and_export(config, workdir: str, stop: preemption.StopRequest | None = None) -> dict:
  """Runs (or resumes) stage 1 in ``workdir`` and writes the export, metrics and tree figure.

  Resume order: the newest readable checkpoint in ``workdir/checkpoints`` (refused if it was
  written with another config, library version or dataset), else a fresh start. A finished run
  leaves its export as it is (when it is complete and of the final checkpoint) and only reports
  the metrics. The workdir is locked (:class:`lock.WorkdirLock`) while this runs.

  Args:
    config: the full config (``data``, ``treevae``, ``stage1`` are used).
    workdir: the run directory.
    stop: checked after every step; when set, a checkpoint of that step is written and
      :class:`preemption.Preempted` raised (the launchers make one from SIGTERM/SIGINT).

  Returns:
    The final metrics (also written to ``workdir/stage1_metrics.json``).
  """
  validation.check_stage1(config)
  data_lib.check_outside_folder(config.data, workdir)
  check_workdir(workdir)
  with locked_workdir(workdir, "stage 1 (launch/train_treevae.py)"):
    return _train_and_export(config, workdir, stop)


def _train_and_export(config, workdir: str, stop: preemption.StopRequest | None) -> dict:
  c = config.stage1
  t_run = time.perf_counter()
  mesh = sharding.make_mesh()
  load_bs = c.batch_size // 2 if c.augment and "InfoNCE" in c.augmentation_method else c.batch_size
  sharding.check_batch_size(load_bs, mesh)
  train_arrays = data_lib.load_arrays(config.data, "train")
  test_arrays = data_lib.load_arrays(config.data, "test")
  data_lib.check_image_shape(train_arrays, config.data)
  if len(train_arrays) < load_bs:
    raise ConfigError(
      f"{len(train_arrays)} training images are fewer than one batch of {load_bs}: nothing "
      f"would be trained; add images or lower --config.stage1.batch_size (to at most "
      f"{len(train_arrays) if load_bs == c.batch_size else 2 * len(train_arrays)})"
    )
  data_identity = data_lib.identity(train_arrays, test_arrays)
  model = make_model(config)
  ckpts = Stage1Checkpoints(workdir, max_to_keep=c.checkpoints_to_keep)
  run = _Run(
    c=c,
    dataset=config.data.name,
    model=model,
    train=train_arrays,
    test=test_arrays,
    writer=None,
    key=jax.random.key(c.seed),
    mesh=mesh,
    ckpts=ckpts,
    stop=stop if stop is not None else preemption.never(),
  )
  logging.info(
    "data: %d train / %d test images of shape %s; devices: %d",
    len(train_arrays),
    len(test_arrays),
    train_arrays.images.shape[1:],
    jax.device_count(),
  )

  def same_data(step, meta):
    ckpt_lib.check_same_dataset(
      meta, data_identity, config.data, "stage-1 checkpoint", step, ckpts.directory
    )

  restored = ckpts.restore(model, config, _phase_abstract(run), same_data)
  phase_arrays = {}
  run_dir = RunDir(workdir)
  # Once a checkpoint (if any) has accepted this config: what sampling and evaluation default to.
  save_config(run_dir.config, config)
  export_dir = run_dir.export
  finished_run = (
    restored is not None and _read_cursor(restored[3], f"checkpoint {restored[0]}").phase == "done"
  )
  if finished_run:
    finished = _finished(run, workdir, export_dir, restored, data_identity)
    if finished is not None:
      return finished
  if restored is None:
    tree = initial_tree(config)
    variables = model.init(jax.random.fold_in(run.key, 999), tree)
    cursor = Cursor()
    step = 0
  else:
    step, variables, tree, meta, phase_arrays = restored
    cursor = _read_cursor(meta, f"checkpoint {step}")
    run.global_epoch = meta.get("global_epoch", 0)
    where = (
      f"step {cursor.in_phase_step} of phase {cursor.phase}"
      if cursor.in_phase_step is not None
      else f"phase {cursor.phase}"
    )
    logging.info(
      "resumed from checkpoint %d: %s, iteration %d, tree %s", step, where, cursor.iteration, tree
    )
  run.writer = MetricWriter(run_dir.tensorboard)
  config_json = ckpt_lib.config_sections(config, ckpt_lib.STAGE1_SECTIONS)
  run.writer.write_hparams(
    writer_lib.flatten(config_json), ["train/loss", "test/nmi", *writer_lib.stage1_eval_tags()]
  )

  def save(variables, tree, cursor: Cursor, arrays=None) -> int:
    nonlocal step
    step += 1
    ckpts.save(
      step,
      variables,
      tree,
      cursor.to_json(),
      phase_arrays=arrays,
      extra={
        "global_epoch": run.global_epoch,
        "config": config_json,
        "data_identity": data_identity,
      },
    )
    return step

  while cursor.phase != "done":
    resume_state = phase_arrays.get("train_state")
    indices = phase_arrays.get("indices")
    indices = None if indices is None else np.asarray(indices)
    phase_arrays = {}
    if resume_state is None:  # a new pass (a resumed one keeps its phase id)
      cursor = dataclasses.replace(cursor, phase_id=cursor.phase_id + 1)
    cursor = dataclasses.replace(cursor, in_phase_step=None)
    phase_id, phase = cursor.phase_id, cursor.phase

    def save_in_phase(state, variables=variables, tree=tree, cursor=cursor, indices=indices):
      arrays = {"train_state": state}
      if indices is not None:
        arrays["indices"] = indices
      return save(
        variables, tree, dataclasses.replace(cursor, in_phase_step=int(state.step)), arrays
      )

    train = functools.partial(
      train_phase, run, phase_id=phase_id, resume_state=resume_state, save_in_phase=save_in_phase
    )
    if phase == "initial":
      variables = train("initial", variables, tree, c.num_epochs)
      write_tree_figure(run, variables, tree, None)  # TensorBoard only: the tree before growing
      grow = c.grow and tree.depth < model.max_depth
      cursor = cursor.to("grow" if grow else "prune")
    elif phase == "grow":
      variables, tree, cursor, indices = _grow_decision(run, variables, tree, cursor, phase_id)
    elif phase == "intermediate":
      variables = train(
        f"intermediate[{cursor.iteration}]", variables, tree, c.num_epochs_intermediate_fulltrain
      )
      cursor = cursor.to("grow", intermediate_done=True)
    elif phase == "small_tree":
      leaf = cursor.split.leaf
      variables = train(
        f"small-tree[{cursor.iteration}] leaf {leaf}",
        variables,
        tree,
        c.num_epochs_smalltree,
        parent=leaf,
        indices=indices,
      )
      cursor, indices = _after_small_tree(run, variables, tree, cursor), None
      write_tree_figure(run, variables, tree, None)  # TensorBoard only: the tree just grown
    elif phase == "prune":
      if c.prune:
        variables, tree = _prune(run, variables, tree)
      cursor = cursor.to("finetune")
    elif phase == "finetune":
      n_ft = c.num_epochs_finetuning
      variables = train(
        "finetune", variables, tree, n_ft, decay_kl=max(0.01, 1.0 / max(1, n_ft - 1))
      )
      cursor = cursor.to("done")
    saved = save(variables, tree, cursor, None if indices is None else {"indices": indices})
    if indices is not None:
      phase_arrays = {"indices": indices}
    if cursor.phase != "done" and run.stop.requested():
      raise preemption.Preempted(
        f"stopped by {run.stop.signal_name} after stage-1 phase {phase}; "
        f"checkpoint {saved} saved in {ckpts.directory}"
      )
  ckpts.close()
  writer = run.writer

  probs = split_leaf_probs(run, variables, tree)
  metrics = final_metrics(run, variables, tree, probs)
  metrics["wall_time_s"] = time.perf_counter() - t_run
  metrics["epochs"] = run.global_epoch  # over all phases: the x axis of its TensorBoard
  metrics["train_images_per_second"] = (
    float(np.median(run.images_per_second)) if run.images_per_second else None
  )
  export_lib.export_treevae(
    export_dir,
    model,
    variables,
    tree,
    {
      "config": json.loads(config.to_json_best_effort()),
      "data": {
        "name": config.data.name,
        "image_shape": list(model.image_shape),
        "normalisation": "float32 in [0, 1] (uint8 / 255)",
        "num_classes": train_arrays.num_classes,
      },
      "metrics": metrics,
    },
    data_identity=data_identity,
  )
  if jax.process_index() == 0:  # every process computed the same metrics; one writes them
    files.write_json(run_dir.stage1_metrics, metrics)
  write_assignments(run, variables, tree, run_dir.assignments, probs)
  write_tree_figure(run, variables, tree, run_dir.tree_figure)
  writer.close()
  logging.info(
    "stage 1 done in %s: %s",
    format_eta(metrics["wall_time_s"]),
    {k: v for k, v in metrics["test"].items() if not isinstance(v, list)},
  )
  return metrics


# Settings that change only what the final metrics report (a finished run computes them again).
_METRICS_SETTINGS = ("final_elbo", "kmeans_baseline")


def _finished(
  run: _Run, workdir: str, export_dir: str, restored, data_identity: dict
) -> dict | None:
  """A re-run of a finished stage 1: its metrics if the export is complete and holds the final
  checkpoint's model (left untouched, so the stage-2 runs on it stay valid); ``None`` if the
  export must be written again (missing, garbled, or another model) or the final metrics
  computed again (a setting that only changes them, e.g. ``stage1.final_elbo``, was changed; the
  model and so the export's fingerprint stay the same)."""
  step, variables, tree, _, _ = restored
  if not export_lib.export_matches(export_dir, run.model, variables, tree, data_identity):
    logging.warning(
      "stage 1 finished (checkpoint %d) but %s is missing, unreadable or of another "
      "model: writing it again",
      step,
      export_dir,
    )
    return None
  meta = export_lib.read_export_meta(export_dir)
  saved = (meta.get("config") or {}).get("stage1") or {}
  changed = [k for k in _METRICS_SETTINGS if k in saved and saved[k] != run.c[k]]
  if changed:
    logging.info(
      "stage 1 finished (checkpoint %d); %s changed: computing its final metrics again "
      "(the export keeps its fingerprint)",
      step,
      ", ".join(f"stage1.{k}" for k in changed),
    )
    return None
  run.ckpts.close()
  metrics = meta.get("metrics", {})
  run_dir = RunDir(workdir)
  metrics_path = run_dir.stage1_metrics
  try:
    files.read_json(metrics_path)
  except (OSError, ValueError):  # missing, or cut short by a crash after the export was written
    if jax.process_index() == 0:
      files.write_json(metrics_path, metrics)
  logging.info(
    "stage 1 already finished (checkpoint %d); %s left as it is (fingerprint %s)",
    step,
    export_dir,
    export_lib.export_fingerprint(export_dir),
  )
  if not files.exists(run_dir.tree_figure):
    write_tree_figure(run, variables, tree, run_dir.tree_figure)
  if not files.exists(run_dir.assignments):  # a run finished before stage 1 wrote them
    write_assignments(run, variables, tree, run_dir.assignments)
  return metrics


def split_leaf_probs(run: _Run, variables, tree: Tree) -> dict[str, np.ndarray]:
  """``{"train": [N, K], "test": [M, K]}`` leaf probabilities of both splits."""
  c = run.c
  return {
    split: predict_leaf_probs(run.model, variables, tree, arrays, c.eval_batch_size)
    for split, arrays in (("train", run.train), ("test", run.test))
  }


def write_assignments(
  run: _Run, variables, tree: Tree, path: str, probs: dict[str, np.ndarray] | None = None
):
  """``WORKDIR/assignments.csv``: every train and test image's leaf (process 0 writes it)."""
  probs = probs if probs is not None else split_leaf_probs(run, variables, tree)
  if jax.process_index() == 0:
    assignments.write(
      path, tree, {"train": (run.train, probs["train"]), "test": (run.test, probs["test"])}
    )


def final_metrics(
  run: _Run, variables, tree: Tree, probs: dict[str, np.ndarray] | None = None
) -> dict:
  """Clustering metrics on the test split (+ train), ELBO terms and a K-means baseline;
  ``probs``: :func:`split_leaf_probs`, computed here when not given."""
  c = run.c
  probs = probs if probs is not None else split_leaf_probs(run, variables, tree)
  out = {"tree": json.loads(tree.to_json()), "num_leaves": tree.num_leaves}
  for split, arrays in (("train", run.train), ("test", run.test)):
    labels = arrays.labels if arrays.num_classes else None
    out[split] = clustering.summary(tree, labels, probs[split])
  if not c.final_elbo:
    return _with_kmeans(run, out, tree)
  # Negative ELBO on the test split at α = 1 (one latent sample per node).
  nelbo, rec = [], []
  key = jax.random.fold_in(run.key, 123_456)
  for i, batch in enumerate(
    data_lib.batches(run.test, c.eval_batch_size, shuffle=False, drop_remainder=False, pad=True)
  ):
    terms, _ = eval_terms(
      variables, batch["image"], jax.random.fold_in(key, i), model=run.model, tree=tree
    )
    nelbo.append(np.asarray(terms["nelbo"])[batch["mask"]])
    rec.append(np.asarray(terms["rec"])[batch["mask"]])
  out["test"]["nelbo"] = float(np.concatenate(nelbo).mean())
  out["test"]["rec"] = float(np.concatenate(rec).mean())
  return _with_kmeans(run, out, tree)


def _with_kmeans(run: _Run, out: dict, tree: Tree) -> dict:
  c = run.c
  if run.test.num_classes and c.kmeans_baseline:
    out["kmeans_pixels"] = kmeans_baseline(run.train, run.test, tree.num_leaves, c.seed)
  return out


def kmeans_baseline(train: data_lib.Arrays, test: data_lib.Arrays, k: int, seed: int) -> dict:
  """scikit-learn K-means on raw pixels with ``k`` clusters, fit on train, scored on test."""
  from sklearn.cluster import KMeans

  flat = lambda a: a.images.reshape(len(a), -1).astype(np.float32) / 255.0
  km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(flat(train))
  pred = km.predict(flat(test))
  return {
    "num_clusters": k,
    "nmi": clustering.nmi(test.labels, pred),
    "accuracy": clustering.accuracy(test.labels, pred),
    "leaf_purity": clustering.leaf_purity(test.labels, pred),
  }


def write_tree_figure(run: _Run, variables, tree: Tree, path: str | None, num: int | None = None):
  """The learned tree: each node's share of test samples, real and generated images per leaf.

  Written as a PNG to ``path`` (unless ``None``) and, when the run has a writer, to TensorBoard
  (tag ``tree``) at the step of the last epoch trained (stage 1 logs epoch ``e`` of all phases
  at step ``e``).
  """
  from tree_diffusion.treevae import figure

  c = run.c
  num = num or c.figure_images_per_leaf
  share, real = test_examples(run.model, variables, tree, run.test, num, c.eval_batch_size)
  gen = generate(variables, jax.random.fold_in(run.key, 777), model=run.model, tree=tree, num=num)
  images = np.clip(np.asarray(gen["images"]), 0.0, 1.0)
  if jax.process_index() != 0:  # all processes compute (the arrays span them), one draws
    return
  image = figure.draw_tree(
    tree,
    share,
    [real, images],
    row_titles=["test", "generated"],
    title=f"{run.dataset}: {tree.num_leaves} leaves",
  )
  if path is not None:
    files.save_png(path, image)
  if run.writer is not None:
    run.writer.write_images(max(run.global_epoch - 1, 0), {"tree": np.asarray(image)})
