"""The noise schedule, its respacing and the single sampler updates against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion.diffusion import process, schedule
from tree_diffusion.diffusion.ddim import ddim_step, normal_like
from tree_diffusion.diffusion.ddpm import ddpm_step

# What the reference's quad spacing visits for T = 1000, n = 100.
QUAD_100 = [
  0,
  1,
  2,
  3,
  5,
  6,
  8,
  9,
  11,
  13,
  15,
  18,
  20,
  23,
  26,
  29,
  32,
  35,
  39,
  43,
  47,
  51,
  55,
  59,
  63,
  68,
  73,
  78,
  83,
  88,
  94,
  99,
  105,
  111,
  117,
  124,
  130,
  137,
  143,
  150,
  158,
  165,
  172,
  180,
  188,
  195,
  204,
  212,
  220,
  229,
  238,
  246,
  255,
  265,
  274,
  284,
  293,
  303,
  313,
  323,
  334,
  344,
  355,
  366,
  377,
  388,
  399,
  411,
  423,
  434,
  446,
  459,
  471,
  483,
  496,
  509,
  522,
  535,
  548,
  562,
  575,
  589,
  603,
  617,
  632,
  646,
  661,
  675,
  690,
  705,
  721,
  736,
  752,
  768,
  783,
  800,
]


def test_quad_spacing_is_the_reference_list():
  assert len(QUAD_100) == 96
  np.testing.assert_array_equal(schedule.spaced_timesteps(1000, 100, "quad"), QUAD_100)


@pytest.mark.parametrize("n", [1, 7, 100, 334, 1000])
def test_uniform_spacing_smallest_stride(n):
  got = schedule.spaced_timesteps(1000, n, "uniform")
  stride = next(s for s in range(1, 1001) if len(list(range(0, 1000, s))) == n)
  assert list(got) == list(range(0, 1000, stride)) and len(got) == n


def test_uniform_spacing_rejects_impossible_n_and_unknown_kind():
  with pytest.raises(ValueError, match="stride"):
    schedule.spaced_timesteps(1000, 999, "uniform")
  with pytest.raises(ValueError, match="spacing"):
    schedule.spaced_timesteps(1000, 10, "cosine")


def test_alpha_bar_reference_values():
  ab = schedule.alpha_bars(schedule.linear_betas(1000, 1e-4, 0.02))
  np.testing.assert_allclose(
    ab[[0, 499, 799, 800, 999]], [0.9999, 0.07859, 1.532e-3, 1.508e-3, 4.036e-5], rtol=2e-3
  )
  assert ab.dtype == np.float64


def test_respaced_constants_match_a_loop():
  betas = schedule.linear_betas(1000, 1e-4, 0.02)
  tau = schedule.spaced_timesteps(1000, 100, "quad")
  r = schedule.respace(schedule.alpha_bars(betas), tau)
  # Independent: products of (1 - β) over the original steps, then the respacing formulas one by
  # one.
  prev = 1.0
  for k, t in enumerate(tau):
    a = 1.0
    for s in range(t + 1):
      a *= 1.0 - betas[s]
    b = 1.0 - a / prev
    assert r.alpha_bar[k] == pytest.approx(a, rel=1e-12)
    assert r.alpha_bar_prev[k] == pytest.approx(prev, rel=1e-12)
    assert r.betas[k] == pytest.approx(b, rel=1e-9)
    assert r.posterior_variance[k] == pytest.approx(b * (1 - prev) / (1 - a), rel=1e-9, abs=1e-300)
    assert r.posterior_coef_x0[k] == pytest.approx(b * prev**0.5 / (1 - a), rel=1e-9)
    assert r.posterior_coef_xt[k] == pytest.approx((1 - b) ** 0.5 * (1 - prev) / (1 - a), rel=1e-9)
    prev = a
  large, small = r.ddpm_variance("fixedlarge"), r.ddpm_variance("fixedsmall")
  assert large[0] == r.posterior_variance[1] and np.all(large[1:] == r.betas[1:])
  assert small[0] == r.posterior_variance[1] and np.all(small[1:] == r.posterior_variance[1:])


def _ddim_numpy(x, eps, a, a_prev, eta, noise):
  """DDIM eq. 12 with the reference's clip of x̃0 to [-1, 1], float64."""
  x, eps = x.astype(np.float64), eps.astype(np.float64)
  x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize("a,a_prev", [(0.07859, 0.1), (1.508e-3, 0.5), (0.9999, 1.0)])
