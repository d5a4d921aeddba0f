"""The CNN-TreeVAE: layers, ELBO terms, routing, growing surgery and the jitted steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion.tree import Tree
from tree_diffusion.treevae import losses, networks
from tree_diffusion.treevae import train as train_lib
from tree_diffusion.treevae.model import (
  TreeVAE,
  check_variables,
  grow_variables,
  merge_split_variables,
  node_key,
  prune_variables,
  split_variables,
)

TINY = TreeVAE(latent_channels=(2,) * 4, bottom_up_channels=(4,) * 4)
X = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 28, 28, 1)), jnp.float32)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
  "h,cin,cout,k,s,p,transpose",
  [
    (28, 1, 3, 12, 1, 1, False),
    (10, 2, 3, 7, 5, 1, False),
    (2, 3, 2, 7, 5, 1, True),
    (10, 2, 3, 12, 1, 1, True),
    (4, 3, 2, 4, 2, 1, True),
    (2, 3, 4, 3, 1, 1, False),
  ],
)
def test_conv2d_rows_matches_lax(h, cin, cout, k, s, p, transpose):
  x = jax.random.normal(jax.random.key(0), (2, h, h, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  if transpose:  # PyTorch ConvTranspose2d(padding=p) on the dilated input, no kernel flip
    want = jax.lax.conv_transpose(
      x, w, (s, s), [(k - 1 - p, k - 1 - p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  else:
    want = jax.lax.conv_general_dilated(
      x, w, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  got = networks.conv2d_rows(x, w, s, p, transpose)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _lax_conv(x, w, s, p, transpose):
  if transpose:  # PyTorch ConvTranspose2d(padding=p) on the dilated input, no kernel flip
    k = w.shape[0]
    return jax.lax.conv_transpose(
      x, w, (s, s), [(k - 1 - p, k - 1 - p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  return jax.lax.conv_general_dilated(
    x, w, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


# Every convolution of the cnn1 networks of configs/mnist.py (encoder channels 1-11-21-32, decoder
# 16-11-6-1) and configs/demo.py (1-6-11-16, 8-5-3-1), and the 3x3 convolutions on their 2x2
# maps: (h, cin, cout, k, stride, transpose).
_CNN1_LAYERS = [
  (28, 1, 11, 12, 1, False),
  (19, 11, 21, 12, 1, False),
  (10, 21, 32, 7, 5, False),  # encoder
  (2, 16, 11, 7, 5, True),
  (10, 11, 6, 12, 1, True),
  (19, 6, 1, 12, 1, True),  # decoder
  (28, 1, 6, 12, 1, False),
  (19, 6, 11, 12, 1, False),
  (10, 11, 16, 7, 5, False),  # demo
  (2, 8, 5, 7, 5, True),
  (10, 5, 3, 12, 1, True),
  (19, 3, 1, 12, 1, True),
  (2, 32, 32, 3, 1, False),
  (2, 16, 1, 3, 1, False),
]  # maps


@pytest.mark.parametrize("h,cin,cout,k,s,transpose", _CNN1_LAYERS)
def test_dense_and_row_convolutions_match_lax_in_value_and_gradient(h, cin, cout, k, s, transpose):
  """conv2d_dense and conv2d_rows (the forms RowConv picks from) against lax, forward and both
  gradients, on the shapes the configs use."""
  x = jax.random.normal(jax.random.key(0), (3, h, h, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / np.sqrt(k * k * cin)
  ref = _lax_conv(x, w, s, 1, transpose)
  cot = jax.random.normal(jax.random.key(2), ref.shape)
  want_dx, want_dw = jax.vjp(lambda a, b: _lax_conv(a, b, s, 1, transpose), x, w)[1](cot)
  for conv in (networks.conv2d_dense, networks.conv2d_rows):
    got, vjp = jax.vjp(lambda a, b, conv=conv: conv(a, b, s, 1, transpose), x, w)
    got_dx, got_dw = vjp(cot)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=conv.__name__)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-4, atol=1e-4, err_msg=conv.__name__)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=2e-4, err_msg=conv.__name__)


def test_row_conv_picks_the_dense_form_for_the_decoders():
  """Dense where it does at most DENSE_FLOP_RATIO x the banded FLOPs: every decoder layer and the
  2x2 maps of the mnist model, the wide-kernel encoder layer on 28x28 images stays banded."""
  pick = lambda h, cin, cout, k, s, t: networks._dense_is_cheaper((1, h, h, cin), k, cout, s, 1, t)
  assert [pick(*layer) for layer in _CNN1_LAYERS[:6]] == [False, True, True, True, True, True]
  assert pick(2, 32, 32, 3, 1, False)
  # On the CPU (these tests' backend) RowConv runs the dense form there: a gather builds M.
  conv = networks.RowConv(6, 12, 1, 1, transpose=True)
  x = jnp.zeros((2, 10, 10, 11))
  v = conv.init(jax.random.key(0), x)
  prims = {str(e.primitive) for e in jax.make_jaxpr(lambda v: conv.apply(v, x))(v).jaxpr.eqns}
  assert "gather" in prims


def test_batchnorm_running_variance_is_the_unbiased_batch_variance():
  # One channel, n = 2 samples x 1 x 2 = 4 values: 1, 2, 3, 5. Mean 2.75; squared deviations sum
  # to 8.75, so the biased variance is 8.75/4 and the unbiased one (PyTorch's update) 8.75/3.
  x = jnp.asarray([1.0, 2.0, 3.0, 5.0]).reshape(2, 1, 2, 1)
  bn = networks.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y, new = bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(new["batch_stats"]["mean"], [0.1 * 2.75], rtol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], [0.9 + 0.1 * 8.75 / 3], rtol=1e-6)
  expect = (np.array([1.0, 2.0, 3.0, 5.0]) - 2.75) / np.sqrt(8.75 / 4 + 1e-5)
  np.testing.assert_allclose(np.ravel(y), expect, rtol=1e-5)
  # Evaluation normalises with the running statistics.
  stats = {"mean": jnp.asarray([1.0]), "var": jnp.asarray([4.0])}
  y = networks.BatchNorm(use_running_average=True).apply(
    {"params": variables["params"], "batch_stats": stats}, x
  )
  np.testing.assert_allclose(
    np.ravel(y), (np.array([1.0, 2.0, 3.0, 5.0]) - 1) / np.sqrt(4 + 1e-5), rtol=1e-5
  )
  # Every TreeVAE block uses this layer (same variable names as nn.BatchNorm).
  assert isinstance(networks._bn(True), networks.BatchNorm)


def test_cnn1_shapes_follow_the_reference():
  # Encoder 28→19→10→2 with kernels 12/12/7; decoder 2→10→19→28 (the reference's MNIST CNN).
  enc = networks.Cnn1Encoder(28, 1, 32, 2)
  v = enc.init(jax.random.key(0), X[:1], train=False)
  assert [v["params"][f"conv{i}"]["kernel"].shape[0] for i in range(3)] == [12, 12, 7]
  assert enc.apply(v, X[:1], train=False).shape == (1, 2, 2, 32)
  dec = networks.Cnn1Decoder(28, 1, 16, 2)
  z = jnp.zeros((1, 2, 2, 16))
  v = dec.init(jax.random.key(0), z, train=False)
  assert dec.apply(v, z, train=False).shape == (1, 28, 28, 1)


def test_parameter_counts_match_the_reference():
  # The reference model's counts, minus the heads no loss reads: the bottom-up Conv blocks'
  # mu/var heads (6 levels) and the contrastive heads' unused softplus output (7 levels).
  tree = Tree.complete(1)
  mnist = TreeVAE()
  assert networks.param_count(mnist.init(jax.random.key(0), tree)["params"]) == (
    396_118 - 6 * 2 * 9 * 32 * 16
  )
  cifar = TreeVAE(
    encoder="cnn2",
    image_size=32,
    channels=3,
    latent_channels=(64,) * 7,
    bottom_up_channels=(128,) * 7,
    representation_dim=4,
    res_connections=True,
    output="mse",
    contrastive=True,
  )
  assert networks.param_count(cifar.init(jax.random.key(0), tree)["params"]) == (
    5_446_286 - 6 * 2 * 9 * 128 * 64 - 7 * (128 * 10 + 10)
  )


# ----------------------------------------------------------------------------- ELBO terms


def test_merge_and_kls_against_float64_numpy():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=(2, 3, 2, 2, 4))
  v1, v2 = rng.uniform(0.05, 3.0, size=(2, 3, 2, 2, 4))
  eps = 1e-7
  var_q = 1 / (1 / (v1 + eps) + 1 / (v2 + eps))
  mu_q = (mu1 / (v1 + eps) + mu2 / (v2 + eps)) * var_q
  got_mu, got_var = losses.merge_gaussians(*map(jnp.asarray, (mu1, v1, mu2, v2)))
  np.testing.assert_allclose(got_mu, mu_q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_var, var_q, rtol=1e-5, atol=1e-6)
  s1, s2 = v1 + eps, v2 + eps
  kl = (0.5 * (np.log(s2 / s1) + (s1 + (mu1 - mu2) ** 2) / s2 - 1)).reshape(3, -1).sum(1)
  np.testing.assert_allclose(
    losses.gaussian_kl(*map(jnp.asarray, (mu1, v1, mu2, v2))), kl, rtol=1e-5
  )
  # The limits: an uninformative prior leaves the proposal; equal variances halve it.
  m, v = losses.merge_gaussians(
    jnp.float32(1.5), jnp.float32(0.3), jnp.float32(-2.0), jnp.float32(1e9)
  )
  assert abs(float(m) - 1.5) < 1e-5 and abs(float(v) - 0.3) < 1e-5
  m, v = losses.merge_gaussians(
    jnp.float32(1.0), jnp.float32(0.5), jnp.float32(3.0), jnp.float32(0.5)
  )
  assert abs(float(m) - 2.0) < 1e-5 and abs(float(v) - 0.25) < 1e-5


def test_bernoulli_kl_and_bce_against_numpy():
  rng = np.random.default_rng(2)
  q, p = rng.uniform(0.01, 0.99, size=(2, 50))
  eps = 1e-7
  want = q * np.log(eps + q / (p + eps)) + (1 - q) * np.log(eps + (1 - q) / (1 - p + eps))
  np.testing.assert_allclose(
    losses.bernoulli_kl(jnp.asarray(q), jnp.asarray(p)), want, rtol=1e-4, atol=1e-6
  )
  assert float(jnp.abs(losses.bernoulli_kl(jnp.asarray(q), jnp.asarray(q))).max()) < 1e-5
  x = rng.uniform(size=(2, 3, 3, 1))
  logits = rng.normal(scale=3, size=(2, 3, 3, 1))
  sig = 1 / (1 + np.exp(-logits))
  bce = -(x * np.maximum(np.log(sig), -100) + (1 - x) * np.maximum(np.log(1 - sig), -100))
  np.testing.assert_allclose(
    losses.reconstruction_loss(jnp.asarray(x), jnp.asarray(logits), "sigmoid"),
    bce.reshape(2, -1).sum(1),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.reconstruction_loss(jnp.asarray(x), jnp.asarray(logits), "mse"),
    ((logits - x) ** 2).reshape(2, -1).sum(1),
    rtol=1e-5,
  )


def test_contrastive_terms_against_numpy():
  rng = np.random.default_rng(3)
  n = 4  # 2N = 8 samples: positives at offset N
  e = rng.normal(size=(2 * n, 5))
  w = rng.uniform(size=2 * n)
  pi = rng.uniform(size=2 * n)

  def ntxent(v, t):
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = np.exp(v @ v.T / t)
    out = []
    for a in range(2 * n):
      pos = (a + n) % (2 * n)
      out.append(-np.log(s[a, pos] / (s[a].sum() - s[a, a])))
    return np.array(out)

  np.testing.assert_allclose(losses.nt_xent(jnp.asarray(e), 0.5), ntxent(e, 0.5).mean(), rtol=1e-5)
  u = np.stack([pi, 1 - pi], 1)
  np.testing.assert_allclose(
    losses.router_infonce(jnp.asarray(pi), jnp.asarray(w)),
    (w * ntxent(u, 1.0)).sum() / w.sum(),
    rtol=1e-5,
  )


# ----------------------------------------------------------------------------- routing


def test_leaf_probabilities_follow_bfs_order_on_a_pruned_tree():
  tree = Tree.root_only().grow(0).grow(1).grow(4).prune([3])  # leaves 2, 9, 10; 1 passthrough
  v = TINY.init(jax.random.key(0), tree)
  # Jitted: one compile each instead of hundreds of op-by-op dispatches.
  out, _ = jax.jit(lambda v: TINY.apply(v, tree, X, jax.random.key(1), train=False))(v)
  probs = np.asarray(out["leaf_probs"], np.float64)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  # Independent composition: apply each q-router on its bottom-up level and multiply by hand.
  enc = TINY.encoder_def()
  ds = [
    enc.apply(
      {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]}, X, train=False
    )
  ]
  for j in range(1, TINY.num_levels):
    m = TINY.bottom_up_def(j)
    ds.append(
      m.apply(
        {
          "params": v["params"][f"bottom_up_{j}"],
          "batch_stats": v["batch_stats"][f"bottom_up_{j}"],
        },
        ds[-1],
        train=False,
      )
    )

  def q(node, depth):
    r = networks.Router(TINY.h(depth))
    return np.asarray(
      r.apply(
        {
          "params": v["params"][node_key(node)]["q_router"],
          "batch_stats": v["batch_stats"][node_key(node)]["q_router"],
        },
        ds[TINY.max_depth - depth],
        train=False,
      ),
      np.float64,
    )

  pi0, pi4 = q(0, 0), q(4, 2)
  want = np.stack([1 - pi0, pi0 * pi4, pi0 * (1 - pi4)], 1)  # columns: leaves 2, 9, 10
  np.testing.assert_allclose(probs, want, rtol=1e-5)
  np.testing.assert_allclose(
    jax.jit(lambda v: TINY.leaf_probabilities(v, tree, X))(v), want, rtol=1e-5
  )
  gen = jax.jit(lambda v: TINY.generate(v, tree, jax.random.key(2), 3))(v)
  assert gen["images"].shape == (3, 3, 28, 28, 1)
  np.testing.assert_allclose(gen["leaf_probs"].sum(1), 1.0, rtol=1e-5)


def test_prune_variables_matches_the_tree():
  tree = Tree.root_only().grow(0).grow(1).grow(4)
  v = TINY.init(jax.random.key(0), tree)
  pruned = tree.prune([3])
  pv = prune_variables(v, pruned)
  check_variables(pruned, pv)
  assert "p_router" not in pv["params"]["node_1"] and "node_3" not in pv["params"]
  # Pruned down to one leaf, the root passes through: the variables have exactly the structure
  # of a fresh init of that tree (no empty entries), which is what checkpoints restore into.
  one = pruned.prune([2]).prune([9])  # leaf 10 alone; 0, 1 and 4 pass through
  for t in (pruned, one):
    got = jax.tree_util.tree_structure(prune_variables(v, t))
    assert got == jax.tree_util.tree_structure(TINY.init(jax.random.key(1), t)), t


# ----------------------------------------------------------------------------- steps


@pytest.fixture(scope="module")
def grown():
  tree0 = Tree.complete(1)
  v0 = TINY.init(jax.random.key(0), tree0)
  tree, v = grow_variables(TINY, v0, tree0, 1, jax.random.key(1))
  return tree0, v0, tree, v


def test_grow_keeps_old_parameters_and_a_split_step_changes_only_the_new_subtree(grown):
  tree0, v0, tree, v = grown
  check_variables(tree, v)
  flat0 = dict(jax.tree_util.tree_leaves_with_path(v0))
  flat = dict(jax.tree_util.tree_leaves_with_path(v))
  for path, a in flat0.items():
    if "decoder" in jax.tree_util.keystr(path) and "node_1" in jax.tree_util.keystr(path):
      assert path not in flat  # the split leaf lost its decoder
    else:
      np.testing.assert_array_equal(flat[path], a)
  cfg = train_lib.StepConfig()
  state = train_lib.init_state(split_variables(v, tree, 1), cfg)
  for _ in range(2):
    state, terms = train_lib.split_step(
      state, v, X, jax.random.key(2), 0.1, 1e-2, model=TINY, tree=tree, parent=1, cfg=cfg
    )
  assert np.isfinite(float(terms["loss"]))
  new = merge_split_variables(
    v, tree, 1, {"params": state.params, "batch_stats": state.batch_stats}
  )
  check_variables(tree, new)
  for path, a in jax.tree_util.tree_leaves_with_path(new):
    key = jax.tree_util.keystr(path)
    in_split = (
      "node_3" in key
      or "node_4" in key
      or ("node_1" in key and ("p_router" in key or "q_router" in key))
    )
    before = flat[path]
    if in_split:
      continue
    np.testing.assert_array_equal(a, before, err_msg=key)
  changed = [
    not np.array_equal(a, flat[p])
    for p, a in jax.tree_util.tree_leaves_with_path(new)
    if "node_3" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)
  ]
  assert changed and all(changed)


def test_full_step_traces_once_per_tree(grown):
  """One trace per tree: new α/lr values and the step's own output state reuse it (traced, not
  compiled: a retrace would come from an output state whose types differ from its input's)."""
  tree0, v0, tree, v = grown
  cfg = train_lib.StepConfig()
  step = jax.jit(
    chex.assert_max_traces(train_lib._train_step, n=2), static_argnames=("model", "tree", "cfg")
  )
  for t, var in ((tree0, v0), (tree, v)):
    state = jax.eval_shape(lambda v: train_lib.init_state(v, cfg), var)
    for i in range(3):
      traced = step.trace(state, X, jax.random.key(i), 0.1 * i, 1e-3, model=TINY, tree=t, cfg=cfg)
      new_state, terms = traced.out_info
      assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
      assert [(a.shape, a.dtype, a.weak_type) for a in jax.tree_util.tree_leaves(new_state)] == [
        (a.shape, a.dtype, getattr(a, "weak_type", False)) for a in jax.tree_util.tree_leaves(state)
      ]
      assert terms["loss"].shape == ()
      state = new_state
  chex.clear_trace_counter()


