"""Stage-2 outputs: load a trained denoiser, run the sampling modes, write PNG grids, ``.npz``
files and the tree figure with every leaf's diffusion samples next to its TreeVAE samples.

Images are written as uint8 ``round(clip(x, 0, 1) · 255)`` (the reference floors after the clip
when it saves PNGs; rounding is the unbiased choice and is used everywhere in this project).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from tree_diffusion import checkpoint as ckpt_lib
from tree_diffusion import data as data_lib
from tree_diffusion import files, inputs
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.conditioning import Denoiser, make_denoiser
from tree_diffusion.diffusion.frozen import load_stage1
from tree_diffusion.diffusion.sampler import MODES, Sampler, SamplerConfig
from tree_diffusion.diffusion.state import StepConfig, abstract_state
from tree_diffusion.errors import ConfigError
from tree_diffusion.files import write_json
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.inference import test_examples
from tree_diffusion.treevae.model import TreeVAE


QUANTIZE = ("round", "floor", "wrap")


def to_uint8(x: np.ndarray, rule: str = "round") -> np.ndarray:
  """Images in [0, 1] as uint8 pixels: ``round(clip(x, 0, 1) · 255)``.

  The evaluation can follow the reference instead (``eval.quantize``, ``eval.treevae_pixels``):
  ``"floor"`` truncates (``clip(x · 255, 0, 255)`` cast to uint8, as its PNG writer does), and
  ``"wrap"`` is torch's ``x.mul(255).byte()`` without a clamp, which truncates toward zero and
  wraps out-of-range values modulo 256 (its TreeVAE FID).
  """
  x = np.nan_to_num(x, nan=1.0)
  if rule == "round":
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  # As the reference computes them: the product in the images' own precision, then truncated.
  if rule == "floor":
    return np.floor(np.clip(x * 255.0, 0.0, 255.0)).astype(np.uint8)
  if rule == "wrap":
    return (np.trunc(np.clip(x * 255.0, -(2.0**62), 2.0**62)).astype(np.int64) % 256).astype(
      np.uint8
    )
  raise ValueError(f"rule must be one of {QUANTIZE}; got {rule!r}")


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
  """``[N, H, W, C]`` floats → one uint8 RGB grid with ``columns`` columns on white."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(f"image_grid takes images [N >= 1, H, W, 1 or 3]; got shape {images.shape}")
  columns, pad = inputs.count(columns, "columns"), inputs.count(pad, "pad", minimum=0)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
  px = to_uint8(images)
  if c == 1:
    px = np.repeat(px, 3, axis=-1)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h,
      pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = px[i]
  return grid


@dataclasses.dataclass
class Stage2:
  """A trained stage 2 ready to sample: the EMA weights, the frozen TreeVAE and the tree."""

  config: Any
  denoiser: Denoiser
  ema_params: Any
  model: TreeVAE
  tvae_vars: Any
  tree: Tree
  step: int
  export: str
  samplers: dict = dataclasses.field(default_factory=dict)

  def sampler(self, mode: str, mesh=None) -> Sampler:
    """The compiled sampler of ``mode`` (built once per mode and reused)."""
    if mode not in self.samplers:
      self.samplers[mode] = Sampler(
        self.denoiser,
        self.model,
        self.tree,
        SamplerConfig.from_config(self.config.diffusion),
        mode,
        self.config.diffusion.sampling.batch_size,
        mesh,
      )
    return self.samplers[mode]


# The settings a stage-2 checkpoint can only be sampled with as it was trained (its network and
# its diffusion process); the others (sampler, batch sizes, training schedule) may differ.
SAMPLING_KEYS = ("unet", "T", "beta_1", "beta_T", "schedule", "prediction", "center_data")


