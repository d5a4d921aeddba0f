"""Stage-2 sampling: the whole reverse chain as one ``lax.scan`` in one ``jit``, sharded over "data".

:func:`reverse_chain` is the chain itself (DDIM or ancestral DDPM over a respaced timestep table).
:class:`Sampler` wraps it with the frozen TreeVAE into the four evaluation modes of the reference:

* ``sample``: root prior → conditional priors → p-router leaf probabilities → one leaf *drawn* per
  sample → the chain from pure noise (form2: noise + the leaf's TreeVAE image).
* ``sample_all_leaves``: the same prior sample decoded through *every* leaf. Leaves are folded into
  the batch (entries are (example, leaf) pairs), so it is one compiled sampler, not a loop. All
  leaves of an example share its prior sample, start noise and chain noise; image-conditioned
  variants start from ``noisy(x̂0^(k))`` as the reference does, the path-only model from noise.
* ``recons`` / ``recons_all_leaves``: as above from the posterior of test images; the chain starts
  from ``noisy(x)`` of the true image (the reference's ``sqrt(ᾱ_{T−1}) x`` leak of 0.6 %).

Every random draw of an entry comes from ``fold_in(key, example_id)``: an example's draws depend
only on the seed and its id, not on the devices, the processes or the batch. Its result is then the
same, bit for bit, wherever each device computes as many examples (1 or 8 devices, one or several
processes); with another per-device batch XLA may sum in another order, and the images differ by
float32 rounding (up to 1e-5, tested). Batches are padded to the fixed, device-divisible size and
the padding is dropped on the host. In a multi-process job the mesh spans every process's devices:
each process feeds only its own rows of every batch and every process receives the whole result.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tree_diffusion import inputs, sharding, validation, xla_options
from tree_diffusion.diffusion import frozen, schedule
from tree_diffusion.diffusion.conditioning import (
  Denoiser,
  PathTables,
  make_condition,
  null_condition,
)
from tree_diffusion.diffusion.ddim import ddim_step, normal_like
from tree_diffusion.diffusion.ddpm import ddpm_step
from tree_diffusion.diffusion.process import Process
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE

MODES = ("sample", "sample_all_leaves", "recons", "recons_all_leaves")
METHODS = schedule.METHODS


def check_config(config) -> None:
  """Ranges of ``diffusion.sampling``, its ``steps`` against ``diffusion.T`` and the chain's
  choices (:class:`SamplerConfig` checks those), before training too, so that a run does not end
  with a config that cannot sample."""
  s = "diffusion.sampling."
  v = validation
  v.check_rules(
    config,
    {
      "diffusion.T": v.positive,
      s + "steps": v.positive,
      s + "batch_size": v.positive,
      s + "num_samples": v.positive,
      s + "seed": v.non_negative,
      s + "figure_samples": v.non_negative,
      s + "figure_images_per_leaf": v.positive,
    },
  )
  SamplerConfig.from_config(config.diffusion)  # method, spacing, DDPM variance, eta
  steps, T = config.diffusion.sampling.steps, config.diffusion.T
  if steps > T:
    raise ConfigError(
      f"config.diffusion.sampling.steps ({steps}) must be <= config.diffusion.T "
      f"({T}): the sampler visits a subset of the T diffusion steps; set "
      f"--config.diffusion.sampling.steps={T} or fewer"
    )
  if config.diffusion.sampling.spacing == "uniform":
    try:
      schedule.spaced_timesteps(T, steps, "uniform")
    except ValueError as e:
      raise ConfigError(
        f"config.diffusion.sampling.steps={steps} with spacing 'uniform': {e}; "
        f"set --config.diffusion.sampling.steps=… or "
        f"--config.diffusion.sampling.spacing=quad"
      ) from None


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The chain (hashable). Defaults are the reference's: DDIM, 100 ``quad`` steps (96 distinct), η 0."""

  process: Process = Process()
  method: str = "ddim"
  steps: int = 100
  spacing: str = "quad"
  eta: float = 0.0
  variance: str = "fixedlarge"  # DDPM only
  guidance_weight: float = 0.0
  clip: bool = True
  # sample_all_leaves without an image condition starts from the noised TreeVAE decodings (the
  # reference) instead of noise.
  all_leaves_from_treevae: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ConfigError(
        f"unknown sampler {self.method!r}; use one of {METHODS} "
        f"(--config.diffusion.sampling.method)"
      )
    if self.spacing not in schedule.SPACINGS:
      raise ConfigError(
        f"unknown timestep spacing {self.spacing!r}; use one of "
        f"{schedule.SPACINGS} (--config.diffusion.sampling.spacing)"
      )
    if self.variance not in schedule.DDPM_VARIANCES:
      raise ConfigError(
        f"unknown DDPM variance {self.variance!r}; use one of "
        f"{schedule.DDPM_VARIANCES} (--config.diffusion.sampling.ddpm_variance)"
      )
    if self.eta < 0:
      raise ConfigError(f"DDIM eta must be >= 0, got {self.eta}")

  @classmethod
  def from_config(cls, c) -> "SamplerConfig":
    """From the config's ``diffusion`` section (the process) and ``diffusion.sampling``."""
    s = c.sampling
    return cls(
      process=Process.from_config(c),
      method=s.method,
      steps=s.steps,
      spacing=s.spacing,
      eta=s.eta,
      variance=s.ddpm_variance,
      guidance_weight=s.guidance_weight,
      all_leaves_from_treevae=bool(s.get("all_leaves_from_treevae", False)),
    )

  def respaced(self) -> schedule.Respaced:
    try:
      tau = schedule.spaced_timesteps(self.process.T, self.steps, self.spacing)
    except ValueError as e:
      raise ConfigError(f"{e} (--config.diffusion.sampling.steps)") from None
    return schedule.respace(self.process.alpha_bar(), tau)


