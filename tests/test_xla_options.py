"""Per-platform XLA options of the convolutional networks' programs (tree_diffusion.xla_options)."""

import jax
import jax.numpy as jnp
import numpy as np

from tree_diffusion import xla_options


def _gn_silu(x, scale):
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return jax.nn.silu((x - mean) / jnp.sqrt(var + 1e-5) * (1 + scale))


def test_options_only_for_cpu_programs():
  assert xla_options.conv_net("cpu") == xla_options.CONV_NET_CPU
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert xla_options.conv_net(platform) is None


def test_cpu_option_is_honoured_and_changes_nothing_but_rounding():
  """The CPU program hands its elementwise work to YNNPACK (a ``__ynn_fusion``), and its values
  equal a float64 NumPy computation to float32 rounding, as the default program's do."""
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 16)).astype(np.float32)
  scale = np.float32(0.5)
  fast = xla_options.ConvNetJit(_gn_silu)
  plain = jax.jit(_gn_silu)
  assert "__ynn_fusion" in fast.lower(x, scale).compile().as_text()
  x64 = x.astype(np.float64)
  h = (x64 - x64.mean((1, 2), keepdims=True)) / np.sqrt(x64.var((1, 2), keepdims=True) + 1e-5)
  h = h * 1.5
  want = h / (1 + np.exp(-h))
  for fn in (fast, plain):
    np.testing.assert_allclose(np.asarray(fn(x, scale)), want, rtol=2e-5, atol=2e-5)
