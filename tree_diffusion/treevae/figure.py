"""Tree figures: the learned hierarchy drawn with per-leaf image panels (PIL only, no matplotlib).

A figure has two parts:

* **The tree.** Every present node is a box labelled with its heap id and its share of the samples
  in percent (an internal or passthrough node's share is the sum of the shares of the leaves under
  it). Leaves have a thick outline on a light grey fill, internal nodes a thin outline and
  passthrough nodes (left behind by pruning) a dashed outline. Parent and child are joined by
  right-angled ("elbow") edges. The y position of a box is given by its depth; leaves are placed
  left to right in depth-first in-order (left child first), one fixed-width column each, and every
  other node is centred above its children, so edges never cross.
* **Image rows.** Under the tree, each entry of ``rows`` becomes one horizontal band. In every
  leaf's column the band holds that leaf's ``n`` images as a small grid (one column for ``n <= 2``,
  two columns up to ``n = 12``, three beyond), upscaled by an integer factor (nearest neighbour)
  and framed in light grey. The band's title, if given, sits in the left margin. A dashed grey
  leader joins each leaf box to its images, so leaves at shallow depths stay visibly attached.

Pixel values are clipped to ``[0, 1]`` and quantised as ``rint(255 * x)``; NaN pixels are drawn
white, so an all-NaN image is an empty (blank) slot, which is how leaves with fewer than ``n``
images are padded. Grey images (``C = 1``) are drawn grey on the RGB canvas.

:func:`draw_tree` can also return the layout (box and panel coordinates), which tests and
annotation code use to find things on the canvas.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tree_diffusion import files
from tree_diffusion.tree import Tree

_DEFAULT_CELL = 56  # Minimum displayed side (px) of an image when ``cell`` is not given.
_FONT_SIZE = 13  # Text size for the scalable default font (ignored for the bitmap fallback).
_MARGIN = 12  # Outer margin (px).
_IMAGE_GAP = 2  # Gap (px) between the images of one leaf grid.
_COLUMN_PAD = 18  # Horizontal space (px) between the grids / boxes of neighbouring leaves.
_LEVEL_GAP = 30  # Vertical space (px) between the boxes of consecutive depths.
_BAND_GAP = 16  # Vertical space (px) between the tree and the first band, and between bands.
_BOX_PAD = 5  # Padding (px) between a box outline and its text.
_FRAME_PAD = 3  # Distance (px) of the grey frame around a leaf grid from its images.

_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)
_GREY = (150, 150, 150)
_LIGHT_GREY = (205, 205, 205)
_LEAF_FILL = (235, 235, 235)


# ------------------------------------------------------------------------------------- public API


def image_to_uint8(image: Any, scale: int = 1) -> np.ndarray:
  """Converts one image to the RGB ``uint8`` pixels that the figure shows.

  Args:
    image: float array ``[H, W, C]`` with ``C`` 1 (grey) or 3 (RGB), values in ``[0, 1]``. Values
      outside are clipped; NaN pixels become white.
    scale: integer upscaling factor (nearest neighbour).

  Returns:
    ``uint8`` array ``[H * scale, W * scale, 3]``.

  Raises:
    ValueError: for a wrong rank, channel count or scale.
  """
  x = np.asarray(image, np.float64)
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f"an image must be [H, W, C] with C in (1, 3); got shape {x.shape}")
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale must be a positive integer; got {scale}")
  x = np.where(np.isnan(x), 1.0, np.clip(x, 0.0, 1.0))
  q = np.rint(x * 255.0).astype(np.uint8)
  if q.shape[-1] == 1:
    q = np.repeat(q, 3, axis=-1)
  scale = int(scale)
  return np.repeat(np.repeat(q, scale, axis=0), scale, axis=1)


def draw_tree(
  tree: Tree,
  leaf_share: Any,
  rows: Sequence[Any] = (),
  *,
  row_titles: Sequence[str] | None = None,
  title: str | None = None,
  cell: int | None = None,
  return_layout: bool = False,
):
  """Draws ``tree`` with each node's sample share and, under every leaf, rows of images.

  Args:
    tree: the topology to draw.
    leaf_share: float array ``[K]``, the share of samples per leaf, in ``tree.leaves`` order
      (normally summing to 1). Shown as given, times 100, with one decimal.
    rows: image stacks, each a float array ``[K, n, H, W, C]`` in ``[0, 1]`` (``C`` 1 or 3), again
      in ``tree.leaves`` order. ``n``, ``H``, ``W`` and ``C`` may differ between rows. All-NaN
      images are drawn as empty slots.
    row_titles: one title per row, written in the left margin (e.g. ``["real", "generated"]``).
    title: optional figure title, centred at the top.
    cell: minimum displayed side in pixels of an image; each row is upscaled by the smallest
      integer factor reaching it (never downscaled). Defaults to 56, i.e. 28-px images double.
    return_layout: also return the layout dictionary described below.

  Returns:
    The RGB ``PIL.Image.Image``; with ``return_layout``, the pair ``(image, layout)`` where
    ``layout`` holds

    * ``"leaf_order"``: leaf ids left to right (depth-first in-order),
    * ``"leaf_x"``: ``{leaf id: x of the centre of its column}``,
    * ``"node_box"``: ``{node id: (x0, y0, x1, y1)}`` of its box outline (inclusive pixels),
    * ``"node_share"``: ``{node id: share}`` as drawn,
    * ``"panels"``: one dict per row, ``{leaf id: [(x0, y0, x1, y1), ...]}`` giving for each of the
      ``n`` images the pixel box it occupies, exclusive at ``x1``/``y1`` so that
      ``np.asarray(image)[y0:y1, x0:x1]`` is exactly that image's pixels,
    * ``"scale"``: the integer upscaling factor of each row,
    * ``"size"``: ``(width, height)`` of the figure.

  Raises:
    ValueError: when ``leaf_share``, ``rows`` or ``row_titles`` do not match the tree.
  """
  k = tree.num_leaves
  share = np.asarray(leaf_share, np.float64)
  if share.shape != (k,):
    raise ValueError(f"leaf_share must have shape ({k},) for {tree}; got {share.shape}")
  stacks = [np.asarray(r, np.float64) for r in rows]
  for i, s in enumerate(stacks):
    if s.ndim != 5 or s.shape[0] != k or s.shape[-1] not in (1, 3) or s.shape[1] < 1:
      raise ValueError(f"rows[{i}] must have shape [{k}, n>=1, H, W, C in (1, 3)]; got {s.shape}")
  if row_titles is not None:
    row_titles = [str(t) for t in row_titles]
    if len(row_titles) != len(stacks):
      raise ValueError(f"got {len(row_titles)} row titles for {len(stacks)} rows")
  min_cell = _DEFAULT_CELL if cell is None else int(cell)
  if min_cell < 1:
    raise ValueError(f"cell must be positive; got {cell}")

  font = _load_font()
  line_h = _text_size(font, "Ag0%")[1]

  # Node shares and labels; every box has the same size so the tree looks even.
  node_share = _node_shares(tree, share)
  labels = {n: (f"{n}", f"{100.0 * node_share[n]:.1f}%") for n in tree.nodes}
  text_w = max(_text_size(font, t)[0] for pair in labels.values() for t in pair)
  box_w = text_w + 2 * _BOX_PAD
  box_h = 2 * line_h + 3 * _BOX_PAD

  # Image grids: per row the scale, grid shape and pixel size.
  grids = []
  for s in stacks:
    n, h, w = s.shape[1:4]
    scale = max(1, math.ceil(min_cell / max(h, w)))
    cols = 1 if n <= 2 else (2 if n <= 12 else 3)
    grid_rows = math.ceil(n / cols)
    ph, pw = h * scale, w * scale
    grids.append(
      dict(
        n=n,
        scale=scale,
        cols=cols,
        ph=ph,
        pw=pw,
        width=cols * pw + (cols - 1) * _IMAGE_GAP,
        height=grid_rows * ph + (grid_rows - 1) * _IMAGE_GAP,
      )
    )

  # Horizontal layout: left margin for the row titles, then one column per leaf.
  title_w = max((_text_size(font, t)[0] for t in row_titles), default=0) if row_titles else 0
  left = _MARGIN + (title_w + _MARGIN if title_w else 0)
  grid_w = max((g["width"] + 2 * _FRAME_PAD for g in grids), default=0)
  col_w = max(grid_w, box_w) + _COLUMN_PAD
  width = left + k * col_w + _MARGIN

  leaf_order = _inorder_leaves(tree)
  node_x = {leaf: left + i * col_w + col_w // 2 for i, leaf in enumerate(leaf_order)}
  for n in reversed(tree.nodes):  # Children have larger heap ids than their parent.
    if not tree.is_leaf(n):
      node_x[n] = int(round(np.mean([node_x[c] for c in tree.children(n)])))

  # Vertical layout: title, tree levels, then one band per row.
  top = _MARGIN
  title_h = _text_size(font, title)[1] if title else 0
  tree_top = top + (title_h + _BAND_GAP if title else 0)
  level_h = box_h + _LEVEL_GAP
  node_box = {}
  for n in tree.nodes:
    y0 = tree_top + tree.node_depth(n) * level_h
    x0 = node_x[n] - box_w // 2
    node_box[n] = (x0, y0, x0 + box_w - 1, y0 + box_h - 1)
  y = tree_top + tree.depth * level_h + box_h
  band_top = []
  for g in grids:
    y += _BAND_GAP + _FRAME_PAD
    band_top.append(y)
    y += g["height"] + _FRAME_PAD
  height = y + _MARGIN

  canvas = Image.new("RGB", (width, height), _WHITE)
  draw = ImageDraw.Draw(canvas)

  if title:
    _draw_text(draw, font, title, (width // 2, top + title_h // 2))

  # Leaders from each leaf to its grids (drawn first, boxes and frames go on top).
  if grids:
    for leaf in leaf_order:
      x = node_x[leaf]
      _dashed_line(draw, (x, node_box[leaf][3] + 1), (x, band_top[0] - _FRAME_PAD - 1), _GREY)

  # Elbow edges: down from the parent, across, down into the child.
  for n in tree.nodes:
    for c in tree.children(n):
      y_start = node_box[n][3] + 1
      y_mid = y_start + _LEVEL_GAP // 2
      y_end = node_box[c][1] - 1
      draw.line(
        [(node_x[n], y_start), (node_x[n], y_mid), (node_x[c], y_mid), (node_x[c], y_end)],
        fill=_BLACK,
        width=1,
      )

  for n in tree.nodes:
    box = node_box[n]
    if tree.is_leaf(n):
      draw.rectangle(box, fill=_LEAF_FILL, outline=_BLACK, width=2)
    elif tree.is_passthrough(n):
      draw.rectangle(box, fill=_WHITE)
      _dashed_rectangle(draw, box, _BLACK)
    else:
      draw.rectangle(box, fill=_WHITE, outline=_BLACK, width=1)
    cx = (box[0] + box[2]) // 2
    cy = (box[1] + box[3]) // 2
    id_text, share_text = labels[n]
    _draw_text(draw, font, id_text, (cx, cy - (line_h + _BOX_PAD) // 2))
    _draw_text(draw, font, share_text, (cx, cy + (line_h + _BOX_PAD) // 2))

  # Image bands.
  panels = []
  leaf_pos = {leaf: i for i, leaf in enumerate(tree.leaves)}
  for r, (s, g) in enumerate(zip(stacks, grids)):
    y0 = band_top[r]
    if row_titles:
      _draw_text(draw, font, row_titles[r], (_MARGIN + title_w // 2, y0 + g["height"] // 2))
    row_panels = {}
    for leaf in leaf_order:
      gx0 = node_x[leaf] - g["width"] // 2
      draw.rectangle(
        (
          gx0 - _FRAME_PAD,
          y0 - _FRAME_PAD,
          gx0 + g["width"] - 1 + _FRAME_PAD,
          y0 + g["height"] - 1 + _FRAME_PAD,
        ),
        fill=_WHITE,
        outline=_LIGHT_GREY,
        width=1,
      )
      boxes = []
      for j in range(g["n"]):
        px = gx0 + (j % g["cols"]) * (g["pw"] + _IMAGE_GAP)
        py = y0 + (j // g["cols"]) * (g["ph"] + _IMAGE_GAP)
        boxes.append((px, py, px + g["pw"], py + g["ph"]))
        img = s[leaf_pos[leaf], j]
        if not np.all(np.isnan(img)):
          canvas.paste(Image.fromarray(image_to_uint8(img, g["scale"]), "RGB"), (px, py))
      row_panels[leaf] = boxes
    panels.append(row_panels)

  if not return_layout:
    return canvas
  layout = {
    "leaf_order": leaf_order,
    "leaf_x": {leaf: node_x[leaf] for leaf in leaf_order},
    "node_box": node_box,
    "node_share": node_share,
    "panels": panels,
    "scale": [g["scale"] for g in grids],
    "size": (width, height),
  }
  return canvas, layout


def save_tree_figure(
  path: str | os.PathLike,
  tree: Tree,
  leaf_share: Any,
  rows: Sequence[Any] = (),
  *,
  row_titles: Sequence[str] | None = None,
  title: str | None = None,
  cell: int | None = None,
) -> str | os.PathLike:
  """Draws the figure of :func:`draw_tree` and writes it as a PNG, creating parent directories.

  Args:
    path: output file; written as PNG whatever its suffix.
    tree: see :func:`draw_tree`.
    leaf_share: see :func:`draw_tree`.
    rows: see :func:`draw_tree`.
    row_titles: see :func:`draw_tree`.
    title: see :func:`draw_tree`.
    cell: see :func:`draw_tree`.

  Returns:
    The path written to.
  """
  image = draw_tree(tree, leaf_share, rows, row_titles=row_titles, title=title, cell=cell)
  files.save_png(path, image)
  return path


# ------------------------------------------------------------------------------------- helpers


def _inorder_leaves(tree: Tree) -> tuple[int, ...]:
  """Leaf ids in depth-first order, left child first (the left-to-right drawing order)."""
  out, stack = [], [0]
  while stack:
    n = stack.pop()
    children = tree.children(n)
    if not children:
      out.append(n)
    stack.extend(reversed(children))
  return tuple(out)


def _node_shares(tree: Tree, leaf_share: np.ndarray) -> dict[int, float]:
  """Share of every node: its own for a leaf, the sum over the leaves below otherwise."""
  shares = {leaf: float(leaf_share[i]) for i, leaf in enumerate(tree.leaves)}
  for n in reversed(tree.nodes):
    if not tree.is_leaf(n):
      shares[n] = float(sum(shares[c] for c in tree.children(n)))
  return shares


def _load_font():
  """The scalable default font at :data:`_FONT_SIZE`, or the bitmap default without FreeType."""
  try:
    return ImageFont.load_default(size=_FONT_SIZE)
  except (ImportError, OSError, TypeError, ValueError):
    return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
  """Width and height of the ink of ``text``."""
  x0, y0, x1, y1 = font.getbbox(text)
  return int(math.ceil(x1 - x0)), int(math.ceil(y1 - y0))


def _draw_text(draw: ImageDraw.ImageDraw, font, text: str, centre: tuple[int, int]):
  """Writes ``text`` in black with the centre of its ink at ``centre``."""
  x0, y0, x1, y1 = font.getbbox(text)
  origin = (round(centre[0] - (x0 + x1) / 2), round(centre[1] - (y0 + y1) / 2))
  draw.text(origin, text, fill=_BLACK, font=font)


def _dashed_line(
  draw: ImageDraw.ImageDraw,
  p0: tuple[int, int],
  p1: tuple[int, int],
  fill,
  dash: int = 4,
  gap: int = 3,
):
  """Draws an axis-parallel dashed line from ``p0`` to ``p1`` (both inclusive)."""
  (x0, y0), (x1, y1) = p0, p1
  if x0 != x1 and y0 != y1:
    raise ValueError("dashed lines must be horizontal or vertical")
  length = abs(x1 - x0) + abs(y1 - y0)
  dx = (x1 > x0) - (x1 < x0)
  dy = (y1 > y0) - (y1 < y0)
  for start in range(0, length + 1, dash + gap):
    end = min(start + dash - 1, length)
    draw.line([(x0 + dx * start, y0 + dy * start), (x0 + dx * end, y0 + dy * end)], fill=fill)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill):
  """Draws the outline of ``box`` (inclusive pixels) dashed."""
  x0, y0, x1, y1 = box
  _dashed_line(draw, (x0, y0), (x1, y0), fill)
  _dashed_line(draw, (x0, y1), (x1, y1), fill)
  _dashed_line(draw, (x0, y0), (x0, y1), fill)
  _dashed_line(draw, (x1, y0), (x1, y1), fill)
