"""The public API checks what it is given (tree_diffusion/inputs.py and the entry points): a table
of bad calls, each of which must raise ``TypeError`` or ``ValueError`` with a message naming the
form expected, before anything is compiled or allocated."""

import json
import os

import jax
import numpy as np
import pytest

from tree_diffusion import clustering
from tree_diffusion import data, files, inputs, lock, runs
from tree_diffusion.checkpoint import CheckpointError
from tree_diffusion.diffusion import generate, schedule
from tree_diffusion.diffusion import sampler as sampler_lib
from tree_diffusion.diffusion.conditioning import make_denoiser
from tree_diffusion.eval import fid, likelihood
from tree_diffusion.tree import Tree
from tree_diffusion.treevae.export import load_treevae
from tree_diffusion.treevae.model import TreeVAE

TREE = Tree((0, 1, 2))
MODEL = TreeVAE(latent_channels=(2, 2, 2, 2), bottom_up_channels=(4, 4, 4, 4))
VARS = MODEL.init(jax.random.key(0), TREE)
KEY = jax.random.key(1)
X = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
U8 = np.rint(X * 255).astype(np.uint8)
ARRAYS = data.Arrays(images=U8, labels=np.array([0, 1, 0, 1], np.int32), num_classes=2)
_UNET = dict(
  ch=8,
  ch_mults=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(2,),
  num_heads=2,
  dropout=0.0,
  norm_groups=4,
)
_DEN = make_denoiser("path", _UNET)
_CFG = sampler_lib.SamplerConfig(steps=2, spacing="uniform")
SAMPLE = sampler_lib.Sampler(_DEN, MODEL, TREE, _CFG, "sample", batch_size=4)
RECONS = sampler_lib.Sampler(_DEN, MODEL, TREE, _CFG, "recons", batch_size=4)
LL = likelihood.LogLikelihood(MODEL, TREE, num_samples=2, batch_size=4)

lp = lambda x, tree=TREE, variables=VARS: MODEL.leaf_probabilities(variables, tree, x)

