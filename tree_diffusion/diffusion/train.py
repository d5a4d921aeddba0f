"""Stage-2 training: the path-conditioned denoiser on top of the frozen stage-1 export, trained
with the jitted step of :mod:`tree_diffusion.diffusion.step`: data, checkpoints, sample grids,
logging and the stage-2 summary."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import numpy as np
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion import files, loop, preemption, sharding, validation
from tree_diffusion import writer as writer_lib
from tree_diffusion.diffusion import frozen
from tree_diffusion.diffusion import sampler as sampler_lib
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.conditioning import (
  Denoiser,
  make_denoiser,
)
from tree_diffusion.diffusion.generate import image_grid

# The state and the step, re-exported: what trains stage 2 is found here too.
from tree_diffusion.diffusion.state import DiffusionState, make_optimizer  # noqa: F401
from tree_diffusion.diffusion.step import diffusion_loss, train_step  # noqa: F401
from tree_diffusion.diffusion.state import (
  StepConfig,
  abstract_state,
  example_condition,
  init_state,
  learning_rate,
)
from tree_diffusion.errors import ConfigError
from tree_diffusion.lock import locked_workdir
from tree_diffusion.runs import RunDir, check_workdir, format_eta, save_config
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.model import TreeVAE
from tree_diffusion.writer import MetricWriter


# --------------------------------------------------------------------------------- the run

GRID_EXAMPLES = 8  # rows (prior samples) of the TensorBoard grid; its columns are the leaves


def make_sample_grid(diffusion_config, denoiser: Denoiser, model: TreeVAE, tree: Tree, mesh):
  """``grid(ema_params, tvae_vars)`` → a uint8 image for TensorBoard: ``GRID_EXAMPLES`` prior
  samples (rows) decoded through every leaf (columns) by ``sample_all_leaves``.

  The sampler is built here once (one batch, compiled on the first call). Its key is
  ``diffusion.sampling.seed``'s, as in ``launch/sample.py``, so every grid shows the same draws and
  the rows are the first rows of that command's grid; the training keys are not touched.
  ``diffusion_config`` is ``config.diffusion``.
  """
  c = diffusion_config
  sampler = sampler_lib.Sampler(
    denoiser,
    model,
    tree,
    sampler_lib.SamplerConfig.from_config(c),
    "sample_all_leaves",
    min(c.sampling.batch_size, GRID_EXAMPLES * tree.num_leaves),
    mesh,
  )
  key = jax.random.key(c.sampling.seed)

  def grid(ema_params, tvae_vars) -> np.ndarray:
    images = sampler.run(ema_params, tvae_vars, key, num=GRID_EXAMPLES, log_every=0)["image"]
    return image_grid(images.reshape((-1,) + images.shape[2:]), columns=tree.num_leaves)

  return grid


def train_and_save(config, workdir: str, stop: preemption.StopRequest | None = None) -> dict:
  """Trains (or resumes) stage 2 in ``WORKDIR/diffusion`` on the frozen stage-1 export.

  Checkpoints (params, EMA params, optimiser state, step) go to ``WORKDIR/diffusion/checkpoints``
  every ``checkpoint_every_steps`` and at the end, with the export's path and fingerprint;
  re-running the command resumes from the latest readable one (and refuses one trained on another
  export, config or library version). The batch order is a seeded permutation per epoch and the
  step key ``fold_in(key, step)``, so a resumed run is bit-identical to an uninterrupted one.

  Args:
    config: the full config (``data`` and ``diffusion`` are used).
    workdir: the run directory (holds the stage-1 export unless ``diffusion.treevae_export``).
    stop: checked after every step; when set, a checkpoint of that step is written and
      :class:`preemption.Preempted` raised (the launcher makes one from SIGTERM/SIGINT).

  Returns:
    A summary (also written to ``WORKDIR/diffusion/train_summary.json``).
  """
  validation.check_stage2(config)
  sampler_lib.check_config(config)  # a run must not end with a config that cannot sample
  denoiser = make_denoiser(
    config.diffusion.conditioning, config.diffusion.unet, config.diffusion.dtype
  )
  data_lib.check_outside_folder(config.data, workdir)
  export_lib.resolve_export(
    frozen.export_path(config.diffusion, workdir)
  )  # before anything is created
  check_workdir(workdir)
  with locked_workdir(workdir, "stage 2 (launch/train_diffusion.py)"):
    return _train_and_save(config, workdir, stop, denoiser)


def _train_and_save(
  config, workdir: str, stop: preemption.StopRequest | None, denoiser: Denoiser
) -> dict:
  c = config.diffusion
  stop = stop if stop is not None else preemption.never()
  t_run = time.perf_counter()
  run_dir = RunDir(workdir)
  check_workdir(run_dir.stage2)
  cfg = StepConfig.from_config(c)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(c.batch_size, mesh, setting="diffusion.batch_size")
  # The export's meta is checked against the config before its (small) variables are read.
  model, tvae_vars, tree, path, fingerprint, export_meta = frozen.load_stage1(config, workdir)
  model = dataclasses.replace(model, dtype=c.dtype)  # the frozen TreeVAE's forward in the step
  train = data_lib.load_arrays(config.data, "train")
  data_lib.check_image_shape(train, config.data)
  data_identity = data_lib.identity(train, data_lib.load_arrays(config.data, "test"))
  frozen.check_export_data(path, export_meta, data_identity, config.data)
  steps_per_epoch = data_lib.num_batches(len(train), c.batch_size, drop_remainder=True)
  if steps_per_epoch == 0:
    raise ConfigError(
      f"{len(train)} training images are fewer than one batch of {c.batch_size}; "
      f"lower --config.diffusion.batch_size"
    )
  total = c.num_steps if c.num_steps > 0 else c.num_epochs * steps_per_epoch

  replicated = sharding.replicated(mesh)
  tvae_vars = sharding.replicate(tvae_vars, mesh)
  ckpts = Stage2Checkpoints(run_dir.stage2_checkpoints, max_to_keep=c.checkpoints_to_keep)
  key = jax.random.key(c.seed)

  def check_same_export(step, meta):
    if meta.get("export_fingerprint") != fingerprint:
      raise ckpt_lib.CheckpointError(
        f"the stage-2 checkpoints in {ckpts.directory} were trained on the stage-1 export "
        f"{meta.get('export')} (fingerprint {meta.get('export_fingerprint')}), not on {path} "
        f"(fingerprint {fingerprint}): use a new --workdir or point "
        f"--config.diffusion.treevae_export at the original export"
      )
    ckpt_lib.check_same_dataset(
      meta, data_identity, config.data, "stage-2 checkpoint", step, ckpts.directory
    )

  abstract = lambda: jax.tree_util.tree_map(  # traced only when there is a checkpoint
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    abstract_state(denoiser, cfg, model, tree),
  )
  restored = ckpts.restore_for_training(abstract, config, check_same_export)
  if restored is not None:
    step0, state, _ = restored
    logging.info("resumed stage 2 from checkpoint %d", step0)
  else:
    state = init_state(
      denoiser,
      cfg,
      jax.random.fold_in(key, 1),
      example_condition(denoiser, model, tree),
      model.image_shape,
    )
  # Once a checkpoint (if any) has accepted this config: what sampling and evaluation default to.
  save_config(run_dir.stage2_config, config)
  state = sharding.replicate(state, mesh)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  step = int(state.step)
  logging.info(
    "stage 2: %s conditioning, %s parameters, %d steps (%d per epoch of %d images), "
    "batch %d, from step %d; tree %s",
    denoiser.conditioning.name,
    f"{n_params:,}",
    total,
    steps_per_epoch,
    len(train),
    c.batch_size,
    step,
    tree,
  )

  summary_path = run_dir.stage2_summary
  if restored is not None and step >= total:
    # A re-run of a finished run (what demo.sh and resuming do): its summary, measured when it
    # trained, is kept as it is (and written again only if it is missing or unreadable).
    try:
      summary = files.read_json(summary_path)
      ckpts.close()
      logging.info(
        "stage 2 already finished (checkpoint %d of %d steps); nothing to do", step, total
      )
      return summary
    except (OSError, ValueError):
      pass
  writer = MetricWriter(run_dir.stage2_tensorboard)
  config_json = ckpt_lib.config_sections(config, ckpt_lib.STAGE2_SECTIONS)
  writer.write_hparams(
    writer_lib.flatten(config_json),
    ["train/loss", *writer_lib.eval_tags(config.classifier.thresholds)],
  )
  sample_grid = make_sample_grid(c, denoiser, model, tree, mesh) if c.sample_every else None
  save_meta = lambda: {
    "export": path,
    "export_fingerprint": fingerprint,
    "data_identity": data_identity,
    "conditioning": denoiser.conditioning.name,
    "epoch": step // steps_per_epoch,
    "config": config_json,
  }
  step_key = sharding.replicate(jax.random.fold_in(key, 2), mesh)
  loss_sum, n_sum = 0.0, 0
  progress = loop.Progress(total, c.batch_size, step)
  unchecked_sum, unchecked = 0.0, 0  # losses since the last finiteness check
  # A re-run in this workdir with another learning rate is refused by its checkpoints' config: a
  # new workdir on the same export trains stage 2 afresh without training stage 1 again.
  diverged_fix = (
    f"Re-run with a lower --config.diffusion.lr (now {c.lr:g}; or a lower "
    f"--config.diffusion.grad_clip, now {c.grad_clip:g}) in a new --workdir on this "
    f"run's stage-1 export: --workdir=NEW --config.diffusion.treevae_export={path} "
    f"(stage 1 is not trained again); or check the data"
  )

  def check_finite(grad_norm=None):
    nonlocal unchecked_sum, unchecked
    if unchecked:
      norm = "" if grad_norm is None else f", grad_norm {float(grad_norm):.4g}"
      mean = float(unchecked_sum) / unchecked
      loop.check_finite(
        mean,
        f"stage 2 between steps {step - unchecked + 1} and {step} (mean loss {mean:.4g}{norm})",
        diverged_fix,
        last_good=ckpts.describe_latest(),
      )
    unchecked_sum, unchecked = 0.0, 0

  def save(grad_norm):
    check_finite(grad_norm)  # never save a diverged state
    ckpts.save(step, state, save_meta())
    return step

  rows = sharding.process_rows(mesh, c.batch_size)  # this process's block of every batch
  while step < total:
    epoch, offset = divmod(step, steps_per_epoch)
    left = min(steps_per_epoch - offset, total - step)
    epoch_batches = data_lib.batches(
      train,
      c.batch_size,
      shuffle=c.shuffle,
      seed=c.seed,
      epoch=epoch,
      drop_remainder=True,
      part=rows,
      skip=offset,
    )
    epoch_batches = itertools.islice(epoch_batches, left)
    for batch in sharding.prefetch(
      ({"image": b["image"]} for b in epoch_batches), mesh, c.batch_size
    ):
      images = batch["image"]
      state, metrics = train_step(
        state, tvae_vars, images, step_key, denoiser=denoiser, model=model, tree=tree, cfg=cfg
      )
      step += 1
      loss_sum = loss_sum + metrics["loss"]
      unchecked_sum = unchecked_sum + metrics["loss"]
      n_sum, unchecked = n_sum + 1, unchecked + 1
      if step % c.log_every_steps == 0 or step == total:
        check_finite(metrics["grad_norm"])
        loss = float(loss_sum) / n_sum
        ips, eta = progress.report(step)  # the first window includes compilation
        writer.write_scalars(
          step,
          {
            "train/loss": loss,
            "train/grad_norm": float(metrics["grad_norm"]),
            "train/lr": learning_rate(cfg, step - 1),
            "train/images_per_second": ips,
          },
        )
        logging.info(
          "stage 2 step %d/%d (epoch %d): loss %.4f | %.0f img/s, ETA %s",
          step,
          total,
          (step - 1) // steps_per_epoch + 1,
          loss,
          ips,
          format_eta(eta),
        )
        loss_sum, n_sum = 0.0, 0
      if sample_grid is not None and (step % c.sample_every == 0 or step == total):
        writer.write_images(
          step, {"samples/sample_all_leaves": sample_grid(state.ema_params, tvae_vars)}
        )
      if step == total:
        break
      loop.checkpoint_if_due(
        stop,
        step,
        c.checkpoint_every_steps,
        functools.partial(save, metrics["grad_norm"]),
        lambda saved: (
          f"at stage-2 step {step}/{total}; checkpoint {saved} saved in {ckpts.directory}"
        ),
      )
  if ckpts.latest_step() != step:
    check_finite()
    ckpts.save(step, state, save_meta())
  ckpts.close()
  writer.close()
  summary = {
    "steps": step,
    "epochs": step / steps_per_epoch,
    "parameters": n_params,
    "conditioning": denoiser.conditioning.name,
    "export": path,
    "export_fingerprint": fingerprint,
    "wall_time_s": time.perf_counter() - t_run,
    "train_images_per_second": progress.median_rate(),
  }
  if jax.process_index() == 0:
    files.write_json(summary_path, summary)
  logging.info("stage 2 done: %s", summary)
  return summary