def starts_from_treevae(mode: str, conditioning, cfg: SamplerConfig) -> bool:
  """Whether a prior sample's chain starts at T−1 from the noised TreeVAE decoding of its leaf
  instead of noise: in ``sample_all_leaves`` for a model with an image condition (as in the
  reference), and for every model with ``cfg.all_leaves_from_treevae`` (the reference's start for
  the path-only model too)."""
  return mode == "sample_all_leaves" and (
    conditioning.image is not None or cfg.all_leaves_from_treevae
  )


def reverse_chain(
  eps_fn, x_T: jax.Array, cfg: SamplerConfig, keys: jax.Array | None, shift: jax.Array | None = None
) -> jax.Array:
  """Runs the reverse chain from ``x_T`` with one ``lax.scan`` over the respaced steps.

  Args:
    eps_fn: ``(x_t, t) -> `` the network's output (ε̂, x̃0 or v̂: ``cfg.process.prediction``) with
      ``t`` int ``[B]`` (original step indices).
    x_T: the start ``[B, …]``.
    cfg: the chain.
    keys: one key per example (``[B]``) for the stochastic samplers; step ``k`` uses
      ``fold_in(key, k)``. May be None for DDIM with η = 0.
    shift: form2's mean shift ``c``: the network sees ``u + c`` while the update runs on ``u``
      (equal to the reference's subtract-before / add-after form2 update, including the final
      ``− c``).
  """
  r = cfg.respaced()
  f32 = lambda a: jnp.asarray(np.asarray(a)[::-1].copy(), jnp.float32)
  xs = dict(
    t=jnp.asarray(r.timesteps[::-1].copy(), jnp.int32),
    k=jnp.arange(len(r) - 1, -1, -1, dtype=jnp.int32),
    a=f32(r.alpha_bar),
    a_prev=f32(r.alpha_bar_prev),
    c1=f32(r.posterior_coef_x0),
    c2=f32(r.posterior_coef_xt),
  )
  if cfg.method == "ddpm":
    xs["var"] = f32(r.ddpm_variance(cfg.variance))
  b = x_T.shape[0]
  stochastic = cfg.method == "ddpm" or cfg.eta > 0
  if stochastic and keys is None:
    raise ValueError(f"the {cfg.method} sampler with eta={cfg.eta} needs keys")

  def body(u, s):
    x = u if shift is None else u + shift
    pred = eps_fn(x, jnp.full((b,), s["t"], jnp.int32))
    x0, eps = cfg.process.x0_and_eps(pred, u, s["a"], cfg.clip)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, s["k"]) if stochastic else None
    if cfg.method == "ddim":
      u = ddim_step(u, eps, s["a"], s["a_prev"], cfg.eta, step_keys, x0=x0)
    else:
      u = ddpm_step(u, eps, s["a"], s["c1"], s["c2"], s["var"], step_keys, last=s["k"] == 0, x0=x0)
    return u, None

  u, _ = jax.lax.scan(body, x_T, xs)
  return u


