"""bfloat16 mixed precision: same losses as float32 within bf16 rounding, float32 state throughout.

The tolerances are stated from bf16's 8-bit mantissa (relative rounding 2^-9 ≈ 2e-3 per op): a
loss that averages many such roundings lands well inside 1e-2 relative of the float32 value
(measured: 5e-4 for the TreeVAE ELBO, 3e-5 for the ε loss). A network that silently stayed in
float32 would also pass that, so the traced programs are checked for bf16 convolutions.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion.diffusion import train as train2
from tree_diffusion.diffusion.conditioning import PathTables, make_condition, make_denoiser
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import train as train1
from tree_diffusion.treevae.model import TreeVAE

TREE = Tree.complete(1)
MODEL = TreeVAE(latent_channels=(2,) * 2, bottom_up_channels=(4,) * 2)
UNET = dict(
  ch=8,
  ch_mults=(1,),
  num_res_blocks=1,
  attn_resolutions=(1,),
  num_heads=2,
  dropout=0.0,
  norm_groups=4,
)
LOSS_RTOL = 1e-2


def _random_params(shapes, scale, seed):
  """Random parameters of the given shapes, drawn with NumPy (no compile); random rather than the
  real init, whose zero-initialised output layers would make ε̂ = 0 exactly."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32), shapes
  )


@jax.jit
def _images():
  return jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))


def _treevae_loss(model):
  def loss(variables, x):
    out, _ = model.apply(variables, TREE, x, jax.random.key(2), train=True)
    return train1.loss_terms(out, 1.0, 1.0)["loss"]

  return loss


def test_treevae_bf16_loss_matches_float32_and_state_stays_float32():
  bf16 = dataclasses.replace(MODEL, dtype="bfloat16")
  variables = MODEL.init(jax.random.key(0), TREE)
  x = _images()
  l32 = float(jax.jit(_treevae_loss(MODEL))(variables, x))
  l16 = float(jax.jit(_treevae_loss(bf16))(variables, x))
  assert abs(l16 - l32) <= LOSS_RTOL * abs(l32), (l16, l32)
  assert l16 != l32  # it did run in another precision
  jaxpr = lambda m: str(jax.make_jaxpr(_treevae_loss(m))(variables, x))
  assert "bf16" in jaxpr(bf16) and "bf16" not in jaxpr(MODEL)
  # The train step (shapes only, no compile): parameters, statistics, optimiser state stay f32.
  cfg = train1.StepConfig()
  state, terms = jax.eval_shape(
    lambda s: train1._train_step(
      s, x, jax.random.key(0), 1.0, 1e-3, model=bf16, tree=TREE, cfg=cfg
    ),
    train1.init_state(variables, cfg),
  )
  dtypes = {
    a.dtype
    for a in jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state, terms))
    if jnp.issubdtype(a.dtype, jnp.floating)
  }
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_denoiser_bf16_loss_matches_float32_and_state_stays_float32():
  den32, den16 = (make_denoiser("image+path", UNET, dt) for dt in ("float32", "bfloat16"))
  b = 8
  tables = PathTables.from_tree(TREE)
  keys = jax.random.split(jax.random.key(5), 4)
  cond = make_condition(
    den32.conditioning,
    tables,
    jax.random.normal(keys[0], (b, 3, 8)),
    jnp.arange(b) % 2,
    jax.random.uniform(keys[1], (2, b, 28, 28, 1)),
  )
  cfg = train2.StepConfig()
  init = lambda den: train2.init_state(
    den, cfg, jax.random.key(1), train2.example_condition(den, MODEL, TREE), MODEL.image_shape
  )
  params = _random_params(jax.eval_shape(lambda: init(den32)).params, 0.05, 3)
  t = jax.random.randint(keys[2], (b,), 0, cfg.process.T)
  eps = jax.random.normal(keys[3], (b, 28, 28, 1))
  loss = lambda den: float(
    jax.jit(
      lambda p: train2.diffusion_loss(p, den, cfg, _images(), cond, t, eps, jax.random.key(0))
    )(params)
  )
  l32, l16 = loss(den32), loss(den16)
  assert abs(l16 - l32) <= LOSS_RTOL * abs(l32), (l16, l32)
  assert l16 != l32
  out = jax.eval_shape(lambda p: den16.apply({"params": p}, eps, t, cond, train=False), params)
  assert out.dtype == jnp.float32  # ε̂ and the loss are float32
  state = jax.eval_shape(lambda: init(den16))
  assert {a.dtype for a in jax.tree_util.tree_leaves((state.params, state.ema_params))} == {
    jnp.dtype(jnp.float32)
  }


def test_unknown_dtype_is_a_config_error():
  with pytest.raises(ConfigError, match="bfloat16"):
    make_denoiser("path", UNET, "float16")
  with pytest.raises(ConfigError, match="float32"):
    dataclasses.replace(MODEL, dtype="half")
  assert "dtype" not in MODEL.to_dict()  # a compute policy, not part of an export
  np.testing.assert_equal(TreeVAE(**MODEL.to_dict()), MODEL)