def load_stage2(config, workdir: str, step: int | None = None) -> Stage2:
  """Loads the latest (or ``step``) stage-2 checkpoint of ``workdir`` and its stage-1 export.

  ``config``: the run's config (``configs.common.base()`` or the ``diffusion/config.json`` a run
  recorded, as a ``ConfigDict``); ``step``: ``None`` or a checkpoint step ``>= 0``.
  """
  if not hasattr(config, "diffusion") or not hasattr(config, "data"):
    raise TypeError(
      f"config must be a run's ConfigDict with data and diffusion sections (e.g. "
      f"configs/demo.py's get_config()); got {type(config).__name__}"
    )
  files.check_path(workdir, "workdir")
  if step is not None:
    inputs.count(step, "step", minimum=0)
  c = config.diffusion
  denoiser = make_denoiser(c.conditioning, c.unet, c.dtype)
  model, tvae_vars, tree, path, fingerprint, _ = load_stage1(config, workdir)
  model = dataclasses.replace(model, dtype=c.dtype)  # the frozen TreeVAE in the sampler
  ckpts = Stage2Checkpoints(RunDir(workdir).stage2_checkpoints, read_only=True)
  if ckpts.latest_step() is None:
    raise ckpt_lib.CheckpointError(
      f"no stage-2 checkpoint in {ckpts.directory}: run "
      f"python -m launch.train_diffusion with this --workdir first"
    )
  meta = ckpts.read_meta(step)
  step_name = ckpts.latest_step() if step is None else step
  if meta.get("export_fingerprint") != fingerprint:
    if meta.get("export") == path:
      raise ckpt_lib.CheckpointError(
        f"the stage-1 export {path} changed since stage-2 checkpoint {step_name} was trained "
        f"on it (fingerprint {meta.get('export_fingerprint')} -> {fingerprint}): train stage 2 "
        f"again on it in a new --workdir (with "
        f"--config.diffusion.treevae_export={path}), or restore the original export"
      )
    raise ckpt_lib.CheckpointError(
      f"the stage-2 checkpoint was trained on the stage-1 export {meta.get('export')}, not on "
      f"{path}: point --config.diffusion.treevae_export at that export"
    )
  if meta.get("conditioning") != denoiser.conditioning.name:
    raise ckpt_lib.CheckpointError(
      f"the stage-2 checkpoint uses conditioning {meta.get('conditioning')!r}, the config "
      f"{denoiser.conditioning.name!r}: pass --config.diffusion.conditioning={meta.get('conditioning')}"
    )
  saved = (meta.get("config") or {}).get("diffusion")
  if saved is not None:
    now = ckpt_lib.config_sections(config, ("diffusion",))["diffusion"]
    diffs = ckpt_lib.config_differences(
      {"diffusion": {k: saved.get(k, "<missing>") for k in SAMPLING_KEYS}},
      {"diffusion": {k: now.get(k) for k in SAMPLING_KEYS}},
    )
    if diffs:
      raise ckpt_lib.CheckpointError(
        f"stage-2 checkpoint {step_name} in {ckpts.directory} was trained with another network "
        f"or diffusion process ({'; '.join(diffs)}): sample it with the config of its run "
        f"(these --config.diffusion.* values)"
      )
  abstract = abstract_state(denoiser, StepConfig.from_config(c), model, tree)
  step, state, _ = ckpts.restore(abstract, step)
  ckpts.close()
  return Stage2(config, denoiser, state.ema_params, model, tvae_vars, tree, step, path)


def with_checkpoint(s: Stage2, workdir: str, step: int) -> Stage2:
  """``s`` with the EMA weights of checkpoint ``step`` (same export; compiled samplers shared)."""
  ckpts = Stage2Checkpoints(RunDir(workdir).stage2_checkpoints, read_only=True)
  try:
    meta = ckpts.read_meta(step)
    if meta.get("conditioning") != s.denoiser.conditioning.name or meta.get("export") != s.export:
      return load_stage2(s.config, workdir, step)
    abstract = abstract_state(
      s.denoiser, StepConfig.from_config(s.config.diffusion), s.model, s.tree
    )
    step, state, _ = ckpts.restore(abstract, step)
  finally:
    ckpts.close()
  return dataclasses.replace(s, ema_params=state.ema_params, step=step)


def most_likely_per_leaf(out: dict, num: int) -> tuple[np.ndarray, np.ndarray]:
  """From ``sample_all_leaves`` output: per leaf the ``num`` examples most likely to reach it.

  Returns ``(vae, diffusion)`` images, each ``[K, num, H, W, C]``.
  """
  k = out["leaf_probs"].shape[1]
  order = np.argsort(-out["leaf_probs"], axis=0, kind="stable")[:num]  # [num, K] example ids
  vae = np.stack([out["vae_image"][order[:, j], j] for j in range(k)])
  ddpm = np.stack([out["image"][order[:, j], j] for j in range(k)])
  return vae, ddpm


