"""Stage 2's model and samplers: parameter counts, the path encoder against an explicit loop, the
train step's warm-up and EMA, the scanned chain against a Python loop, trace counts."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion.diffusion import sampler as sampler_lib
from tree_diffusion.diffusion import schedule
from tree_diffusion.diffusion import train as train_lib
from tree_diffusion.diffusion.conditioning import (
  Conditioning,
  PathTables,
  SignalEncoder,
  make_condition,
  make_denoiser,
  stack_latents,
)
from tree_diffusion.diffusion.ddim import ddim_step
from tree_diffusion.diffusion.unet import timestep_embedding
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.model import TreeVAE

MNIST_UNET = dict(
  ch=64,
  ch_mults=(1, 2, 2, 2),
  num_res_blocks=2,
  attn_resolutions=(16,),
  num_heads=8,
  dropout=0.1,
  norm_groups=32,
)
CIFAR_UNET = dict(MNIST_UNET, ch=128, attn_resolutions=(16, 8))
CELEBA_UNET = dict(CIFAR_UNET, ch_mults=(1, 2, 2, 2, 4))
TINY_UNET = dict(
  ch=8,
  ch_mults=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(2,),
  num_heads=2,
  dropout=0.1,
  norm_groups=4,
)
# Root 0; node 1 lost its left child in pruning (passthrough) and leads to the split 4 → (9, 10).
UNBALANCED = Tree((0, 1, 2, 4, 9, 10))


def _count(conditioning, unet, size, channels, z_dim, depth=4):
  den = make_denoiser(conditioning, unet)
  x = jnp.zeros((1, size, size, channels))
  cond = dict(
    image=x,
    latents=jnp.zeros((1, depth, z_dim)),
    ids=jnp.zeros((1, depth)),
    mask=jnp.ones((1, depth)),
  )
  shapes = jax.eval_shape(
    lambda: den.init(
      {"params": jax.random.key(0)}, x, jnp.zeros((1,), jnp.int32), cond, train=False
    )
  )
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize(
  "conditioning,unet,size,channels,z_dim,expected",
  [
    # The reference network built from its configs (its parameter counts).
    ("image+path", MNIST_UNET, 28, 1, 64, 9_409_025),
    ("path", MNIST_UNET, 28, 1, 64, 9_408_449),
    ("image+path", CIFAR_UNET, 32, 3, 1024, 39_361_795),
    ("path", CIFAR_UNET, 32, 3, 1024, 39_358_339),
    ("image", CIFAR_UNET, 32, 3, 1024, 35_749_763),
    ("image+path", CELEBA_UNET, 64, 3, 1024, 89_150_467),
    ("path", CELEBA_UNET, 64, 3, 1024, 89_147_011),
    ("image", CELEBA_UNET, 64, 3, 1024, 83_962_499),
  ],
)
def test_parameter_counts_match_the_reference(conditioning, unet, size, channels, z_dim, expected):
  assert _count(conditioning, unet, size, channels, z_dim) == expected


@pytest.mark.parametrize(
  "name,image,signal",
  [
    ("path", None, "path"),
    ("image+path", "image", "path"),
    ("image", "image", None),
    ("leaf_id", None, "leaf_id"),
    ("leaf_latent", None, "leaf_latent"),
    ("leaf_id+latent", None, "leaf_id+latent"),
    ("form2", "form2", None),
    ("image+leaf_id+latent", "image", "leaf_id+latent"),
  ],
)
def test_conditioning_names(name, image, signal):
  c = Conditioning.parse(name)
  assert (c.image, c.signal) == (image, signal) and Conditioning.parse(c.name) == c


@pytest.mark.parametrize("name", ["paths", "", "image+form2", "path+leaf_id", "image+image"])
def test_unknown_conditioning_is_a_config_error(name):
  with pytest.raises(ConfigError, match="conditioning"):
    Conditioning.parse(name)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(method="ddpn"), "unknown sampler"),
    (dict(spacing="cosine"), "spacing"),
    (dict(variance="learned"), "variance"),
    (dict(eta=-1.0), "eta"),
  ],
)
def test_bad_sampler_settings_are_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    sampler_lib.SamplerConfig(**kwargs)


def test_timestep_embedding_is_cos_first():
  t = np.array([0, 3, 999])
  got = np.asarray(timestep_embedding(jnp.asarray(t), 8))
  f = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(
    got, np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], 1), rtol=1e-5, atol=1e-5
  )


def _bfs_ids(tree: Tree) -> dict:
  """The reference's numbering: ids in order of enqueueing, left child first."""
  ids, queue = {}, [0]
  while queue:
    n = queue.pop(0)
    ids[n] = len(ids)
    queue.extend(tree.children(n))
  return ids


def _mlp(p, u):
  h = u @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(p["Dense_0"]["bias"])
  h = h / (1 + np.exp(-h))
  return h @ np.asarray(p["Dense_1"]["kernel"], np.float64) + np.asarray(p["Dense_1"]["bias"])


