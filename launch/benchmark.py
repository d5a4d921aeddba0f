"""Throughput of both stages, the sampler and Inception; one JSON line per measurement.

    python -m launch.benchmark --config=configs/mnist.py --parts=treevae,diffusion
    python -m launch.benchmark --config=configs/mnist.py --parts=sampler --batch=512 \
        --config.diffusion.sampling.steps=100 --dtype=bfloat16
    python -m launch.benchmark --config=configs/mnist.py --estimate_end_to_end

Inputs are random arrays of the config's image shape (no dataset needed). Each line gives
images/s, XLA's FLOPs per image, achieved TFLOP/s and utilisation against the chip's peak
(``--peak_tflops``, the spec sheet of a known chip, or on a CPU the rate of a 2048² matmul measured
in the same process: float32, and bfloat16 where the CPU has bf16 units), compile time and memory;
on a CPU also its model and the instruction-set flags that matter.
``--estimate_end_to_end`` measures every part at the config's batch sizes and adds a line with
the hours a whole paper row would take (stage 1 schedule, stage 2 steps, sampling, FID features),
next to the reference code's hours from its measured rates where known.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_PARTS = flags.DEFINE_list(
  "parts",
  ["treevae", "diffusion", "sampler", "inception"],
  "What to measure: treevae, diffusion, sampler, inception.",
)
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: the config's for each part).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per part (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_TREE_DEPTH = flags.DEFINE_integer(
  "tree_depth", 3, "Depth of the complete benchmark tree (3: 8 leaves, a 4-node root-to-leaf path)."
)
_TREE = flags.DEFINE_list(
  "tree",
  None,
  "Node ids (heap numbering: children of i are 2i+1, 2i+2) "
  "of any benchmark tree, e.g. 0,1,2,4,9,10; overrides --tree_depth.",
)
_PEAK = flags.DEFINE_float(
  "peak_tflops",
  None,
  "Peak TFLOP/s of one device (default: the spec "
  "sheet of a known chip; on a CPU a matmul measured at start).",
)
_INCEPTION = flags.DEFINE_string(
  "inception_weights",
  "",
  "FID Inception weights (default: the usual lookup; random weights of the same shape if none).",
)
_E2E = flags.DEFINE_bool(
  "estimate_end_to_end",
  False,
  "Measure every part at the config's batch sizes and estimate the hours of a whole paper row.",
)
_FID_RUNS = flags.DEFINE_integer("fid_runs", 10, "Sampling runs of the end-to-end estimate.")
_TRAIN_SIZE = flags.DEFINE_integer(
  "train_size",
  None,
  "Training images of the end-to-end estimate (default: the named dataset's size).",
)
_OUTPUT = flags.DEFINE_string("output", "", "Also append the JSON lines to this file.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  common.setup(compilation_cache=False)  # compile times are part of the measurement
  common.check_config(_CONFIG.value)
  import jax  # pylint: disable=g-import-not-at-top
  from tree_diffusion import benchmark, data, sharding  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  parts = list(benchmark.PARTS) if _E2E.value else _PARTS.value
  bad = [p for p in parts if p not in benchmark.PARTS]
  if bad:
    raise ConfigError(
      f"unknown part(s) {', '.join(bad)}; use --parts with some of {','.join(benchmark.PARTS)}"
    )
  nodes = None
  if _TREE.value:
    try:
      nodes = tuple(int(n) for n in _TREE.value)
    except ValueError:
      raise ConfigError(f"--tree needs integer node ids, got {','.join(_TREE.value)}") from None
  mesh = sharding.make_mesh()
  cpu, peaks = None, {}
  if mesh.devices.flat[0].platform == "cpu":
    cpu = benchmark.cpu_info()
    if not _PEAK.value:
      peaks = benchmark.cpu_peaks(mesh, cpu)
      logging.info(
        "CPU %s: measured matmul peak %s",
        cpu["model"],
        ", ".join(f"{k} {v * 1e3:.0f} GFLOP/s" for k, v in peaks.items()),
      )
  setup = benchmark.Setup(
    config, mesh, _DTYPE.value, _TREE_DEPTH.value, _STEPS.value, _WARMUP.value, nodes, peaks, cpu
  )
  out = open(_OUTPUT.value, "a") if _OUTPUT.value else None

  def emit(line: str):
    print(line, flush=True)
    if out:
      out.write(line + "\n")
      out.flush()

  rates = {}
  for i, part in enumerate(parts):
    logging.info(
      "benchmark %d/%d: %s on %d %s device(s), %s",
      i + 1,
      len(parts),
      part,
      jax.device_count(),
      jax.devices()[0].device_kind,
      _DTYPE.value,
    )
    m = benchmark.run_part(setup, part, None if _E2E.value else _BATCH.value, _INCEPTION.value)
    if _PEAK.value:
      m.peak_tflops = _PEAK.value
    m.extra["config"] = _config_name()
    rates[part] = m.images_per_s
    emit(m.to_json())

  if _E2E.value:
    name = config.data.name
    train_size, test_size = data.source(name).sizes or (None, None)
    train_size = _TRAIN_SIZE.value or train_size
    if train_size is None:
      raise ConfigError(f"no known size for dataset {name!r}: pass --train_size")
    kwargs = dict(train_size=train_size, test_size=test_size or 10_000, fid_runs=_FID_RUNS.value)
    est = benchmark.end_to_end(config, rates, **kwargs)
    est.update(
      config=_config_name(),
      device=jax.devices()[0].device_kind,
      num_devices=jax.device_count(),
      dtype=_DTYPE.value,
    )
    if name in benchmark.REFERENCE_H200 and _is_reference_model(config):
      ref = benchmark.end_to_end(config, benchmark.REFERENCE_H200[name], **kwargs)
      est["reference_h200_hours"] = ref["hours"]
      est["reference_h200_total_hours_without_inception"] = ref["total_hours"]
    import json  # pylint: disable=g-import-not-at-top

    emit(json.dumps(est))
  if out:
    out.close()


def _is_reference_model(config) -> bool:
  """Whether the networks are those of the dataset's own config (what the reference rates time)."""
  import importlib  # pylint: disable=g-import-not-at-top

  try:
    default = importlib.import_module(f"configs.{config.data.name}").get_config()
  except ImportError:
    return False
  return (
    config.treevae.to_dict() == default.treevae.to_dict()
    and config.diffusion.unet.to_dict() == default.diffusion.unet.to_dict()
  )


def _config_name() -> str:
  for arg in sys.argv:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return ""


if __name__ == "__main__":
  common.run(main)