def test_loss_terms_weighting():
  out = dict(
    rec=jnp.array([2.0, 4.0]),
    kl_root=jnp.array([1.0, 1.0]),
    kl_nodes=jnp.array([-30.0, -30.0]),
    kl_decisions=jnp.array([0.5, 1.5]),
    aug=jnp.float32(0.25),
  )
  t = train_lib.loss_terms(out, 0.5, 100.0)
  # kl_nodes is clipped to ≥ −10 after the batch mean; aug is weighted.
  assert float(t["kl_nodes"]) == -10.0 and float(t["aug"]) == 25.0
  assert abs(float(t["loss"]) - (3.0 + 0.5 * (1.0 - 10.0 + 1.0) + 25.0)) < 1e-5


def test_schedules():
  assert train_lib.kl_weight(0, 0.0, 0.01) == 0.0 and train_lib.kl_weight(5, 0.0, 0.01) == 0.05
  assert train_lib.kl_weight(500, 0.5, 0.01) == 1.0
  assert train_lib.step_lr(99, 1e-3, 0.1, 100) == 1e-3
  assert abs(train_lib.step_lr(100, 1e-3, 0.1, 100) - 1e-4) < 1e-12


def _small_colour_model() -> TreeVAE:
  """A small cnn2 TreeVAE with the contrastive heads, on 16x16 colour images."""
  return TreeVAE(
    encoder="cnn2",
    image_size=16,
    channels=3,
    latent_channels=(2,) * 3,
    bottom_up_channels=(4,) * 3,
    representation_dim=4,
    res_connections=True,
    output="mse",
    contrastive=True,
  )