# (id, call, exception type, words the message must contain: the form expected).
BAD_CALLS = [
  # Images: dtype and value range (uint8 refused, not guessed).
  (
    "uint8 images",
    lambda: lp(U8),
    TypeError,
    ["floats [B, 28, 28, 1] in [0, 1]", "uint8", "to_unit_range"],
  ),
  ("0..255 floats", lambda: lp(X * 255), ValueError, ["in [0, 1]", "divide by 255"]),
  ("[-1, 1] floats", lambda: lp(2 * X - 1), ValueError, ["in [0, 1]", "(x + 1) / 2"]),
  ("NaN images", lambda: lp(X * np.nan), ValueError, ["NaN", "in [0, 1]"]),
  ("int64 images", lambda: lp(U8.astype(np.int64)), TypeError, ["floats [B, 28, 28, 1]"]),
  ("a list", lambda: lp(X.tolist()), TypeError, ["array of floats [B, 28, 28, 1]"]),
  # Images: rank, layout, size, channels, count.
  (
    "32x32 images",
    lambda: lp(np.zeros((2, 32, 32, 1), np.float32)),
    ValueError,
    ["[B, 28, 28, 1]", "32x32", "28x28"],
  ),
  (
    "14x14 images",
    lambda: lp(np.zeros((2, 14, 14, 1), np.float32)),
    ValueError,
    ["[B, 28, 28, 1]", "14x14"],
  ),
  (
    "NCHW",
    lambda: lp(np.zeros((2, 1, 28, 28), np.float32)),
    ValueError,
    ["[B, 28, 28, 1]", "NCHW", "transpose(0, 2, 3, 1)"],
  ),
  (
    "RGB into a grey model",
    lambda: lp(np.zeros((2, 28, 28, 3), np.float32)),
    ValueError,
    ["[B, 28, 28, 1]", "3 channels"],
  ),
  ("no batch axis", lambda: lp(X[0]), ValueError, ["[B, 28, 28, 1]", "images[None]"]),
  ("no channel axis", lambda: lp(X[..., 0]), ValueError, ["[B, 28, 28, 1]", "[..., None]"]),
  ("empty batch", lambda: lp(X[:0]), ValueError, ["empty batch", "at least one image"]),
  (
    "apply, uint8",
    lambda: MODEL.apply(VARS, TREE, U8, KEY, train=False),
    TypeError,
    ["floats [B, 28, 28, 1]"],
  ),
  (
    "path_log_weights, 32x32",
    lambda: MODEL.path_log_weights(VARS, TREE, np.zeros((1, 32, 32, 1), np.float32), KEY),
    ValueError,
    ["[B, 28, 28, 1]"],
  ),
  # Keys, trees, variables.
  (
    "an int seed as key",
    lambda: MODEL.apply(VARS, TREE, X, 0, train=False),
    TypeError,
    ["jax.random.key(0)"],
  ),
  (
    "a batch of keys",
    lambda: MODEL.apply(VARS, TREE, X, jax.random.split(KEY, 2), train=False),
    TypeError,
    ["one JAX PRNG key"],
  ),
  ("init with an int seed", lambda: MODEL.init(3, TREE), TypeError, ["jax.random.key(0)"]),
  (
    "tree as JSON text",
    lambda: lp(X, tree=TREE.to_json()),
    TypeError,
    ["tree_diffusion.tree.Tree"],
  ),
  (
    "another tree's variables",
    lambda: lp(X, tree=Tree((0, 1, 2, 3, 4))),
    ValueError,
    ["nodes [3, 4]", "tree that came with these variables"],
  ),
  ("variables not a dict", lambda: lp(X, variables=[1]), TypeError, ["{'params', 'batch_stats'}"]),
  # Counts and sizes.
  (
    "generate num=0",
    lambda: MODEL.generate(VARS, TREE, KEY, num=0),
    ValueError,
    ["num must be an integer >= 1"],
  ),
  (
    "generate num=-3",
    lambda: MODEL.generate(VARS, TREE, KEY, num=-3),
    ValueError,
    ["num must be an integer >= 1"],
  ),
  (
    "generate num=2.5",
    lambda: MODEL.generate(VARS, TREE, KEY, num=2.5),
    TypeError,
    ["num must be an integer >= 1"],
  ),
  (
    "generate num=10**12",
    lambda: MODEL.generate(VARS, TREE, KEY, num=10**12),
    ValueError,
    ["would take", "smaller batches"],
  ),
  (
    "Sampler.run num=0",
    lambda: SAMPLE.run(None, VARS, KEY, num=0),
    ValueError,
    ["num must be an integer >= 1"],
  ),
  ("Sampler.run num=None", lambda: SAMPLE.run(None, VARS, KEY), ValueError, ["pass num"]),
  (
    "Sampler.run num=10**12",
    lambda: SAMPLE.run(None, VARS, KEY, num=10**12),
    ValueError,
    ["would take", "smaller parts"],
  ),
  (
    "Sampler.run images in a prior mode",
    lambda: SAMPLE.run(None, VARS, KEY, images=X),
    ValueError,
    ["pass num", "not images"],
  ),
  (
    "recons uint8",
    lambda: RECONS.run(None, VARS, KEY, images=U8),
    TypeError,
    ["floats [N, 28, 28, 1] in [0, 1]"],
  ),
  (
    "recons 0..255",
    lambda: RECONS.run(None, VARS, KEY, images=X * 255),
    ValueError,
    ["in [0, 1]", "divide by 255"],
  ),
  (
    "recons empty",
    lambda: RECONS.run(None, VARS, KEY, images=X[:0]),
    ValueError,
    ["at least one image"],
  ),
  ("recons num", lambda: RECONS.run(None, VARS, KEY, num=3), ValueError, ["pass images"]),
  (
    "Sampler.batch no ids",
    lambda: SAMPLE.batch(None, VARS, KEY, ids=[]),
    ValueError,
    ["len(ids) must be an integer >= 1"],
  ),
  (
    "Sampler.batch too many",
    lambda: SAMPLE.batch(None, VARS, KEY, ids=list(range(5))),
    ValueError,
    ["at most 4 ids"],
  ),
  (
    "LogLikelihood num_samples=0",
    lambda: likelihood.LogLikelihood(MODEL, TREE, 0, 4),
    ValueError,
    ["num_samples must be an integer >= 1"],
  ),
  (
    "LogLikelihood batch_size=0",
    lambda: likelihood.LogLikelihood(MODEL, TREE, 2, 0),
    ValueError,
    ["batch_size must be an integer >= 1"],
  ),
  (
    "LogLikelihood on floats",
    lambda: LL.run(VARS, X, KEY),
    TypeError,
    ["tree_diffusion.data.Arrays"],
  ),
  ("LogLikelihood int key", lambda: LL.run(VARS, ARRAYS, 0), TypeError, ["jax.random.key(0)"]),
  ("spaced_timesteps n=0", lambda: schedule.spaced_timesteps(1000, 0), ValueError, ["1 <= n <= T"]),
  (
    "spaced_timesteps n=2.5",
    lambda: schedule.spaced_timesteps(1000, 2.5),
    TypeError,
    ["integers 1 <= n <= T"],
  ),
  (
    "spaced_timesteps no stride",
    lambda: schedule.spaced_timesteps(1000, 999, "uniform"),
    ValueError,
    ["choose n among", "'quad'"],
  ),
  (
    "image_grid columns=0",
    lambda: generate.image_grid(X, columns=0),
    ValueError,
    ["columns must be an integer >= 1"],
  ),
  (
    "image_grid one image",
    lambda: generate.image_grid(X[0], columns=2),
    ValueError,
    ["[N >= 1, H, W, 1 or 3]"],
  ),
  (
    "save_png floats",
    lambda: files.save_png("unused.png", X[0, ..., 0]),
    ValueError,
    ["uint8 [H, W]", "np.rint(x * 255)"],
  ),
  # Trees.
  ("Tree.from_json('{}')", lambda: Tree.from_json("{}"), TypeError, ['{"nodes": [0, 1, 2']),
  ("Tree.from_json('null')", lambda: Tree.from_json("null"), TypeError, ['{"nodes": [0, 1, 2']),
  ("Tree.from_json('[]')", lambda: Tree.from_json("[]"), TypeError, ['{"nodes": [0, 1, 2']),
  (
    "Tree.from_json(not JSON)",
    lambda: Tree.from_json("nodes: 0"),
    ValueError,
    ['{"nodes": [0, 1, 2', "not JSON"],
  ),
  (
    "Tree.from_json nodes=3",
    lambda: Tree.from_json('{"nodes": 3}'),
    TypeError,
    ['{"nodes": [0, 1, 2'],
  ),
  (
    "a negative node id",
    lambda: Tree.from_json('{"nodes": [0, -1]}'),
    ValueError,
    [">= 0", "got -1"],
  ),
  ("a string node id", lambda: Tree((0, "1")), TypeError, ["integer heap ids"]),
  ("a node without parent", lambda: Tree((0, 5)), ValueError, ["no parent 2"]),
  ("an absurd node id", lambda: Tree((0, 2**40)), ValueError, ["deeper than 16 levels"]),
  ("Tree.complete(40)", lambda: Tree.complete(40), ValueError, ["0..16"]),
  ("Tree.complete(-1)", lambda: Tree.complete(-1), ValueError, ["0..16"]),
  ("a node not in the tree", lambda: TREE.path(9), ValueError, ["node 9 is not in the tree"]),
  (
    "model too shallow for the tree",
    lambda: MODEL.init(KEY, Tree.complete(4)),
    ValueError,
    ["exceeds the model's max depth 3"],
  ),
  # Model hyper-parameters.
  (
    "TreeVAE image_size=0",
    lambda: TreeVAE(image_size=0),
    ValueError,
    ["image_size must be an integer >= 1"],
  ),
  (
    "TreeVAE channels=0",
    lambda: TreeVAE(channels=0),
    ValueError,
    ["channels must be an integer >= 1"],
  ),
  (
    "TreeVAE no levels",
    lambda: TreeVAE(latent_channels=(), bottom_up_channels=()),
    ValueError,
    ["same length", "at least one"],
  ),
  (
    "make_denoiser, a mistyped U-Net key",
    lambda: make_denoiser("path", dict(chs=8)),
    TypeError,
    ["unknown U-Net setting(s) ['chs']", "ch, ch_mults"],
  ),
  (
    "make_denoiser, ch=0",
    lambda: make_denoiser("path", dict(ch=0)),
    ValueError,
    ["unet ch must be an integer >= 1"],
  ),
  # Metrics, paths and loaders.
  ("nmi lengths", lambda: clustering.nmi([0, 1], [0]), ValueError, ["differ in length"]),
  (
    "dendrogram purity leaf 5 of 2",
    lambda: clustering.dendrogram_purity(TREE, [0, 1], [0, 5]),
    ValueError,
    ["0 … 1"],
  ),
  (
    "fid of one image",
    lambda: fid.fid_from_features(np.zeros((1, 4)), np.zeros((3, 4))),
    ValueError,
    ["[N >= 2, D]"],
  ),
  ("RunDir(None)", lambda: runs.RunDir(None), TypeError, ["local path or a gs:// URL"]),
  (
    "WorkdirLock(None)",
    lambda: lock.WorkdirLock(None, "x"),
    TypeError,
    ["local path or a gs:// URL"],
  ),
  (
    "load_stage2(None)",
    lambda: generate.load_stage2(None, "runs/x"),
    TypeError,
    ["ConfigDict with data and diffusion"],
  ),
  ("identity of images", lambda: data.identity(U8, U8), TypeError, ["data.Arrays"]),
  (
    "identity_change of None",
    lambda: data.identity_change(None, {"hash": "x"}),
    TypeError,
    ["the dict data.identity returns"],
  ),
  (
    "batches of images",
    lambda: next(data.batches(U8, 2, shuffle=False, drop_remainder=False)),
    TypeError,
    ["data.Arrays"],
  ),
  (
    "batches batch_size=0",
    lambda: next(data.batches(ARRAYS, 0, shuffle=False, drop_remainder=False)),
    ValueError,
    ["batch_size must be an integer >= 1"],
  ),
  (
    "0..255 closed over by jit",
    lambda: jax.jit(lambda v: lp(X * 255, variables=v))(VARS),
    ValueError,
    ["in [0, 1]", "divide by 255"],
  ),
  (
    "to_unit_range of int8",
    lambda: inputs.to_unit_range(np.zeros(2, np.int8)),
    TypeError,
    ["unsigned-integer or float"],
  ),
]


