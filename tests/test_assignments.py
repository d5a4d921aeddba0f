"""assignments.csv (tree_diffusion/treevae/assignments.py) on a hand-worked case."""

import csv
import io

import numpy as np
import pytest

from tree_diffusion.data import Arrays
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import assignments

# Leaves 1, 5, 6 (node 2 split into 5 and 6).
TREE = Tree((0, 1, 2, 5, 6))


def _arrays(n, labels=None, files=()):
  return Arrays(
    np.zeros((n, 2, 2, 1), np.uint8),
    np.asarray(labels if labels is not None else [-1] * n, np.int32),
    0 if labels is None else 3,
    (),
    tuple(files),
  )


def test_rows_name_the_file_leaf_path_and_runner_up():
  probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
  test = _arrays(3, labels=[2, 0, 1], files=("a b.png", 'c,"d".png', "ü/é.png"))
  text = assignments.to_csv(TREE, {"test": (test, probs)})
  rows = list(csv.DictReader(io.StringIO(text)))
  assert list(rows[0]) == list(assignments.COLUMNS)
  got = [
    (
      r["file"],
      r["label"],
      r["leaf"],
      r["leaf_probability"],
      r["path"],
      r["second_leaf"],
      r["second_probability"],
    )
    for r in rows
  ]
  assert got == [
    ("a b.png", "2", "5", "0.7", "0/2/5", "6", "0.2"),
    ('c,"d".png', "0", "1", "0.5", "0/1", "5", "0.25"),  # a tie: the first leaf
    ("ü/é.png", "1", "6", "0.5", "0/2/6", "5", "0.3"),
  ]
  assert [r["index"] for r in rows] == ["0", "1", "2"] and {r["split"] for r in rows} == {"test"}


def test_unlabelled_images_without_files_and_a_one_leaf_tree():
  text = assignments.to_csv(Tree.root_only(), {"train": (_arrays(2), np.ones((2, 1)))})
  rows = list(csv.DictReader(io.StringIO(text)))
  assert [(r["file"], r["label"], r["leaf"], r["path"], r["second_leaf"]) for r in rows] == [
    ("", "", "0", "0", ""),
    ("", "", "0", "0", ""),
  ]


def test_probabilities_of_another_shape_are_refused():
  with pytest.raises(ValueError, match=r"probs must be \[2, 3\]"):
    assignments.to_csv(TREE, {"test": (_arrays(2), np.ones((2, 2)))})


def test_assign_places_images_as_the_model_does_one_by_one():
  import jax
  from tree_diffusion.treevae.inference import assign
  from tree_diffusion.treevae.model import TreeVAE

  model = TreeVAE(latent_channels=(2, 2, 2, 2), bottom_up_channels=(4, 4, 4, 4))
  variables = model.init(jax.random.key(0), TREE)
  x = np.random.default_rng(1).uniform(size=(5, 28, 28, 1)).astype(np.float32)
  leaves, probs = assign(model, variables, TREE, x, batch_size=2)  # batches of 2, 2, 1 (padded)
  one = np.concatenate(
    [np.asarray(model.leaf_probabilities(variables, TREE, x[i : i + 1])) for i in range(5)]
  )
  np.testing.assert_allclose(probs, one, rtol=1e-5, atol=1e-7)
  assert leaves.tolist() == [TREE.leaves[k] for k in one.argmax(1)]
  with pytest.raises(TypeError, match="to_unit_range"):
    assign(model, variables, TREE, (x * 255).astype(np.uint8))
