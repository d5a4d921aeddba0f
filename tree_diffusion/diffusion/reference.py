"""Diffusion models trained by the reference PyTorch code (a Lightning ``.ckpt``), as parameters.

The reference's ``DDPMWrapper`` checkpoint holds ``online_network.decoder.*`` (the trained UNet),
``target_network.decoder.*`` (its EMA copy), ``online_network.betas`` and the other schedule
buffers, and ``vae.*`` (the frozen TreeVAE, imported from its own ``model_weights.pt`` instead).
The UNet is OpenAI's: ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
``out``, and the conditioning MLPs ``proj_latent``/``proj_cluster_id`` (or ``proj`` for a single
leaf signal). Our :class:`~tree_diffusion.diffusion.unet.UNet` creates its layers in the same
order, so the names pair up by walking both the same way (:func:`unet_names`).

Arrays: convolution kernels OIHW → HWIO (the attention's 1-D convolutions ``O, I, 1`` → 1×1),
linear weights transposed, GroupNorm ``weight`` → ``scale``. The latent MLP's first layer reads a
node's sample flattened channel-first (``C, R, R``) there and channel-last (``R, R, C``) here, so
its input rows are permuted.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion.checkpoint import STAGE2_SECTIONS, config_sections
from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
from tree_diffusion.diffusion.conditioning import Conditioning, make_denoiser
from tree_diffusion.diffusion.frozen import load_stage1
from tree_diffusion.diffusion.unet import UNet
from tree_diffusion.diffusion.state import (
  DiffusionState,
  StepConfig,
  abstract_state,
  make_optimizer,
)
from tree_diffusion.errors import ConfigError
from tree_diffusion.runs import RunDir, save_config
from tree_diffusion.torch_files import read_torch_checkpoint
from tree_diffusion.treevae.reference import flax_array

# The reference's ``z_signal`` → our signal part of a conditioning name.
SIGNALS = {
  "path": "path",
  "both": "leaf_id+latent",
  "cluster_id": "leaf_id",
  "latent": "leaf_latent",
}
IMAGE_PARTS = {"form1": "image", "form2": "form2", "uncond": None}


def _parse_ints(value) -> tuple[int, ...]:
  if isinstance(value, str):
    return tuple(int(v) for v in value.split(",") if v.strip())
  if isinstance(value, (int, np.integer)):
    return (int(value),)
  return tuple(int(v) for v in value)


def config_updates(reference_config: Mapping[str, Any]) -> dict[str, Any]:
  """This package's ``diffusion`` config values (dotted keys) for a reference YAML's ``ddpm``
  section: the UNet, the noise schedule and the conditioning.

  Raises:
    ConfigError: the YAML has no ``ddpm`` section, or a formulation this package does not build.
  """
  d = reference_config.get("ddpm")
  if not isinstance(d, Mapping) or "model" not in d or "training" not in d:
    raise ConfigError(
      "the reference config has no ddpm.model and ddpm.training sections: pass the YAML the "
      "diffusion model was trained with (e.g. the reference's configs/mnist.yml)"
    )
  m, t = d["model"], d["training"]
  kind = t.get("type", "form1")
  if kind not in IMAGE_PARTS:
    raise ConfigError(f"ddpm.training.type {kind!r}: use one of {sorted(IMAGE_PARTS)}")
  signal = None
  if t.get("z_cond", False):
    if t.get("z_signal") not in SIGNALS:
      raise ConfigError(
        f"ddpm.training.z_signal {t.get('z_signal')!r}: use one of {sorted(SIGNALS)}"
      )
    signal = SIGNALS[t["z_signal"]]
  parts = [p for p in (IMAGE_PARTS[kind], signal) if p]
  if not parts:
    raise ConfigError(
      "an unconditional reference model (type uncond, z_cond False) has no "
      "TreeVAE condition; this package trains conditioned models only"
    )
  return {
    "diffusion.conditioning": "+".join(parts),
    "diffusion.unet.ch": int(m["dim"]),
    "diffusion.unet.ch_mults": _parse_ints(m["dim_mults"]),
    "diffusion.unet.num_res_blocks": int(m["n_residual"]),
    "diffusion.unet.attn_resolutions": _parse_ints(m["attn_resolutions"]),
    "diffusion.unet.num_heads": int(m.get("n_heads", 1)),
    "diffusion.unet.dropout": float(m.get("dropout", 0.0)),
    "diffusion.unet.norm_groups": 32,
    "diffusion.T": int(m.get("n_timesteps", 1000)),
    "diffusion.beta_1": float(m.get("beta1", 1e-4)),
    "diffusion.beta_T": float(m.get("beta2", 0.02)),
    "diffusion.schedule": "linear",
    "diffusion.prediction": "eps",
    "diffusion.cfg_drop_rate": float(t.get("cfd_rate", 0.0)),
  }


def unet_names(
  ch_mults: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int]
) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """``(our module path, reference module name, kind)`` for every layer of the UNet, where kind
  is ``linear``, ``conv``, ``conv1d`` or ``norm``; in the order both create them."""
  counters = {"Conv": 0, "ResBlock": 0, "AttentionBlock": 0}

  def take(kind):
    name = f"{kind}_{counters[kind]}"
    counters[kind] += 1
    return name

  def res(ref):
    b = take("ResBlock")
    yield (b, "GroupNorm_0", "GroupNorm_0"), f"{ref}.in_layers.0", "norm"
    yield (b, "Conv_0"), f"{ref}.in_layers.2", "conv"
    yield (b, "Dense_0"), f"{ref}.emb_layers.1", "linear"
    yield (b, "GroupNorm_1", "GroupNorm_0"), f"{ref}.out_layers.0", "norm"
    yield (b, "Conv_1"), f"{ref}.out_layers.3", "conv"
    yield (b, "skip"), f"{ref}.skip_connection", "conv"

  def attn(ref):
    a = take("AttentionBlock")
    yield (a, "GroupNorm_0", "GroupNorm_0"), f"{ref}.norm", "norm"
    yield (a, "Conv_0"), f"{ref}.qkv", "conv1d"
    yield (a, "Conv_1"), f"{ref}.proj_out", "conv1d"

  yield ("Dense_0",), "time_embed.0", "linear"
  yield ("Dense_1",), "time_embed.2", "linear"
  yield (take("Conv"),), "input_blocks.0.0", "conv"
  block, ds = 1, 1
  for level in range(len(ch_mults)):
    for _ in range(num_res_blocks):
      yield from res(f"input_blocks.{block}.0")
      if ds in attn_resolutions:
        yield from attn(f"input_blocks.{block}.1")
      block += 1
    if level < len(ch_mults) - 1:
      yield (take("Conv"),), f"input_blocks.{block}.0.op", "conv"
      block, ds = block + 1, ds * 2
  yield from res("middle_block.0")
  yield from attn("middle_block.1")
  yield from res("middle_block.2")
  block = 0
  for level in reversed(range(len(ch_mults))):
    for i in range(num_res_blocks + 1):
      yield from res(f"output_blocks.{block}.0")
      layer = 1
      if ds in attn_resolutions:
        yield from attn(f"output_blocks.{block}.1")
        layer = 2
      if level and i == num_res_blocks:
        yield (take("Conv"),), f"output_blocks.{block}.{layer}.conv", "conv"
        ds //= 2
      block += 1
  yield ("GroupNorm_0", "GroupNorm_0"), "out.0", "norm"
  yield (take("Conv"),), "out.2", "conv"


def _signal_names(conditioning: Conditioning, state: Mapping[str, np.ndarray], prefix: str):
  """``(our module path, reference module name, kind)`` of the conditioning MLPs."""
  ours = [
    p
    for p, used in (("latent", conditioning.uses_latent), ("node_id", conditioning.uses_id))
    if used
  ]
  if any(k.startswith(prefix + "proj_latent.") for k in state):
    refs = {"latent": "proj_latent", "node_id": "proj_cluster_id"}
  else:  # a single leaf signal: one MLP named proj
    refs = {p: "proj" for p in ours}
  for part in ours:
    yield ("signal", part, "Dense_0"), f"{refs[part]}.0", "latent" if part == "latent" else "linear"
    yield ("signal", part, "Dense_1"), f"{refs[part]}.2", "linear"


def _latent_columns(weight: np.ndarray, latent_shape: tuple[int, int, int]) -> np.ndarray:
  """The latent MLP's first weight (``out, in``) with its input columns reordered from the
  reference's channel-first flattening of a node's sample (``C, R, R``) to ours (``R, R, C``)."""
  r1, r2, c = latent_shape
  if weight.shape[1] != r1 * r2 * c:  # another width: the shape check names the key
    return weight
  return weight.reshape(-1, c, r1, r2).transpose(0, 2, 3, 1).reshape(weight.shape)


_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def params_from_state_dict(
  template,
  state: Mapping[str, np.ndarray],
  prefix: str,
  conditioning: Conditioning,
  unet: Mapping[str, Any],
  latent_shape: tuple[int, int, int],
):
  """Our denoiser's parameters from the reference keys under ``prefix`` (e.g.
  ``online_network.decoder.``).

  ``template``: the parameters' structure (``jax.eval_shape`` of the denoiser's init);
  ``unet``: the ``diffusion.unet`` settings; ``latent_shape``: ``(R, R, C)`` of a node's latent.

  Raises:
    ConfigError: a key is missing or left over under ``prefix``, or an array's shape differs.
  """
  names = {
    ("UNet_0",) + p: (n, k)
    for p, n, k in unet_names(unet["ch_mults"], unet["num_res_blocks"], unet["attn_resolutions"])
  }
  names.update({p: (n, k) for p, n, k in _signal_names(conditioning, state, prefix)})
  used = set()

  def fill(path, leaf_value):
    *module, leaf = path
    if tuple(module) not in names:
      raise ConfigError(f"no reference layer is known for {'/'.join(path)}")
    ref, kind = names[tuple(module)]
    key = f"{prefix}{ref}.{_LEAVES[leaf]}"
    if key not in state:
      raise ConfigError(
        f"the checkpoint has no {key}: it does not hold the UNet the reference config describes"
      )
    used.add(key)
    array = np.asarray(state[key])
    if leaf != "kernel":
      kind = "as_is"
    elif kind == "latent":
      array, kind = _latent_columns(array, latent_shape), "linear"
    return flax_array(key, array, kind, leaf_value.shape, "the UNet")

  params = jax.tree_util.tree_map_with_path(
    lambda p, v: fill(tuple(getattr(k, "key", str(k)) for k in p), v), template
  )
  left = sorted(k for k in state if k.startswith(prefix) and k not in used)
  if left:
    raise ConfigError(
      f"{len(left)} key(s) under {prefix} are not used, e.g. {left[0]}: the reference config "
      f"does not describe this UNet (its conditioning or levels differ)"
    )
  return params


def check_schedule(state: Mapping[str, np.ndarray], T: int, beta_1: float, beta_T: float):
  """Refuses a checkpoint whose stored betas are not the linear schedule of the config."""
  betas = state.get("online_network.betas")
  if betas is None:
    return
  want = np.linspace(beta_1, beta_T, T)
  if betas.shape != want.shape or not np.allclose(betas, want, rtol=1e-6, atol=0):
    raise ConfigError(
      f"the checkpoint's betas ({betas.shape[0]} steps, {betas[0]:g} to {betas[-1]:g}) are not "
      f"the config's linear schedule ({T} steps, {beta_1:g} to {beta_T:g})"
    )


def import_ddpm(config, checkpoint: str, workdir: str, source: Mapping[str, Any]) -> int:
  """Writes a reference Lightning checkpoint as this run's stage-2 checkpoint, on the stage-1
  export of ``workdir`` (:func:`tree_diffusion.treevae.reference.import_treevae` first).

  The online network becomes ``params``, the EMA copy ``ema_params``; the step is the
  checkpoint's ``global_step``. The optimiser starts afresh (Adam's moments are not carried
  over), so a stage-2 run continued from here begins with new moment estimates. Also writes
  ``WORKDIR/diffusion/config.json``. Returns the step.

  Raises:
    ConfigError: the checkpoint holds no reference ``DDPMWrapper`` state, or another UNet.
  """
  state, scalars = read_torch_checkpoint(checkpoint)
  weights = {k[len("state_dict.") :]: v for k, v in state.items() if k.startswith("state_dict.")}
  if not any(k.startswith("online_network.decoder.") for k in weights):
    raise ConfigError(
      f"{checkpoint} holds no state_dict with online_network.decoder.* keys: it is not a "
      f"checkpoint of the reference's DDPMWrapper (its train_ddpm.py writes those)"
    )
  c = config.diffusion
  check_schedule(weights, c.T, c.beta_1, c.beta_T)
  step = int(scalars.get("global_step", 0))
  model, _, tree, path, fingerprint, _ = load_stage1(config, workdir)
  denoiser = make_denoiser(c.conditioning, c.unet, c.dtype)
  step_cfg = StepConfig.from_config(c)
  abstract = abstract_state(denoiser, step_cfg, model, tree)
  u = UNet(out_channels=model.channels, **dict(denoiser.unet))  # the settings with defaults
  unet = {
    "ch_mults": u.ch_mults,
    "num_res_blocks": u.num_res_blocks,
    "attn_resolutions": u.attn_resolutions,
  }
  read = lambda prefix: params_from_state_dict(
    abstract.params, weights, prefix, denoiser.conditioning, unet, model.latent_shape(0)
  )
  params = read("online_network.decoder.")
  ema = (
    read("target_network.decoder.")
    if any(k.startswith("target_network.decoder.") for k in weights)
    else params
  )
  train_state = DiffusionState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    ema_params=ema,
    opt_state=make_optimizer(step_cfg).init(params),
  )
  run_dir = RunDir(workdir)
  save_config(run_dir.stage2_config, config)
  ckpts = Stage2Checkpoints(run_dir.stage2_checkpoints, max_to_keep=c.checkpoints_to_keep)
  ckpts.save(
    step,
    train_state,
    {
      "export": path,
      "export_fingerprint": fingerprint,
      "data_identity": None,
      "conditioning": denoiser.conditioning.name,
      "epoch": int(scalars.get("epoch", 0)),
      "config": config_sections(config, STAGE2_SECTIONS),
      "imported_from": dict(source),
    },
  )
  ckpts.close()
  return step