@pytest.mark.parametrize("signal", ["path", "leaf_id", "leaf_latent", "leaf_id+latent"])
def test_signal_equals_an_explicit_per_sample_loop(signal):
  tree = UNBALANCED
  cond = Conditioning.parse(signal)
  rng = np.random.default_rng(0)
  b = 7
  z = {n: jnp.asarray(rng.normal(size=(b, 2, 2, 3)), jnp.float32) for n in tree.nodes}
  leaf = jnp.asarray(rng.integers(0, tree.num_leaves, size=b), jnp.int32)
  c = make_condition(cond, PathTables.from_tree(tree), stack_latents(z, tree.nodes), leaf)
  enc = SignalEncoder(16, cond.uses_latent, cond.uses_id)
  params = enc.init(jax.random.key(1), c["latents"], c["ids"], c["mask"])
  # Non-zero biases, so that a wrong number of summands shows.
  params = jax.tree_util.tree_map(
    lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), jnp.float32), params
  )
  got = np.asarray(enc.apply(params, c["latents"], c["ids"], c["mask"]))
  ids = _bfs_ids(tree)
  p = params["params"]
  for i in range(b):
    k = int(leaf[i])
    node = tree.leaves[k]
    if signal == "path":
      entries = [(n, ids[n]) for n in tree.path(node)]  # root → leaf, passthrough 1 included
    else:
      entries = [(node, k)]
    want = 0.0
    for n, index in entries:
      if cond.uses_latent:
        want = want + _mlp(p["latent"], np.asarray(z[n][i], np.float64).reshape(-1))
      if cond.uses_id:
        want = want + _mlp(p["node_id"], np.array([float(index)]))
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
  if signal == "path":  # the unbalanced tree really has paths of different lengths
    assert sorted(len(tree.path(n)) for n in tree.leaves) == [2, 4, 4]


# ------------------------------------------------------------------ tiny TreeVAE + denoiser


@pytest.fixture(scope="module")
def tiny():
  model = TreeVAE(latent_channels=(2, 2, 2, 2), bottom_up_channels=(4, 4, 4, 4))
  tvae_vars = model.init(jax.random.key(0), UNBALANCED)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
  return model, tvae_vars, x


def _random_params(den, model, key):
  """Initial params plus noise, so that the zero-initialised output convs do not hide anything."""
  cfg = train_lib.StepConfig()
  state = train_lib.init_state(
    den, cfg, key, train_lib.example_condition(den, model, UNBALANCED), model.image_shape
  )
  leaves, treedef = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree_util.tree_unflatten(
    treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )


def test_unet_zero_initialised_convs(tiny):
  model, _, _ = tiny
  den = make_denoiser("path", TINY_UNET)
  state = train_lib.init_state(
    den,
    train_lib.StepConfig(),
    jax.random.key(0),
    train_lib.example_condition(den, model, UNBALANCED),
    (28, 28, 1),
  )
  unet = state.params["UNet_0"]
  zero = lambda p: not np.any(np.asarray(p["kernel"])) and not np.any(np.asarray(p["bias"]))
  blocks = [k for k in unet if k.startswith(("ResBlock", "AttentionBlock"))]
  # ResBlocks: 1 + 1 down, 2 middle, 2 + 2 up; attention at ds 2: 1 down, 1 middle, 2 up.
  assert len(blocks) == 12
  for k in blocks:  # the last conv of every residual branch starts at zero
    assert zero(unet[k]["Conv_1"]), k
    assert np.any(np.asarray(unet[k]["Conv_0"]["kernel"])), k
  last = max((k for k in unet if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
  assert zero(unet[last])  # the output conv
  # The rest is PyTorch's uniform(±1/sqrt(fan_in)).
  k0 = np.asarray(unet["Conv_0"]["kernel"])
  bound = 1 / np.sqrt(9 * 1)
  assert np.abs(k0).max() <= bound and np.abs(k0).max() > 0.5 * bound


def test_train_step_warmup_starts_at_zero_and_ema_follows(tiny):
  model, tvae_vars, x = tiny
  den = make_denoiser("image+path", TINY_UNET)
  cfg = train_lib.StepConfig(warmup_steps=4, lr=1e-2, ema_decay=0.9)
  state = train_lib.init_state(
    den, cfg, jax.random.key(0), train_lib.example_condition(den, model, UNBALANCED), (28, 28, 1)
  )
  init = jax.device_get(state.params)
  step = lambda s, i: train_lib.train_step(
    s, tvae_vars, x, jax.random.key(i), denoiser=den, model=model, tree=UNBALANCED, cfg=cfg
  )
  state, m1 = step(state, 1)
  assert np.isfinite(float(m1["loss"]))
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, np.asarray(b)), init, state.params)
  assert all(jax.tree_util.tree_leaves(same))  # lr(0) = 0: the first update changes nothing
  ema1, p1 = jax.device_get(state.ema_params), jax.device_get(state.params)
  state, _ = step(state, 2)
  p2, ema2 = jax.device_get(state.params), jax.device_get(state.ema_params)
  moved = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2))
  ]
  assert any(moved)
  for e1, q, e2 in zip(*(jax.tree_util.tree_leaves(t) for t in (ema1, p2, ema2))):
    np.testing.assert_allclose(e2, 0.9 * np.asarray(e1, np.float64) + 0.1 * q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form2", [False, True])
def test_scanned_chain_equals_a_python_loop(tiny, form2):
  model, _, x = tiny
  den = make_denoiser("form2+path" if form2 else "path", TINY_UNET)
  params = _random_params(den, model, jax.random.key(3))
  cond = train_lib.example_condition(den, model, UNBALANCED)
  cond = jax.tree_util.tree_map(lambda a: jnp.repeat(a, 4, 0), cond)
  if form2:
    cond["image"] = x[::-1]
  cfg = sampler_lib.SamplerConfig(steps=5, spacing="uniform")
  x_T = jax.random.normal(jax.random.key(4), x.shape)
  eps_fn = jax.jit(lambda xx, t: den.apply({"params": params}, xx, t, cond, train=False))
  got = jax.jit(
    lambda x0: sampler_lib.reverse_chain(
      eps_fn, x0, cfg, None, shift=cond["image"] if form2 else None
    )
  )(x_T)
  assert got.shape == x.shape
  # The reference's form, literally: form2 subtracts the condition inside the update and once
  # at the end (as the reference does).
  r = schedule.respace(
    schedule.alpha_bars(schedule.linear_betas()), schedule.spaced_timesteps(1000, 5, "uniform")
  )
  xt = x_T + (cond["image"] if form2 else 0.0)
  c = cond["image"] if form2 else 0.0
  for k in reversed(range(len(r))):
    eps = eps_fn(xt, jnp.full((4,), r.timesteps[k], jnp.int32))
    xt = ddim_step(xt - c, eps, r.alpha_bar[k], r.alpha_bar_prev[k], 0.0) + c
  want = xt - c
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  assert np.asarray(got).std() > 0.05


class _TracedOnce(sampler_lib.Sampler):
  """Fails if the batch function is traced a second time."""

  @chex.assert_max_traces(n=1)
  def _batch(self, *args):
    return super()._batch(*args)


def test_sampler_modes_trace_once_and_pad(tiny):
  model, tvae_vars, x = tiny
  den = make_denoiser("image+path", TINY_UNET)
  params = _random_params(den, model, jax.random.key(5))
  cfg = sampler_lib.SamplerConfig(steps=3, spacing="uniform")
  s = _TracedOnce(den, model, UNBALANCED, cfg, "sample_all_leaves", batch_size=4)
  key = jax.random.key(9)
  out = s.run(params, tvae_vars, key, num=3)  # 9 (example, leaf) entries: 3 batches, last padded
  assert s.traces == 1
  k = UNBALANCED.num_leaves
  assert out["image"].shape == (3, k, 28, 28, 1) and out["leaf_probs"].shape == (3, k)
  np.testing.assert_array_equal(out["leaf"], np.tile(np.arange(k), (3, 1)))
  np.testing.assert_allclose(out["leaf_probs"].sum(1), 1.0, rtol=1e-5)
  # An example's result depends on its id only: example 2 alone equals example 2 in the run.
  alone = s.batch(params, tvae_vars, key, ids=[2, 2, 2], leaves=[0, 1, 2])
  np.testing.assert_allclose(alone["image"], out["image"][2], rtol=1e-5, atol=1e-6)
  assert s.traces == 1
  r = sampler_lib.Sampler(den, model, UNBALANCED, cfg, "recons", batch_size=4)
  rec = r.run(params, tvae_vars, key, images=np.asarray(x[:3]))
  assert rec["image"].shape == (3, 28, 28, 1) and set(rec["leaf"]) <= set(range(k))


def test_all_leaves_start_from_the_treevae_on_request():
  """diffusion.sampling.all_leaves_from_treevae (D9): the path-only model's sample_all_leaves
  starts from each leaf's noised TreeVAE decoding, as the reference does, instead of noise; an
  image-conditioned model starts there whatever the switch, and no other mode does."""
  from configs import demo

  c = demo.get_config("tiny").diffusion
  assert not sampler_lib.SamplerConfig.from_config(c).all_leaves_from_treevae
  c.sampling.all_leaves_from_treevae = True
  on, off = sampler_lib.SamplerConfig.from_config(c), sampler_lib.SamplerConfig()
  assert on.all_leaves_from_treevae
  path, image = (make_denoiser(k, TINY_UNET).conditioning for k in ("path", "image+path"))
  start = sampler_lib.starts_from_treevae
  assert start("sample_all_leaves", path, on) and not start("sample_all_leaves", path, off)
  assert start("sample_all_leaves", image, on) and start("sample_all_leaves", image, off)
  assert not any(start("sample", k, cfg) for k in (path, image) for cfg in (on, off))
