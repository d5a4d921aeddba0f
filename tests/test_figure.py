"""Tests for tree_diffusion.treevae.figure: layout, pixel content and PNG output."""

import numpy as np
import pytest
from PIL import Image

from tree_diffusion.tree import Tree
from tree_diffusion.treevae import figure


# ------------------------------------------------------------------------------------- helpers


def _pruned_tree():
  """Root → (1, 2); 1 → (3, 4); 4 → (9, 10); pruning 3 leaves 1 as a passthrough node."""
  tree = Tree.root_only().grow(0).grow(1).grow(4).prune([3])
  assert tree.nodes == (0, 1, 2, 4, 9, 10)
  assert tree.leaves == (2, 9, 10)
  assert tree.passthrough_nodes == (1,)
  return tree


def _expected_pixels(image, scale):
  """Independent quantisation: clip, ×255, round half to even, grey → RGB, nearest upscaling."""
  x = np.clip(np.asarray(image, np.float64), 0.0, 1.0)
  q = np.round(x * 255.0).astype(np.uint8)
  q = np.broadcast_to(q, q.shape[:2] + (3,))
  return np.kron(q, np.ones((scale, scale, 1), np.uint8))


def _draw(channels, size, n=4, **kwargs):
  tree = _pruned_tree()
  rng = np.random.default_rng(channels * 100 + size)
  k = tree.num_leaves
  real = rng.random((k, n, size, size, channels)).astype(np.float32)
  real[tree.leaf_index(2), n - 1] = np.nan  # Leaf 2 has one image fewer than n.
  generated = rng.random((k, n, size, size, channels)).astype(np.float32)
  share = np.array([0.5, 0.3, 0.2])
  image, layout = figure.draw_tree(
    tree,
    share,
    [real, generated],
    row_titles=["real", "generated"],
    title="test",
    return_layout=True,
    **kwargs,
  )
  return tree, share, (real, generated), image, layout


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)], ids=["grey28", "colour32"])
def test_image_is_rgb_plausible_size_and_not_blank(channels, size):
  _, _, _, image, layout = _draw(channels, size)
  assert isinstance(image, Image.Image)
  assert image.mode == "RGB"
  assert image.size == layout["size"]
  width, height = image.size
  # Three leaf columns of at least two upscaled images each, two bands of two image rows each.
  assert 3 * 2 * 56 <= width <= 1500
  assert 2 * 2 * 56 <= height <= 1500
  pixels = np.asarray(image)
  non_white = np.any(pixels != 255, axis=-1).mean()
  assert 0.2 < non_white < 0.95
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)], ids=["grey28", "colour32"])
def test_panels_hold_the_upscaled_quantised_images(channels, size):
  tree, _, rows, image, layout = _draw(channels, size)
  pixels = np.asarray(image)
  assert layout["scale"] == [2, 2]
  for r, row in enumerate(rows):
    for leaf in tree.leaves:
      for j, (x0, y0, x1, y1) in enumerate(layout["panels"][r][leaf]):
        assert (x1 - x0, y1 - y0) == (2 * size, 2 * size)
        got = pixels[y0:y1, x0:x1]
        if r == 0 and leaf == 2 and j == 3:
          assert np.all(got == 255), "an all-NaN image must be an empty (white) slot"
        else:
          np.testing.assert_array_equal(got, _expected_pixels(row[tree.leaf_index(leaf), j], 2))
  # A single pixel inside the first image of leaf 9, checked by hand.
  x0, y0, _, _ = layout["panels"][0][9][0]
  src = rows[0][tree.leaf_index(9), 0, 3, 5]  # Pixel (row 3, col 5) → canvas (y0+7, x0+11).
  expected = np.round(np.clip(src, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(pixels[y0 + 7, x0 + 11], np.broadcast_to(expected, (3,)))
  if channels == 1:
    assert np.all(pixels[y0 + 7, x0 + 11] == pixels[y0 + 7, x0 + 11, 0])


def test_grey_images_are_grey_and_colour_images_are_not():
  tree, _, _, image, layout = _draw(1, 28)
  pixels = np.asarray(image).astype(int)
  x0, y0, x1, y1 = layout["panels"][1][10][2]
  patch = pixels[y0:y1, x0:x1]
  assert np.all(patch[..., 0] == patch[..., 1]) and np.all(patch[..., 1] == patch[..., 2])
  tree, _, _, image, layout = _draw(3, 32)
  pixels = np.asarray(image).astype(int)
  x0, y0, x1, y1 = layout["panels"][1][10][2]
  patch = pixels[y0:y1, x0:x1]
  assert np.any(patch[..., 0] != patch[..., 1])


def test_layout_of_the_pruned_tree():
  tree, share, _, image, layout = _draw(1, 28)
  # In-order leaves: 9 and 10 (under the left passthrough branch) before 2.
  assert layout["leaf_order"] == (9, 10, 2)
  xs = [layout["leaf_x"][leaf] for leaf in layout["leaf_order"]]
  assert xs == sorted(xs) and len(set(np.diff(xs))) == 1  # Equal-width columns.
  box = layout["node_box"]
  centre = {n: (b[0] + b[2]) / 2 for n, b in box.items()}
  assert centre[4] == pytest.approx((centre[9] + centre[10]) / 2, abs=1)
  assert centre[1] == pytest.approx(centre[4], abs=1)  # Passthrough sits above its only child.
  assert centre[0] == pytest.approx((centre[1] + centre[2]) / 2, abs=1)
  # Depth gives the y position; leaf 2 at depth 1 is level with passthrough node 1.
  tops = {n: b[1] for n, b in box.items()}
  assert tops[0] < tops[1] == tops[2] < tops[4] < tops[9] == tops[10]
  # Boxes do not overlap the image bands, and boxes at one depth do not overlap each other.
  first_panel_top = min(p[1] for boxes in layout["panels"][0].values() for p in boxes)
  assert max(b[3] for b in box.values()) < first_panel_top
  assert box[9][2] < box[10][0]
  assert box[1][2] < box[2][0]
  # Shares: internal and passthrough nodes sum their leaves.
  s = dict(zip(tree.leaves, share))
  assert layout["node_share"][4] == pytest.approx(s[9] + s[10])
  assert layout["node_share"][1] == pytest.approx(s[9] + s[10])
  assert layout["node_share"][0] == pytest.approx(1.0)
  # Box outlines are drawn in black (leaves with a solid two-pixel outline).
  pixels = np.asarray(image)
  for leaf in tree.leaves:
    x0, y0, x1, _ = box[leaf]
    assert np.all(pixels[y0, x0 : x1 + 1] == 0)
  # Each leaf's grid sits centred under its box.
  for leaf in tree.leaves:
    x0, _, _, _ = layout["panels"][0][leaf][0]
    x1 = layout["panels"][0][leaf][1][2]
    assert abs((x0 + x1) / 2 - layout["leaf_x"][leaf]) <= 1


def test_cell_sets_the_integer_upscaling():
  _, _, _, image, layout = _draw(1, 28, cell=84)
  assert layout["scale"] == [3, 3]
  x0, y0, x1, y1 = layout["panels"][0][9][0]
  assert (x1 - x0, y1 - y0) == (84, 84)
  _, _, _, _, layout = _draw(1, 28, cell=10)
  assert layout["scale"] == [1, 1]


@pytest.mark.parametrize("n", [1, 4, 6, 10])
def test_twelve_leaves_stay_a_sane_size(n):
  tree = Tree.complete(4).prune([15, 16, 17, 18])
  assert tree.num_leaves == 12
  rows = [
    np.full((12, n, 28, 28, 1), 0.5, np.float32),
    np.full((12, n, 32, 32, 3), 0.2, np.float32),
  ]
  image, layout = figure.draw_tree(tree, np.full(12, 1 / 12), rows, return_layout=True)
  assert image.size[0] <= 4000 and image.size[1] <= 4000
  assert all(len(p) == n for row in layout["panels"] for p in row.values())
  # Panels of neighbouring leaves never overlap.
  for row in layout["panels"]:
    order = layout["leaf_order"]
    for a, b in zip(order, order[1:]):
      assert max(p[2] for p in row[a]) < min(p[0] for p in row[b])


def test_tree_without_rows_and_root_only():
  image = figure.draw_tree(Tree.root_only(), [1.0], [])
  assert image.mode == "RGB" and image.size[0] > 0 and image.size[1] > 0
  assert np.any(np.asarray(image) != 255)


def test_rejects_mismatched_inputs():
  tree = _pruned_tree()
  good = np.zeros((3, 4, 28, 28, 1))
  with pytest.raises(ValueError):
    figure.draw_tree(tree, [0.5, 0.5], [good])
  with pytest.raises(ValueError):
    figure.draw_tree(tree, [0.3, 0.3, 0.4], [np.zeros((2, 4, 28, 28, 1))])
  with pytest.raises(ValueError):
    figure.draw_tree(tree, [0.3, 0.3, 0.4], [np.zeros((3, 4, 28, 28, 2))])
  with pytest.raises(ValueError):
    figure.draw_tree(tree, [0.3, 0.3, 0.4], [good], row_titles=["a", "b"])


def test_save_tree_figure_writes_a_readable_png(tmp_path):
  tree = _pruned_tree()
  rows = [np.random.default_rng(0).random((3, 4, 28, 28, 1))]
  path = tmp_path / "nested" / "dir" / "tree.png"
  out = figure.save_tree_figure(path, tree, [0.5, 0.3, 0.2], rows, row_titles=["real"], title="t")
  assert out == path and path.exists()
  with Image.open(path) as loaded:
    assert loaded.format == "PNG"
    loaded = loaded.convert("RGB")
    expected = figure.draw_tree(tree, [0.5, 0.3, 0.2], rows, row_titles=["real"], title="t")
    assert loaded.size == expected.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
