"""Throughput of the hot paths and the end-to-end time estimate behind ``launch/benchmark.py``.

Each part is compiled ahead of time (``jit(...).lower(...).compile()``, timed as compile time),
run ``warmup`` times, then ``steps`` times back to back with one ``block_until_ready`` at the end
(dispatch is asynchronous, so this is the rate a training loop sees). Inputs are random arrays of
the config's shapes already on the mesh: the data pipeline is not part of the figure.

FLOPs come from XLA's cost analysis of the compiled program (a multiply-add counts 2). XLA counts
a ``scan`` body once, so the sampler's count is the program's plus ``steps − 1`` further denoiser
calls, and Inception's is taken from the network without its micro-batch loop.

Why one long module: the measuring kit (compile, time, FLOPs, memory, peak rates), one function
per measured part (TreeVAE step, diffusion step, sampler, Inception, classifier) and the
end-to-end estimate that combines them with a config's schedule belong together, and none of it
is used by training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion import sharding
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree

PARTS = ("treevae", "diffusion", "sampler", "inception")

# Dense peak TFLOP/s per chip from the vendors' spec sheets: (bfloat16, float32). float32 on
# NVIDIA GPUs is the TF32 tensor-core rate (XLA's default precision for f32 matmuls and
# convolutions there); TPUs run float32 matmuls as bfloat16 passes, so one figure is given.
PEAK_TFLOPS = {
  "NVIDIA H200": (989.0, 494.5),
  "NVIDIA H100": (989.0, 494.5),
  "NVIDIA A100": (312.0, 156.0),
  "TPU v6 lite": (918.0, 918.0),
  "TPU v5p": (459.0, 459.0),
  "TPU v5 lite": (197.0, 197.0),
  "TPU v4": (275.0, 275.0),
}

# The reference PyTorch code on one NVIDIA H200, float32, images/s (issue figures; the sampler is
# DDIM with 100 steps at batch 512, the train steps batch 256 with a depth-3 tree).
REFERENCE_H200 = {
  "mnist": {"treevae": 2932.0, "diffusion": 3276.0, "sampler": 85.0},
  "cifar10": {"treevae": 1592.0, "diffusion": 2231.0, "sampler": 63.0},
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The spec-sheet peak of a known chip (None for CPUs and unknown chips)."""
  for name, (bf16, f32) in PEAK_TFLOPS.items():
    if device_kind.startswith(name):
      return bf16 if dtype == "bfloat16" else f32
  return None


# CPU flags (``/proc/cpuinfo``) that decide which kernels run fast; reported with CPU figures.
CPU_FLAGS = (
  "avx2",
  "fma",
  "avx512f",
  "avx512_bf16",
  "avx512_fp16",
  "avx512_vnni",
  "amx_tile",
  "amx_bf16",
)