def test_ddim_step_eta0_matches_numpy(a, a_prev):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 5, 3)).astype(np.float32) * 2
  eps = rng.normal(size=x.shape).astype(np.float32)
  got = ddim_step(jnp.asarray(x), jnp.asarray(eps), a, a_prev, 0.0)
  want = _ddim_numpy(x, eps, a, a_prev, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  if a_prev == 1.0:  # the last step returns the clipped x̃0
    assert np.abs(np.asarray(got)).max() <= 1.0


def test_ddim_step_eta_positive_is_reproducible_from_the_key():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  keys = jax.random.split(jax.random.key(5), 3)  # one key per example
  a, a_prev, eta = 0.3, 0.6, 0.7
  one = ddim_step(x, eps, a, a_prev, eta, keys)
  np.testing.assert_array_equal(
    np.asarray(one), np.asarray(ddim_step(x, eps, a, a_prev, eta, keys))
  )
  other = ddim_step(x, eps, a, a_prev, eta, jax.random.split(jax.random.key(6), 3))
  assert not np.allclose(np.asarray(one), np.asarray(other))
  noise = np.asarray(normal_like(keys, x), np.float64)
  np.testing.assert_allclose(
    np.asarray(one),
    _ddim_numpy(np.asarray(x), np.asarray(eps), a, a_prev, eta, noise),
    rtol=2e-5,
    atol=2e-5,
  )
  # An example's noise depends on its own key only (not on the batch around it).
  np.testing.assert_array_equal(np.asarray(normal_like(keys[1:2], x[1:2]))[0], noise[1])
  with pytest.raises(ValueError, match="key"):
    ddim_step(x, eps, a, a_prev, eta)


def test_ddpm_step_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  r = schedule.respace(schedule.alpha_bars(schedule.linear_betas()), np.array([0, 10, 500]))
  var = r.ddpm_variance("fixedlarge")
  key = jax.random.key(3)
  noise = np.asarray(normal_like(key, jnp.asarray(x)), np.float64)
  for k in (2, 0):
    got = ddpm_step(
      jnp.asarray(x),
      jnp.asarray(eps),
      r.alpha_bar[k],
      r.posterior_coef_x0[k],
      r.posterior_coef_xt[k],
      var[k],
      key,
      last=k == 0,
    )
    a, b, a_prev = r.alpha_bar[k], r.betas[k], r.alpha_bar_prev[k]
    x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
    mean = (b * np.sqrt(a_prev) / (1 - a)) * x0 + (np.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x
    want = mean + (0.0 if k == 0 else np.sqrt(var[k]) * noise)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------- process: schedule, target, range


def test_cosine_schedule_is_the_closed_form():
  ab = process.cosine_alpha_bars(1000)
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(1, 1001, dtype=np.float64)
  # β is capped at 0.999 only at the very end; before that ᾱ_t = f(t) / f(0) exactly.
  np.testing.assert_allclose(ab[:990], f(t[:990]) / f(0.0), rtol=1e-12)
  assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < 1e-6
  assert process.Process(schedule="cosine").alpha_bar()[500] == pytest.approx(f(501.0) / f(0.0))


@pytest.mark.parametrize("prediction", process.PREDICTIONS)
def test_targets_invert_to_x0_and_eps(prediction):
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 4))
  eps = rng.normal(size=(3, 4))
  a = np.array([[0.9999], [0.3], [0.002]])
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  # The targets written out by hand (v: Salimans & Ho 2022).
  want = {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
  p = process.Process(prediction=prediction)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  np.testing.assert_allclose(
    np.asarray(p.target(f32(x0), f32(eps), f32(a))), want, rtol=1e-5, atol=1e-6
  )
  got_x0, got_eps = p.x0_and_eps(f32(want), f32(x_t), f32(a), clip=False)
  np.testing.assert_allclose(np.asarray(got_x0), x0, atol=2e-4)
  np.testing.assert_allclose(np.asarray(got_eps), eps, atol=2e-3 if prediction == "x0" else 2e-4)


@pytest.mark.parametrize(
  "prediction,centered,kind",
  [("eps", False, "linear"), ("x0", True, "linear"), ("v", True, "cosine"), ("v", False, "linear")],
)
def test_chain_with_an_oracle_denoiser_returns_the_data_point(prediction, centered, kind):
  """For data that is one image, the ideal network output is known in closed form at every
  (x_t, t); DDIM driven by it must end at that image, in [0, 1], whatever the process."""
  from tree_diffusion.diffusion import sampler as sampler_lib

  p = process.Process(schedule=kind, prediction=prediction, center_data=centered)
  image = np.random.default_rng(1).uniform(0, 1, (2, 5, 5, 1))
  x_star = 2 * image - 1 if centered else image  # the point in the chain's space
  ab = p.alpha_bar()

  def oracle(x_t, t):
    a = jnp.asarray(ab, jnp.float32)[t][:, None, None, None]
    eps = (x_t - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
    return p.target(jnp.asarray(x_star, jnp.float32), eps, a)

  cfg = sampler_lib.SamplerConfig(process=p, steps=20, spacing="quad")
  x_T = jax.random.normal(jax.random.key(0), image.shape)
  out = jax.jit(lambda x: p.decode(sampler_lib.reverse_chain(oracle, x, cfg, None)))(x_T)
  np.testing.assert_allclose(np.asarray(out), image, atol=1e-3)


def test_unknown_schedule_and_prediction_name_the_setting():
  from tree_diffusion.errors import ConfigError

  with pytest.raises(ConfigError, match="diffusion.schedule"):
    process.Process(schedule="sigmoid")
  with pytest.raises(ConfigError, match="diffusion.prediction"):
    process.Process(prediction="score")