def guided_eps(denoiser: Denoiser, params, cond: dict, weight: float):
  """``eps_fn`` of the EMA denoiser; with ``weight ≠ 0`` classifier-free guidance
  ``(1 + w) ε(x, c) − w ε(x, ∅)`` from one network call on the doubled batch."""

  def eps_fn(x, t):
    if weight == 0:
      return denoiser.apply({"params": params}, x, t, cond, train=False)
    both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), cond, null_condition(cond))
    e = denoiser.apply(
      {"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both, train=False
    )
    e_c, e_u = jnp.split(e, 2)
    return (1.0 + weight) * e_c - weight * e_u

  return eps_fn


class Sampler:
  """One compiled sampler for a (denoiser, TreeVAE, tree, chain, mode, batch size).

  Call :meth:`run` for whole jobs (batching, padding, progress) or :meth:`batch` for one batch.
  ``fn(params, tvae_vars, key, *inputs(ids, leaves, images))`` is the jitted batch function on
  device arrays (what the benchmark times). ``traces`` counts how often it was traced (1 after
  any number of calls).
  """

  def __init__(
    self,
    denoiser: Denoiser,
    model: TreeVAE,
    tree: Tree,
    cfg: SamplerConfig,
    mode: str,
    batch_size: int,
    mesh=None,
  ):
    if mode not in MODES:
      raise ConfigError(f"unknown sampling mode {mode!r}; use one of {', '.join(MODES)}")
    self.denoiser, self.model, self.tree, self.cfg, self.mode = denoiser, model, tree, cfg, mode
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = -(-batch_size // n_dev) * n_dev  # padded, never rejected
    self.tables = PathTables.from_tree(tree)
    self.traces = 0
    rep, data = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    self._data = data
    self.fn = jax.jit(
      self._batch,
      in_shardings=(rep, rep, rep, data, data, data),
      out_shardings=data,
      compiler_options=xla_options.conv_net_for_mesh(self.mesh),
    )

  @property
  def all_leaves(self) -> bool:
    return self.mode.endswith("all_leaves")

  @property
  def from_prior(self) -> bool:
    return self.mode.startswith("sample")

  def _batch(self, params, tvae_vars, key, ids, leaves, images):
    self.traces += 1
    cond_kind = self.denoiser.conditioning
    ex_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    sub = lambda i: jax.vmap(jax.random.fold_in, (0, None))(ex_keys, i)
    if self.from_prior:
      z_all, probs, leaf_images = frozen.prior_per_example(
        self.model, self.tree, tvae_vars, sub(0), decode=True
      )
    else:
      z_all, probs, leaf_images = frozen.posterior_per_example(
        self.model, self.tree, tvae_vars, images, sub(0), decode=True
      )
    if not self.all_leaves:
      logits = jnp.log(jnp.maximum(probs, 1e-30))
      leaves = jax.vmap(jax.random.categorical)(sub(1), logits).astype(jnp.int32)
    proc = self.cfg.process
    vae_image = leaf_images[leaves, jnp.arange(leaves.shape[0])]
    cond = make_condition(cond_kind, self.tables, z_all, leaves, proc.encode(leaf_images))
    shape = (ids.shape[0],) + self.model.image_shape
    noise = normal_like(sub(2), jnp.zeros(shape, jnp.float32))
    if not self.from_prior:
      start = proc.encode(images)
    elif self.from_prior and starts_from_treevae(self.mode, cond_kind, self.cfg):
      start = proc.encode(vae_image)
    else:
      start = None
    if start is None:
      x_T = noise
    else:  # noisy(u) = sqrt(ᾱ_{T−1}) u + sqrt(1 − ᾱ_{T−1}) ε, as the reference's q_sample at T−1
      ab = float(self.cfg.process.alpha_bar()[-1])
      x_T = math.sqrt(ab) * start + math.sqrt(1.0 - ab) * noise
    eps_fn = guided_eps(self.denoiser, params, cond, self.cfg.guidance_weight)
    x0 = reverse_chain(
      eps_fn, x_T, self.cfg, sub(3), shift=cond["image"] if cond_kind.form2 else None
    )
    return dict(image=proc.decode(x0), vae_image=vae_image, leaf=leaves, leaf_probs=probs)

  def inputs(self, ids, leaves=None, images=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids, leaves, images)`` of at most ``batch_size`` entries, padded, on the mesh."""
    n = inputs.count(len(ids), "len(ids)")
    b = self.batch_size
    if n > b:
      raise ValueError(
        f"{n} entries exceed the batch size {b}: pass at most {b} ids per batch (or use run)"
      )
    pad = lambda a, fill=0: np.concatenate([a, np.full((b - n,) + a.shape[1:], fill, a.dtype)])
    ids = pad(np.asarray(ids, np.int32))
    leaves = pad(np.zeros(n, np.int32) if leaves is None else np.asarray(leaves, np.int32))
    if images is None:
      images = np.zeros((b,) + self.model.image_shape, np.float32)
    else:
      images = pad(np.asarray(images, np.float32))
    return sharding.put_global((ids, leaves, images), self.mesh)  # this process's rows

  def batch(self, params, tvae_vars, key, ids, leaves=None, images=None) -> dict[str, np.ndarray]:
    """One batch of at most ``batch_size`` entries; returns host arrays for exactly those (on
    every process: a collective in a multi-process job, which every process must call)."""
    if images is not None:  # run checks all its images once, before its batches
      inputs.images(images, self.model.image_shape)
    params, tvae_vars, key = sharding.replicate((params, tvae_vars, key), self.mesh)
    return self._replicated_batch(params, tvae_vars, key, ids, leaves, images)

  def _replicated_batch(self, params, tvae_vars, key, ids, leaves, images) -> dict[str, np.ndarray]:
    """:meth:`batch` with ``params``, ``tvae_vars`` and ``key`` already replicated on the mesh."""
    out = sharding.to_host(self.fn(params, tvae_vars, key, *self.inputs(ids, leaves, images)))
    return {k: v[: len(ids)] for k, v in out.items()}

  def run(
    self,
    params,
    tvae_vars,
    key,
    num: int | None = None,
    images: np.ndarray | None = None,
    log_every: int = 10,
  ) -> dict[str, np.ndarray]:
    """Every entry of the mode: ``num`` prior samples, or all of ``images`` (float [N, H, W, C]).

    Returns host arrays ``image`` (float, unclipped), ``vae_image`` (the chosen leaf's TreeVAE
    decoding), ``leaf`` and ``leaf_probs``; the ``*_all_leaves`` modes add a leaf axis after the
    example axis (``image`` ``[N, K, H, W, C]``).
    """
    if self.from_prior:
      if num is None or images is not None:
        raise ValueError(
          f"mode {self.mode} samples from the prior: pass num (a count >= 1), not images"
        )
      n = inputs.count(num, "num")
    else:
      if images is None or num is not None:
        raise ValueError(
          f"mode {self.mode} encodes images: pass images (floats [N, H, W, C] in [0, 1]), not num"
        )
      inputs.images(images, self.model.image_shape, batch_axis="N")
      n = len(images)
    inputs.prng_key(key)
    k = self.tree.num_leaves if self.all_leaves else 1
    inputs.fits_memory(
      2 * 4 * n * k * int(np.prod(self.model.image_shape)),
      f"{self.mode} of {n} x {k} images (image and vae_image)",
      "run it in smaller parts (fold_in the key per part)",
    )
    params, tvae_vars, key = sharding.replicate((params, tvae_vars, key), self.mesh)  # once
    ex = np.repeat(np.arange(n, dtype=np.int32), k)
    lv = np.tile(np.arange(k, dtype=np.int32), n)
    total = len(ex)
    outs = []
    t0 = time.perf_counter()
    num_batches = -(-total // self.batch_size)
    for i, start in enumerate(range(0, total, self.batch_size)):
      sl = slice(start, start + self.batch_size)
      outs.append(
        self._replicated_batch(
          params, tvae_vars, key, ex[sl], lv[sl], None if images is None else images[ex[sl]]
        )
      )
      if log_every and ((i + 1) % log_every == 0 or i + 1 == num_batches):
        dt = time.perf_counter() - t0
        done = min(start + self.batch_size, total)
        logging.info(
          "%s: %d/%d images, %.1f images/s, ETA %.0f s",
          self.mode,
          done,
          total,
          done / dt,
          dt / done * (total - done),
        )
    out = {key_: np.concatenate([o[key_] for o in outs]) for key_ in outs[0]}
    if self.all_leaves:
      out = {key_: v.reshape((n, k) + v.shape[1:]) for key_, v in out.items()}
      out["leaf_probs"] = out["leaf_probs"][:, 0]
    return out