def sample_modes(s: Stage2, workdir: str, modes=MODES, num: int | None = None, mesh=None) -> dict:
  """Runs each mode and writes ``WORKDIR/diffusion/samples/<mode>/{grid.png, samples.npz}``.

  ``sample*`` draw ``num`` prior samples (default ``diffusion.sampling.num_samples``); ``recons*``
  use the first ``num`` test images. The ``.npz`` holds ``images`` and ``vae_images`` (uint8),
  ``leaf`` (index into the tree's leaves) and ``leaf_probs``; ``*_all_leaves`` have a leaf axis.
  In a multi-process job every process samples its share and process 0 alone writes the files.
  """
  sc = s.config.diffusion.sampling
  num = sc.num_samples if num is None else num
  if num <= 0:
    raise ConfigError(
      f"the number of samples must be positive, got {num}; pass "
      f"--num_samples=N (default config.diffusion.sampling.num_samples)"
    )
  cfg = SamplerConfig.from_config(s.config.diffusion)
  key = jax.random.key(sc.seed)
  test = None
  summary = {
    "step": s.step,
    "export": s.export,
    "sampler": dataclasses.asdict(cfg),
    "timesteps": len(cfg.respaced()),
    "modes": {},
  }
  for mode in modes:
    sampler = s.sampler(mode, mesh)
    images = None
    if mode.startswith("recons"):
      if test is None:
        test = data_lib.load_arrays(s.config.data, "test")
        data_lib.check_image_shape(test, s.config.data)
      images = inputs.to_unit_range(test.images[:num])
    t0 = time.perf_counter()
    out = sampler.run(
      s.ema_params, s.tvae_vars, key, num=None if images is not None else num, images=images
    )
    dt = time.perf_counter() - t0
    n_images = out["image"].shape[0] * (s.tree.num_leaves if sampler.all_leaves else 1)
    run_dir = RunDir(workdir)
    if jax.process_index() == 0:
      files.save_npz(
        run_dir.samples_npz(mode),
        images=to_uint8(out["image"]),
        vae_images=to_uint8(out["vae_image"]),
        leaf=out["leaf"],
        leaf_probs=out["leaf_probs"],
        leaf_nodes=np.asarray(s.tree.leaves),
      )
      if sampler.all_leaves:  # one row per example: its image through every leaf
        rows = out["image"][:16]
        grid = image_grid(rows.reshape((-1,) + rows.shape[2:]), columns=s.tree.num_leaves)
      else:
        grid = image_grid(out["image"][:64], columns=8)
      files.save_png(run_dir.samples_grid(mode), grid)
    summary["modes"][mode] = {
      "images": int(n_images),
      "wall_time_s": dt,
      "images_per_second_incl_compile": n_images / dt,
    }
    logging.info("%s: %d images in %.1f s -> %s", mode, n_images, dt, run_dir.samples(mode))
  if jax.process_index() == 0:
    write_json(RunDir(workdir).samples_summary, summary)
  return summary


def write_tree_figure(s: Stage2, workdir: str, mesh=None) -> str:
  """``WORKDIR/diffusion/tree.png``: the stage-1 tree figure with, under every leaf, test images
  assigned to it, TreeVAE samples and diffusion samples of the same prior draws.

  ``figure_samples`` prior samples go through every leaf (``sample_all_leaves``); each leaf shows
  the ``figure_images_per_leaf`` of them most likely to reach it under the p-routers.
  """
  from tree_diffusion.treevae import figure

  sc = s.config.diffusion.sampling
  num = sc.figure_images_per_leaf
  test = data_lib.load_arrays(s.config.data, "test")
  share, real = test_examples(
    s.model, s.tvae_vars, s.tree, test, num, s.config.stage1.eval_batch_size
  )
  out = s.sampler("sample_all_leaves", mesh).run(
    s.ema_params, s.tvae_vars, jax.random.key(sc.seed + 1), num=max(sc.figure_samples, num)
  )
  k = s.tree.num_leaves
  vae, ddpm = most_likely_per_leaf(out, num)
  path = RunDir(workdir).stage2_tree_figure
  if jax.process_index() == 0:  # every process sampled; one writes
    figure.save_tree_figure(
      path,
      s.tree,
      share,
      [real, np.clip(vae, 0, 1), np.clip(ddpm, 0, 1)],
      row_titles=["test", "TreeVAE", "diffusion"],
      title=f"{s.config.data.name}: {k} leaves, {s.denoiser.conditioning.name} diffusion",
    )
  return path