def cpu_info() -> dict:
  """``{"model": …, "flags": [...]}`` of this machine's CPU (Linux; empty elsewhere)."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def native_bf16(info: dict) -> bool:
  """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX)."""
  return bool({"avx512_bf16", "amx_bf16"} & set(info["flags"]))


def measure_matmul_tflops(mesh, dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """TFLOP/s of an ``n × n`` matmul on one device of ``mesh`` (best of ``repeats`` after a warm-up).

  On a CPU this is the practical peak of the process (all its cores run one matmul): the
  reference for utilisation, since CPUs have no spec-sheet figure that XLA can reach.
  """
  dev = mesh.devices.flat[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, n)), dtype), dev)
  fn = jax.jit(lambda x, y: x @ y)
  fn(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best / 1e12


def cpu_peaks(mesh, info: dict) -> dict:
  """Measured matmul peaks of this CPU (``info``: :func:`cpu_info`): ``float32``, and
  ``bfloat16`` where it has bf16 units."""
  peaks = {"float32": measure_matmul_tflops(mesh, "float32")}
  if native_bf16(info):
    peaks["bfloat16"] = measure_matmul_tflops(mesh, "bfloat16")
  return peaks


# ------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Measurement:
  """One line of the benchmark's output (see :meth:`to_json`)."""

  part: str
  batch: int
  steps: int
  seconds_per_step: float
  compile_s: float
  flops_per_image: float | None
  flops_source: str
  device: str
  num_devices: int
  dtype: str
  peak_tflops: float | None = None
  peak_memory_bytes: int | None = None
  compiled_memory_bytes: int | None = None
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def images_per_s(self) -> float:
    return self.batch / self.seconds_per_step

  @property
  def tflops(self) -> float | None:
    if self.flops_per_image is None:
      return None
    return self.flops_per_image * self.images_per_s / 1e12

  @property
  def utilisation(self) -> float | None:
    """Achieved / peak FLOP/s of all devices together (on a CPU the measured peak of the whole
    process: CPU devices share its cores)."""
    if self.tflops is None or not self.peak_tflops:
      return None
    return self.tflops / (self.peak_tflops * (1 if self.device == "cpu" else self.num_devices))

  def to_dict(self) -> dict:
    d = {
      "part": self.part,
      "images_per_s": round(self.images_per_s, 2),
      "step_ms": round(1e3 * self.seconds_per_step, 3),
      "batch": self.batch,
      "steps": self.steps,
      "dtype": self.dtype,
      "device": self.device,
      "num_devices": self.num_devices,
      "compile_s": round(self.compile_s, 2),
      "gflops_per_image": None
      if self.flops_per_image is None
      else round(self.flops_per_image / 1e9, 4),
      "flops_source": self.flops_source,
      "tflops": None if self.tflops is None else round(self.tflops, 4),
      "peak_tflops": self.peak_tflops,
      "utilisation": None if self.utilisation is None else round(self.utilisation, 4),
      "peak_memory_bytes": self.peak_memory_bytes,
      "compiled_memory_bytes": self.compiled_memory_bytes,
    }
    d.update(self.extra)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict())


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program by XLA's cost analysis (None if unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  flops = (ca or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compiled_memory(compiled) -> int | None:
  """Device bytes a compiled program needs: arguments + outputs + temporaries − donated aliases."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def device_peak_memory() -> int | None:
  """The allocator's peak bytes on the first local device since the process started (GPU/TPU;
  None on CPU): with several parts in one run, a part's figure includes the earlier ones'."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def compile_fn(fn, *args, **static) -> tuple[Any, float]:
  """``(compiled, seconds)`` for ``fn.lower(*args, **static).compile()``."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args, **static).compile()
  return compiled, time.perf_counter() - t0


def time_calls(
  step: Callable[[Any], tuple[Any, Any]], carry, steps: int, warmup: int
) -> tuple[float, Any]:
  """Seconds per call of ``carry, out = step(carry)`` after ``warmup`` calls (blocked at the end)."""
  out = None
  for _ in range(warmup):
    carry, out = step(carry)
  jax.block_until_ready((carry, out))
  t0 = time.perf_counter()
  for _ in range(steps):
    carry, out = step(carry)
  jax.block_until_ready((carry, out))
  return (time.perf_counter() - t0) / steps, carry


# ------------------------------------------------------------------------------------ the parts


@dataclasses.dataclass
class Setup:
  """What every part needs: the config, the mesh, the compute dtype and the benchmark tree."""

  config: Any
  mesh: Any
  dtype: str
  tree_depth: int = 3
  steps: int = 20
  warmup: int = 2
  tree_nodes: tuple[int, ...] | None = None  # any tree (heap node ids); overrides tree_depth
  # Measured matmul TFLOP/s per dtype (CPU: see cpu_peaks); used where no spec sheet is known.
  measured_peaks: dict[str, float] = dataclasses.field(default_factory=dict)
  cpu: dict | None = None  # cpu_info() of a CPU run, reported with every measurement

  def measurement(
    self,
    part: str,
    batch: int,
    seconds: float,
    compile_s: float,
    flops: float | None,
    source: str,
    compiled=None,
    **extra,
  ) -> Measurement:
    dev = self.mesh.devices.flat[0]
    peak = peak_tflops(dev.device_kind, self.dtype)
    if peak is None and self.measured_peaks:
      # A CPU without bf16 units runs bf16 no faster than float32: its float32 peak is the limit.
      peak = self.measured_peaks.get(self.dtype, self.measured_peaks.get("float32"))
      extra = dict(
        extra,
        peak_source="measured matmul",
        measured_peak_tflops={k: round(v, 4) for k, v in self.measured_peaks.items()},
      )
      if "float32" in self.measured_peaks and flops:
        extra["utilisation_vs_fp32_peak"] = round(
          flops / seconds / 1e12 / self.measured_peaks["float32"], 4
        )
    if self.cpu is not None:
      extra = dict(extra, cpu=self.cpu)
    return Measurement(
      part=part,
      batch=batch,
      steps=self.steps,
      seconds_per_step=seconds,
      compile_s=compile_s,
      flops_per_image=None if flops is None else flops / batch,
      flops_source=source,
      device=dev.device_kind,
      num_devices=self.mesh.devices.size,
      dtype=self.dtype,
      peak_tflops=peak,
      peak_memory_bytes=device_peak_memory(),
      compiled_memory_bytes=None if compiled is None else compiled_memory(compiled),
      extra=extra,
    )


def _tree_and_model(setup: Setup):
  from tree_diffusion.treevae import step as stage1_step

  model = dataclasses.replace(stage1_step.make_model(setup.config), dtype=setup.dtype)
  try:
    tree = Tree(tuple(setup.tree_nodes)) if setup.tree_nodes else Tree.complete(setup.tree_depth)
  except ValueError as e:
    raise ConfigError(f"bad benchmark tree: {e}") from None
  if tree.depth > model.max_depth:
    raise ConfigError(
      f"a tree of depth {tree.depth} exceeds the config's max depth {model.max_depth}"
    )
  variables = jax.device_put(model.init(jax.random.key(0), tree), sharding.replicated(setup.mesh))
  return model, tree, variables


def _images(setup: Setup, batch: int, uint8: bool = False) -> jax.Array:
  shape = (
    batch,
    setup.config.data.image_size,
    setup.config.data.image_size,
    setup.config.data.channels,
  )
  x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
  if uint8:
    x = (255 * x).astype(np.uint8)
  return jax.device_put(x, sharding.data_sharded(setup.mesh))


def treevae_step(setup: Setup, batch: int) -> Measurement:
  """The stage-1 train step (forward, backward, Adam) on a complete tree of ``tree_depth``."""
  from tree_diffusion.treevae import step as stage1_step

  model, tree, variables = _tree_and_model(setup)
  cfg = stage1_step.step_config(setup.config.stage1)
  rep = sharding.replicated(setup.mesh)
  state = jax.device_put(stage1_step.init_state(variables, cfg), rep)
  images = _images(setup, batch)
  key, alpha, lr = jax.device_put((jax.random.key(1), jnp.float32(0.5), jnp.float32(1e-3)), rep)
  compiled, compile_s = compile_fn(
    stage1_step.train_step, state, images, key, alpha, lr, model=model, tree=tree, cfg=cfg
  )
  seconds, _ = time_calls(
    lambda s: compiled(s, images, key, alpha, lr), state, setup.steps, setup.warmup
  )
  return setup.measurement(
    "treevae",
    batch,
    seconds,
    compile_s,
    xla_flops(compiled),
    "xla_cost_analysis",
    compiled,
    tree_leaves=tree.num_leaves,
    tree_depth=tree.depth,
  )


def _stage2(setup: Setup):
  from tree_diffusion.diffusion import state as stage2_state
  from tree_diffusion.diffusion.conditioning import make_denoiser

  c = setup.config.diffusion
  model, tree, tvae_vars = _tree_and_model(setup)
  denoiser = make_denoiser(c.conditioning, c.unet, setup.dtype)
  cfg = stage2_state.StepConfig.from_config(c)
  state = stage2_state.init_state(
    denoiser,
    cfg,
    jax.random.key(1),
    stage2_state.example_condition(denoiser, model, tree),
    model.image_shape,
  )
  state = jax.device_put(state, sharding.replicated(setup.mesh))
  return denoiser, model, tree, tvae_vars, cfg, state


def _forward_flops(setup: Setup, denoiser, model, tree, params, batch: int) -> float | None:
  """XLA's FLOPs of one denoiser call on ``batch`` images (condition built from a batch)."""
  from tree_diffusion.diffusion import state as stage2_state

  cond = stage2_state.example_condition(denoiser, model, tree)
  cond = jax.tree_util.tree_map(lambda a: jnp.repeat(a, batch, axis=0), cond)
  x = jnp.zeros((batch,) + model.image_shape, jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  fwd = jax.jit(lambda p, x, t, c: denoiser.apply({"params": p}, x, t, c, train=False))
  return xla_flops(fwd.lower(params, x, t, cond).compile())


def diffusion_step(setup: Setup, batch: int) -> Measurement:
  """The stage-2 train step: frozen TreeVAE posterior, condition, UNet forward/backward, Adam, EMA."""
  from tree_diffusion.diffusion import step as stage2_step

  denoiser, model, tree, tvae_vars, cfg, state = _stage2(setup)
  images = _images(setup, batch)
  key = jax.device_put(jax.random.key(2), sharding.replicated(setup.mesh))
  compiled, compile_s = compile_fn(
    stage2_step.train_step,
    state,
    tvae_vars,
    images,
    key,
    denoiser=denoiser,
    model=model,
    tree=tree,
    cfg=cfg,
  )
  seconds, state = time_calls(
    lambda s: compiled(s, tvae_vars, images, key), state, setup.steps, setup.warmup
  )
  fwd = _forward_flops(setup, denoiser, model, tree, state.params, batch)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  return setup.measurement(
    "diffusion",
    batch,
    seconds,
    compile_s,
    xla_flops(compiled),
    "xla_cost_analysis",
    compiled,
    conditioning=denoiser.conditioning.name,
    parameters=n_params,
    forward_gflops_per_image=None if fwd is None else round(fwd / batch / 1e9, 4),
  )


def sampler_batch(setup: Setup, batch: int) -> Measurement:
  """One batch of the ``sample_all_leaves`` sampler (prior pass + the whole reverse chain)."""
  from tree_diffusion.diffusion.sampler import Sampler, SamplerConfig

  denoiser, model, tree, tvae_vars, _, state = _stage2(setup)
  cfg = SamplerConfig.from_config(setup.config.diffusion)
  sampler = Sampler(denoiser, model, tree, cfg, "sample_all_leaves", batch, setup.mesh)
  k = tree.num_leaves
  n = sampler.batch_size
  inputs = sampler.inputs(np.arange(n) // k, np.arange(n) % k)
  params = state.ema_params
  key = jax.device_put(jax.random.key(3), sharding.replicated(setup.mesh))
  compiled, compile_s = compile_fn(sampler.fn, params, tvae_vars, key, *inputs)
  seconds, _ = time_calls(
    lambda c: (c, compiled(params, tvae_vars, key, *inputs)), None, setup.steps, setup.warmup
  )
  total, fwd = xla_flops(compiled), _forward_flops(setup, denoiser, model, tree, params, n)
  calls = len(cfg.respaced()) * (2 if cfg.guidance_weight else 1)
  flops = None if total is None or fwd is None else total + (calls - 1) * fwd
  return setup.measurement(
    "sampler",
    n,
    seconds,
    compile_s,
    flops,
    "xla_cost_analysis (scan body x steps)",
    compiled,
    method=cfg.method,
    sampler_steps=len(cfg.respaced()),
    mode="sample_all_leaves",
    conditioning=denoiser.conditioning.name,
  )


def inception_batch(setup: Setup, batch: int, weights: str | None = None) -> Measurement:
  """Inception pool3 features (resize to 299 + the network) of ``batch`` uint8 images.

  Without weights (none installed) the network runs with random parameters of the same shapes,
  which costs the same; the line says ``"weights": "random"``.
  """
  from tree_diffusion.eval import inception, inception_weights

  try:
    params, source = inception_weights.load_inception_params(weights or None), "fid"
  except inception_weights.InceptionWeightsNotFound:
    rng = np.random.default_rng(0)
    params = inception.unflatten_params(
      {
        k: (rng.uniform(0.5, 1.5, s) if k.endswith("var") else rng.normal(0, 0.05, s)).astype(
          np.float32
        )
        for k, s in inception.param_shapes().items()
      }
    )
    source = "random"
  ext = inception.FeatureExtractor(params, setup.mesh, batch_size=batch)
  images = _images(setup, ext.batch_size, uint8=True)
  # The network as FeatureExtractor.features runs it (its own jit with the platform's options);
  # the preprocessing (resize to 299) is a separate, cheap jitted call, timed with it.
  compiled, compile_s = compile_fn(ext.network, ext.params, ext.prep(images))
  seconds, _ = time_calls(
    lambda c: (c, compiled(ext.params, ext.prep(images))), None, setup.steps, setup.warmup
  )
  plain = jax.jit(lambda p, x: ext.model.apply({"params": p}, inception.preprocess(x)))
  flops = xla_flops(plain.lower(ext.params, images).compile())
  return setup.measurement(
    "inception",
    ext.batch_size,
    seconds,
    compile_s,
    flops,
    "xla_cost_analysis",
    compiled,
    weights=source,
    micro_batch=ext.micro_batch,
  )


def run_part(
  setup: Setup, part: str, batch: int | None = None, inception_weights: str | None = None
) -> Measurement:
  """Measures ``part`` at ``batch`` (default: the config's batch size for that work)."""
  c = setup.config
  default = {
    "treevae": c.stage1.batch_size,
    "diffusion": c.diffusion.batch_size,
    "sampler": c.diffusion.sampling.batch_size,
    "inception": c.eval.fid_batch_size,
  }
  if part not in default:
    raise ValueError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
  b = batch or default[part]
  sharding.check_batch_size(b, setup.mesh, setting="--batch")
  if part == "inception":
    return inception_batch(setup, b, inception_weights)
  fn = {"treevae": treevae_step, "diffusion": diffusion_step, "sampler": sampler_batch}[part]
  return fn(setup, b)


# ------------------------------------------------------------------------------------ end to end


def stage1_epochs(s) -> dict:
  """Epochs of the stage-1 schedule in the config's ``stage1`` section (initial training, one
  small tree per split, fine-tuning: the reference's order).

  Growing from ``2^initial_depth`` leaves to ``num_clusters_tree`` takes one split per new leaf
  (at most ``max_growth_iterations``); a full-tree pass runs before iterations 3, 6, 9, ….
  """
  splits = 0
  if s.grow:
    splits = min(max(s.num_clusters_tree - 2**s.initial_depth, 0), s.max_growth_iterations)
  intermediate = sum(1 for it in range(1, splits) if it % 3 == 0) if s.intermediate_fulltrain else 0
  return {
    "initial": s.num_epochs,
    "small_tree": splits * s.num_epochs_smalltree,
    "intermediate": intermediate * s.num_epochs_intermediate_fulltrain,
    "finetune": s.num_epochs_finetuning,
    "splits": splits,
  }


def end_to_end(
  config,
  rates: dict[str, float | None],
  *,
  train_size: int,
  test_size: int,
  fid_runs: int = 10,
  leaves: int | None = None,
) -> dict:
  """Hours for a paper row (stage 1, stage 2, sampling, FID features) from images/s ``rates``.

  Workload (stated in the output): stage 1 runs its whole schedule with every epoch over the full
  training set at the full-tree step rate (an upper bound: small-tree epochs only see the
  samples routed to the split leaf and skip the frozen tree's backward pass); stage 2 runs its
  configured steps; sampling draws ``fid_runs × eval.num_samples`` prior samples decoded through
  every one of ``leaves`` leaves (the ``sample_all_leaves`` evaluation); Inception features are
  computed for ``fid_runs × eval.num_samples`` generations plus the test split.
  """
  s, d = config.stage1, config.diffusion
  leaves = leaves or s.num_clusters_tree
  ep = stage1_epochs(s)
  s1_epochs = ep["initial"] + ep["small_tree"] + ep["intermediate"] + ep["finetune"]
  steps2 = d.num_steps if d.num_steps > 0 else d.num_epochs * (train_size // d.batch_size)
  images = {
    "treevae": s1_epochs * train_size,
    "diffusion": steps2 * d.batch_size,
    "sampler": fid_runs * config.eval.num_samples * leaves,
    "inception": fid_runs * config.eval.num_samples + test_size,
  }
  hours = {k: (None if not rates.get(k) else images[k] / rates[k] / 3600.0) for k in images}
  known = [h for h in hours.values() if h is not None]
  return {
    "part": "end_to_end",
    "hours": {k: None if v is None else round(v, 3) for k, v in hours.items()},
    "total_hours": round(sum(known), 3) if known else None,
    "complete": len(known) == len(hours),
    "images": images,
    "rates_images_per_s": rates,
    "stage1_epochs": s1_epochs,
    "stage1_splits": ep["splits"],
    "stage2_steps": steps2,
    "assumptions": (
      "stage 1: every epoch over the full training set at the full-tree step "
      "rate (upper bound); stage 2: the configured steps; sampling: fid_runs x "
      "eval.num_samples prior samples through every leaf; Inception: those "
      "generations + the test split; data loading, evaluation passes of stage 1 "
      "and checkpointing not counted"
    ),
  }