@pytest.mark.parametrize(
  "call,error,words", [r[1:] for r in BAD_CALLS], ids=[r[0] for r in BAD_CALLS]
)
def test_a_bad_call_names_the_form_expected(call, error, words):
  with pytest.raises(error) as e:
    call()
  message = str(e.value)
  assert "\n" not in message
  for w in words:
    assert w in message, f"{w!r} not in {message!r}"


def test_good_calls_pass_the_checks():
  # Floats in [0, 1] as data.batches makes them (uint8 / 255), eagerly and under jit.
  x = inputs.to_unit_range(U8)
  np.testing.assert_array_equal(x, (U8 / 255.0).astype(np.float32))  # uint8 / 255, rounded once
  batch = next(data.batches(ARRAYS, 4, shuffle=False, drop_remainder=False))
  np.testing.assert_array_equal(x, batch["image"])
  p = np.asarray(lp(x))
  assert p.shape == (4, 2)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
  jitted = jax.jit(lambda v, x: MODEL.leaf_probabilities(v, TREE, x))
  np.testing.assert_allclose(np.asarray(jitted(VARS, x)), p, rtol=1e-6)
  closed = jax.jit(lambda v: MODEL.leaf_probabilities(v, TREE, x))  # x a constant in the trace
  np.testing.assert_allclose(np.asarray(closed(VARS)), p, rtol=1e-6)
  # Values a hair outside [0, 1] (float rounding), a legacy key and NumPy counts are accepted.
  MODEL.check_call(VARS, TREE, x * (1 + 1e-6), jax.random.PRNGKey(0), num=np.int64(2))


def test_load_treevae_on_a_stage2_directory_names_the_export(tmp_path):
  run = tmp_path / "run"
  (run / "diffusion" / "checkpoints").mkdir(parents=True)
  (run / "export").mkdir()
  (run / "export" / "meta.json").write_text("{}")
  (run / "diffusion" / "config.json").write_text(json.dumps({"diffusion": {"treevae_export": ""}}))
  with pytest.raises(CheckpointError) as e:
    load_treevae(str(run / "diffusion"))
  assert f"the stage-1 export it used is {run / 'export'}" in str(e.value)
  assert "diffusion/export" not in str(e.value)
  other = tmp_path / "elsewhere" / "export"
  other.mkdir(parents=True)
  (run / "diffusion" / "config.json").write_text(
    json.dumps({"diffusion": {"treevae_export": str(other)}})
  )
  with pytest.raises(CheckpointError, match=f"the stage-1 export it used is {other}"):
    load_treevae(str(run / "diffusion"))
  with pytest.raises(CheckpointError, match=f"pass {os.path.join(run, 'export')}"):
    load_treevae(str(run))
