"""The importance-sampled test log-likelihood: per-leaf log weights against a float64 NumPy
assembly over explicit root-to-leaf paths, the Gaussian observation density against SciPy, and the
scanned estimator against a Python loop with SciPy's logsumexp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from tree_diffusion import data as data_lib
from tree_diffusion.eval.likelihood import LogLikelihood
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import losses
from tree_diffusion.treevae.model import TreeVAE

TINY = TreeVAE(latent_channels=(2,) * 4, bottom_up_channels=(4,) * 4)
# Root 0; node 1 lost its left child in pruning (passthrough) and leads to the split 4 → (9, 10).
UNBALANCED = Tree((0, 1, 2, 4, 9, 10))
EPS = 1e-7


@pytest.fixture(scope="module")
def setup():
  variables = TINY.init(jax.random.key(0), UNBALANCED)
  # Perturb the parameters so that routers and priors are far from their initial symmetry.
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  variables = dict(variables, params=jax.tree_util.tree_unflatten(treedef, leaves))
  x = jax.random.uniform(jax.random.key(2), (5, 28, 28, 1))
  return variables, x


def _path(node):
  out = [node]
  while node:
    node = (node - 1) // 2
    out.append(node)
  return out[::-1]


def _log_normal(z, mu, var):
  z, mu, var = (np.asarray(a, np.float64) for a in (z, mu, var))
  return scipy.stats.norm.logpdf(z, mu, np.sqrt(var + EPS)).reshape(z.shape[0], -1).sum(1)


def test_path_log_weights_match_a_float64_assembly(setup):
  variables, x = setup
  log_w, parts = jax.jit(lambda v, x, k: TINY.path_log_weights(v, UNBALANCED, x, k, details=True))(
    variables, x, jax.random.key(3)
  )
  parts = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), parts)
  xs = np.asarray(x, np.float64).reshape(5, -1)
  expected = np.zeros((5, UNBALANCED.num_leaves))
  for col, leaf in enumerate(UNBALANCED.leaves):
    total = np.zeros(5)
    for i, n in enumerate(_path(leaf)):
      p = parts[n]
      total += _log_normal(p["z"], p["mu_p"], p["var_p"]) - _log_normal(
        p["z"], p["mu_q"], p["var_q"]
      )
      if i:
        parent = _path(leaf)[i - 1]
        if len(UNBALANCED.children(parent)) == 2:
          pi = parts[parent]["pi_p"]
          total += np.log(pi if n == 2 * parent + 1 else 1.0 - pi)
    logits = parts[leaf]["out"].reshape(5, -1)
    total += (xs * -np.logaddexp(0, -logits) + (1 - xs) * -np.logaddexp(0, logits)).sum(1)
    expected[:, col] = total
  np.testing.assert_allclose(np.asarray(log_w, np.float64), expected, rtol=2e-5, atol=1e-3)
  # The root's prior is N(0, I) and node 1 is a passthrough (no router factor on 1 → 4).
  assert np.allclose(parts[0]["mu_p"], 0) and "pi_p" not in parts[1]


def test_gaussian_observation_density():
  rng = np.random.default_rng(0)
  x, out = rng.uniform(size=(3, 4, 4, 3)), rng.normal(size=(3, 4, 4, 3))
  got = losses.log_likelihood(jnp.asarray(x, jnp.float32), jnp.asarray(out, jnp.float32), "mse")
  want = scipy.stats.norm.logpdf(x, out, math.sqrt(0.5)).reshape(3, -1).sum(1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_estimator_equals_a_loop_over_samples(setup):
  variables, x = setup
  m = 4
  arrays = data_lib.Arrays(np.asarray(np.asarray(x) * 255, np.uint8), np.zeros(5, np.int32), 0)
  est = LogLikelihood(TINY, UNBALANCED, num_samples=m, batch_size=8)
  key = jax.random.key(7)
  out = est.run(variables, arrays, key)
  xq = jnp.asarray(arrays.images, jnp.float32) / 255.0
  xq = jnp.concatenate([xq, jnp.zeros((3,) + xq.shape[1:])])  # the padded batch of 8
  batch_key = jax.random.fold_in(key, 0)
  log_w = jax.jit(lambda v, x, k: TINY.path_log_weights(v, UNBALANCED, x, k))
  per_sample = np.stack(
    [
      scipy.special.logsumexp(
        np.asarray(log_w(variables, xq, jax.random.fold_in(batch_key, j)), np.float64), axis=1
      )[:5]
      for j in range(m)
    ]
  )  # [M, N]
  want = scipy.special.logsumexp(per_sample, axis=0) - math.log(m)
  assert out["num_images"] == 5 and out["num_samples"] == m
  np.testing.assert_allclose(out["log_likelihood"], want.mean(), rtol=1e-5)
  np.testing.assert_allclose(out["single_sample_bound"], per_sample.mean(), rtol=1e-5)
  assert out["log_likelihood"] >= out["single_sample_bound"]  # log-mean-exp ≥ mean
  assert "bits_per_dim" not in out
