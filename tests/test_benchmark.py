"""The benchmark's arithmetic: the end-to-end estimate by hand, utilisation, known peaks, errors.

(Speed itself is measured by ``launch/benchmark.py``, never asserted here.)
"""

import os
import subprocess

import pytest

import launchers

from configs import mnist
from tree_diffusion import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage1_schedule_of_the_mnist_config_by_hand():
  # 2 leaves grow to 10: 8 splits of 150 epochs; full-tree passes before iterations 3 and 6.
  ep = benchmark.stage1_epochs(mnist.get_config().stage1)
  assert ep == {
    "initial": 150,
    "small_tree": 1200,
    "intermediate": 160,
    "finetune": 200,
    "splits": 8,
  }


def test_end_to_end_with_the_reference_rates_gives_the_issue_hours():
  """The reference's ~18 h on one H200: stage 1 ≈ 10 h, stage 2 ≈ 5 h, sampling ≈ 3.3 h."""
  est = benchmark.end_to_end(
    mnist.get_config(), benchmark.REFERENCE_H200["mnist"], train_size=60_000, test_size=10_000
  )
  h = est["hours"]
  assert h["treevae"] == pytest.approx(1710 * 60_000 / 2932 / 3600, abs=1e-3)  # 9.72 h
  assert h["diffusion"] == pytest.approx(1000 * 234 * 256 / 3276 / 3600, abs=1e-3)  # 5.08 h
  assert h["sampler"] == pytest.approx(10 * 10_000 * 10 / 85 / 3600, abs=1e-3)  # 3.27 h
  assert h["inception"] is None and not est["complete"]
  assert est["total_hours"] == pytest.approx(18.07, abs=0.01)
  rates = dict(benchmark.REFERENCE_H200["mnist"], inception=1000.0)
  est = benchmark.end_to_end(mnist.get_config(), rates, train_size=60_000, test_size=10_000)
  assert est["complete"] and est["hours"]["inception"] == pytest.approx(
    110_000 / 1000 / 3600, abs=1e-3
  )


def test_measurement_rates_and_utilisation():
  m = benchmark.Measurement(
    part="x",
    batch=256,
    steps=10,
    seconds_per_step=0.128,
    compile_s=1.0,
    flops_per_image=2e9,
    flops_source="analytic",
    device="NVIDIA H200",
    num_devices=2,
    dtype="bfloat16",
    peak_tflops=1000.0,
  )
  assert m.images_per_s == pytest.approx(2000.0)
  assert m.tflops == pytest.approx(4.0)  # 2 GFLOP x 2,000 images/s
  assert m.utilisation == pytest.approx(4.0 / 2000.0)
  assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.5
  assert benchmark.peak_tflops("cpu", "float32") is None


def test_launcher_rejects_an_unknown_part_in_one_line():
  r = subprocess.run(
    [*launchers.command("benchmark.py"), "--config=configs/mnist.py:tiny", "--parts=treevae,unet"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
    "error: unknown part(s) unet; use --parts with some of treevae,diffusion,sampler,inception"
  )


def test_cpu_utilisation_is_against_the_measured_peak_of_the_whole_process():
  """CPU devices (``--xla_force_host_platform_device_count``) share the cores that the one
  measured matmul used: the peak is not multiplied by the device count."""
  m = benchmark.Measurement(
    part="x",
    batch=32,
    steps=3,
    seconds_per_step=2.0,
    compile_s=1.0,
    flops_per_image=8e9,
    flops_source="xla",
    device="cpu",
    num_devices=2,
    dtype="float32",
    peak_tflops=0.2,
  )
  assert m.tflops == pytest.approx(0.128)  # 8 GFLOP x 16 images/s
  assert m.utilisation == pytest.approx(0.64)


def test_measured_peaks_fill_in_where_no_spec_sheet_is_known():
  import jax
  from tree_diffusion import sharding

  mesh = sharding.make_mesh()
  assert benchmark.measure_matmul_tflops(mesh, "float32", n=64, repeats=2) > 0
  for dtype, peaks, want in [
    ("float32", {"float32": 0.2}, 0.2),
    ("bfloat16", {"float32": 0.2}, 0.2),  # no bf16 units
    ("bfloat16", {"float32": 0.2, "bfloat16": 0.8}, 0.8),
  ]:
    setup = benchmark.Setup(None, mesh, dtype, measured_peaks=peaks, cpu=benchmark.cpu_info())
    m = setup.measurement("x", 32, 2.0, 1.0, 32 * 8e9, "xla")
    assert m.peak_tflops == want
    assert m.utilisation == pytest.approx(0.128 / want)
    assert m.extra["utilisation_vs_fp32_peak"] == pytest.approx(0.64)
    assert m.extra["peak_source"] == "measured matmul"
    assert set(m.extra["cpu"]["flags"]) <= set(benchmark.CPU_FLAGS)
  assert jax.devices()[0].platform == "cpu"


def test_native_bf16_from_the_cpu_flags():
  assert benchmark.native_bf16({"model": "x", "flags": ["avx2", "avx512_bf16"]})
  assert benchmark.native_bf16({"model": "x", "flags": ["amx_bf16"]})
  assert not benchmark.native_bf16({"model": "x", "flags": ["avx2", "avx512f"]})