def test_colour_contrastive_steps_run():
  """cnn2 + mse + two augmented views + InfoNCE/NT-Xent: a full step and a split step."""
  from tree_diffusion import augment

  model = _small_colour_model()
  cfg = train_lib.StepConfig(contrastive=True, aug_weight=100.0, augment=augment.CIFAR)
  images = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 16, 16, 3)), jnp.float32)
  tree0 = Tree.complete(1)
  v0 = model.init(jax.random.key(0), tree0)
  # The full step is traced (its shapes checked), the split step, with the same terms, also run.
  _, terms = train_lib.train_step.trace(
    train_lib.init_state(v0, cfg),
    images,
    jax.random.key(1),
    0.1,
    1e-3,
    model=model,
    tree=tree0,
    cfg=cfg,
  ).out_info
  assert terms["aug"].shape == () and terms["loss"].dtype == jnp.float32
  tree, v = grow_variables(model, v0, tree0, 2, jax.random.key(2))
  state = train_lib.init_state(split_variables(v, tree, 2), cfg)
  state, terms = train_lib.split_step(
    state, v, images, jax.random.key(3), 0.1, 1e-3, model=model, tree=tree, parent=2, cfg=cfg
  )
  assert np.isfinite(float(terms["loss"])) and float(terms["aug"]) > 0


def test_bottom_up_contrastive_term_only_when_the_root_routes():
  """The reference adds the bottom-up NT-Xent term only while the root has two children (it
  computes it with the root's router): a root-only tree gets none, a split root gets it."""
  model = _small_colour_model()
  images = jnp.asarray(np.random.default_rng(5).uniform(size=(4, 16, 16, 3)), jnp.float32)
  root, split = Tree.root_only(), Tree.complete(1)
  aug = {}
  for tree in (root, split):
    v = model.init(jax.random.key(0), tree)
    out, _ = model.apply(
      v, tree, images, jax.random.key(1), train=False, decode=False, contrastive=True
    )
    aug[tree] = float(out["aug"])
  assert aug[root] == 0.0 and aug[split] > 0.0
