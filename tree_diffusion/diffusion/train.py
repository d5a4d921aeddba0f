"""Stage-2 training: the path-conditioned denoiser on top of the frozen stage-1 export.

Each step runs the frozen TreeVAE on the batch (posterior samples, q-router leaf probabilities),
draws one leaf per sample from those probabilities, builds the condition, noises the images at a
uniform ``t`` and regresses ε (L2, or L1; or x0 or v, see ``process.py``). Adam with a linear
warm-up from 0, global-norm clipping and the EMA update all happen inside one jitted step that
donates the train state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion import files, loop, preemption, sharding, validation, xla_options
from tree_diffusion import writer as writer_lib
from tree_diffusion.diffusion import frozen
from tree_diffusion.diffusion import sampler as sampler_lib
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.conditioning import (
  Denoiser,
  PathTables,
  make_condition,
  make_denoiser,
)
from tree_diffusion.diffusion.generate import image_grid
from tree_diffusion.diffusion.state import (
  DiffusionState,
  StepConfig,
  abstract_state,
  example_condition,
  init_state,
  learning_rate,
  make_optimizer,
)
from tree_diffusion.errors import ConfigError
from tree_diffusion.lock import locked_workdir
from tree_diffusion.runs import RunDir, check_workdir, format_eta, save_config
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import export as export_lib
from tree_diffusion.treevae.model import TreeVAE
from tree_diffusion.writer import MetricWriter


def diffusion_loss(params, denoiser: Denoiser, cfg: StepConfig, x0, cond, t, eps, dropout_key):
  """Mean over all elements of ``|y − ŷ|²`` (or ``|·|``) at ``x_t = sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε``
  (+ the image condition for form2), ``y`` the process's target (ε, x0 or v); ``x0`` and the
  image condition are already in the chain's space (:meth:`Process.encode`)."""
  ab = jnp.asarray(cfg.process.alpha_bar(), jnp.float32)[t][:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
  if denoiser.conditioning.form2:
    x_t = x_t + cond["image"]
  pred = denoiser.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": dropout_key})
  err = pred - cfg.process.target(x0, eps, ab)
  return jnp.mean(err**2) if cfg.loss == "l2" else jnp.mean(jnp.abs(err))


@xla_options.conv_net_jit(static_argnames=("denoiser", "model", "tree", "cfg"), donate_argnums=0)
def train_step(
  state: DiffusionState,
  tvae_vars,
  images: jax.Array,
  key: jax.Array,
  *,
  denoiser: Denoiser,
  model: TreeVAE,
  tree: Tree,
  cfg: StepConfig,
):
  """One optimiser step on a batch of images in [0, 1]; returns ``(state, metrics)``."""
  b = images.shape[0]
  keys = jax.random.split(jax.random.fold_in(key, state.step), 6)
  cond_kind = denoiser.conditioning
  proc = cfg.process
  z_all, probs, leaf_images = frozen.posterior(
    model, tree, tvae_vars, images, keys[0], decode=cond_kind.image is not None
  )
  if leaf_images is not None:
    leaf_images = proc.encode(leaf_images)
  leaf = jax.random.categorical(keys[1], jnp.log(jnp.maximum(probs, 1e-30))).astype(jnp.int32)
  keep = (jax.random.uniform(keys[2], (b,)) >= cfg.cfg_drop_rate) if cfg.cfg_drop_rate else None
  cond = make_condition(cond_kind, PathTables.from_tree(tree), z_all, leaf, leaf_images, keep)
  t = jax.random.randint(keys[3], (b,), 0, proc.T)
  eps = jax.random.normal(keys[4], images.shape, jnp.float32)
  loss, grads = jax.value_and_grad(diffusion_loss)(
    state.params, denoiser, cfg, proc.encode(images), cond, t, eps, keys[5]
  )
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  d = cfg.ema_decay
  ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
  return DiffusionState(
    step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
  ), metrics


# --------------------------------------------------------------------------------- the run

GRID_EXAMPLES = 8  # rows (prior samples) of the TensorBoard grid; its columns are the leaves


def make_sample_grid(config, denoiser: Denoiser, model: TreeVAE, tree: Tree, mesh):
  """``grid(ema_params, tvae_vars)`` → a uint8 image for TensorBoard: ``GRID_EXAMPLES`` prior
  samples (rows) decoded through every leaf (columns) by ``sample_all_leaves``.

  The sampler is built here once (one batch, compiled on the first call). Its key is
  ``diffusion.sampling.seed``'s, as in ``launch/sample.py``, so every grid shows the same draws and
  the rows are the first rows of that command's grid; the training keys are not touched.
  """
  c = config.diffusion
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
  export_lib.resolve_export(frozen.export_path(config, workdir))  # before anything is created
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
    change = data_lib.identity_change(meta.get("data_identity") or data_identity, data_identity)
    if change:
      raise ckpt_lib.CheckpointError(
        f"the dataset changed since stage-2 checkpoint {step} in {ckpts.directory} was written "
        f"({change}): put the images back as they were, or start afresh with a new --workdir"
      )
    moved = data_lib.moved_folder((meta.get("config") or {}).get("data"), config.data)
    if moved and meta.get("data_identity") is not None:
      logging.info(
        "stage-2 checkpoint %d was trained on the images in %s; they are now read "
        "from %s (the same images, labels and split)",
        step,
        *moved,
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
  sample_grid = make_sample_grid(config, denoiser, model, tree, mesh) if c.sample_every else None
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
