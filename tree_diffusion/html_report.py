"""``WORKDIR/report.html``: one self-contained page to explore a run's tree.

The learned tree is drawn with each node's share of the images (train and test). Clicking a node,
inner or leaf, shows its share, its label histogram (labelled datasets), a gallery of its most
probable real images with their file names, and, once ``launch/sample.py`` has run, generations of
the TreeVAE and of the diffusion model for the same prior draws. A panel shows
``stage1_metrics.json`` and ``eval/metrics.json`` when present.

Everything is in the one file: images are inlined as PNG ``data:`` URLs, each stored once (an inner
node's gallery reuses its leaves' images), so the page opens from ``file://`` with no server and
no network. Text taken from files (names, labels, metrics) is handed to the page as JSON and put
into the document as text, never as markup.

What the page reads, all written by the training commands: the tree (``stage1_metrics.json``),
``assignments.csv`` (each image's leaf and its probability), the dataset itself for the pixels,
and ``diffusion/samples/sample_all_leaves/samples.npz``. A leaf's gallery ranks its images by the
probability of that leaf; an inner node's takes its leaves' most probable images in turn (the best
of each leaf, then the second best, ...), so that it shows every branch below it.

The module is long because the page's HTML, CSS and script are kept here as one template next to
the code that fills it; the page has no other file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from tree_diffusion import data as data_lib
from tree_diffusion import files
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree

# Images per node in each gallery.
REAL_PER_NODE = 12
GENERATED_PER_NODE = 8


def _png_url(image: np.ndarray) -> str:
  """A uint8 ``[H, W, C]`` image as a ``data:image/png;base64,…`` URL."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buf = io.BytesIO()
  pil.save(buf, format="PNG", optimize=True)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Images:
  """The page's image store: each image encoded once, referred to by its position."""

  def __init__(self):
    self.urls: list[str] = []
    self._seen: dict[tuple, int] = {}

  def add(self, key: tuple, image: np.ndarray) -> int:
    if key not in self._seen:
      self._seen[key] = len(self.urls)
      self.urls.append(_png_url(image))
    return self._seen[key]


def _layout(tree: Tree) -> dict[int, tuple[float, int]]:
  """``node → (x, depth)``: leaves at 0, 1, 2, … from left to right, a parent above the middle of
  its children."""
  pos, next_x = {}, [0]

  def place(n: int) -> float:
    children = tree.children(n)
    x = float(next_x[0]) if not children else float(np.mean([place(c) for c in children]))
    if not children:
      next_x[0] += 1
    pos[n] = (x, tree.node_depth(n))
    return x

  place(0)
  return pos


def _read_assignments(path: str) -> list[dict]:
  if not files.exists(path):
    return []
  return list(csv.DictReader(io.StringIO(files.read_text(path))))


def _json_or_none(path: str) -> Any:
  try:
    return files.read_json(path) if files.exists(path) else None
  except (OSError, ValueError):
    return None


def _scalars(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
  """A metrics JSON as ``(dotted key, value text)`` rows: numbers, strings and short lists of
  them; long lists are summarised by their length."""
  rows = []
  if isinstance(obj, dict):
    for k, v in obj.items():
      rows += _scalars(v, f"{prefix}{k}.")
    return rows
  key = prefix[:-1]
  if isinstance(obj, float):
    rows.append((key, f"{obj:.4g}"))
  elif isinstance(obj, list):
    if len(obj) <= 16 and all(isinstance(v, (int, float, str)) for v in obj):
      rows.append((key, ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in obj)))
    elif obj and all(isinstance(v, dict) for v in obj):
      for i, v in enumerate(obj[:16]):
        rows += _scalars(v, f"{prefix}{i}.")
    else:
      rows.append((key, f"[{len(obj)} values]"))
  elif obj is not None:
    rows.append((key, str(obj)))
  return rows


def _generations(
  run_dir: RunDir, tree: Tree, images: _Images, num: int
) -> dict[str, dict[int, list[int]]]:
  """Per generator and leaf, the ``num`` draws of ``sample_all_leaves`` most likely to reach the
  leaf (as the stage-2 tree figure shows them): image store positions."""
  path = run_dir.samples_npz("sample_all_leaves")
  if not files.exists(path):
    return {}
  try:
    npz = files.load_npz(path)
  except (OSError, ValueError) as e:
    logging.warning(
      "report: %s cannot be read (%s); the page shows no generations", path, files.one_line(e)
    )
    return {}
  leaf_nodes = [int(n) for n in npz.get("leaf_nodes", np.asarray(tree.leaves))]
  if leaf_nodes != list(tree.leaves):
    logging.warning("report: %s was sampled from another tree; the page shows no generations", path)
    return {}
  order = np.argsort(-npz["leaf_probs"], axis=0, kind="stable")[:num]  # [num, K]
  out = {}
  for kind, key in (("treevae", "vae_images"), ("diffusion", "images")):
    out[kind] = {
      n: [images.add((kind, int(i), j), npz[key][i, j]) for i in order[:, j]]
      for j, n in enumerate(tree.leaves)
    }
  return out


def build(workdir: str) -> str:
  """The page's HTML for the run in ``workdir`` (stage 1 finished)."""
  run_dir = RunDir(workdir)
  config = _json_or_none(run_dir.stage2_config) or _json_or_none(run_dir.config) or {}
  stage1 = _json_or_none(run_dir.stage1_metrics)
  if not isinstance(stage1, dict) or "tree" not in stage1:
    raise FileNotFoundError(
      f"{run_dir.stage1_metrics} is missing or holds no tree: run "
      f"python -m launch.train_treevae with this --workdir first"
    )
  tree = Tree.from_json(stage1["tree"])
  rows = _read_assignments(run_dir.assignments)
  data_config = config.get("data") or {}
  arrays, note = {}, ""
  try:
    for split in ("train", "test"):
      arrays[split] = data_lib.load_arrays(data_config, split)
  except Exception as e:  # pylint: disable=broad-except  (the page is still useful without pixels)
    arrays, note = {}, f"The images could not be read ({files.one_line(e)}): galleries show names."
    logging.warning("report: %s", note)
  class_names = next(iter(arrays.values())).class_names if arrays else ()
  images = _Images()

  by_leaf: dict[int, list[dict]] = {n: [] for n in tree.leaves}
  for r in rows:
    leaf = int(r["leaf"])
    if leaf in by_leaf:
      by_leaf[leaf].append(r)
  for leaf_rows in by_leaf.values():
    leaf_rows.sort(key=lambda r: -float(r["leaf_probability"]))

  def real(r: dict) -> dict:
    split, index = r["split"], int(r["index"])
    item = {
      "file": r["file"] or f"{split} #{index}",
      "split": split,
      "index": index,
      "p": float(r["leaf_probability"]),
      "leaf": int(r["leaf"]),
    }
    if split in arrays and index < len(arrays[split]):
      item["img"] = images.add(("real", split, index), arrays[split].images[index])
    return item

  leaf_gallery = {n: [real(r) for r in by_leaf[n][:REAL_PER_NODE]] for n in tree.leaves}
  generated = _generations(run_dir, tree, images, GENERATED_PER_NODE)
  pos = _layout(tree)
  total = max(len(rows), 1)
  nodes = []
  for n in sorted(pos):
    leaves = [m for m in tree.subtree(n) if tree.is_leaf(m)]
    members = [r for m in leaves for r in by_leaf[m]]
    labels: dict[str, int] = {}
    for r in members:
      if r.get("label", "") != "":
        name = r["label"]
        if class_names and 0 <= int(name) < len(class_names):
          name = class_names[int(name)]
        labels[name] = labels.get(name, 0) + 1
    # Each leaf's most probable images in turn (the best of each leaf, then the second best, ...),
    # so that an inner node's gallery shows every branch below it.
    gallery = [
      g
      for i in range(REAL_PER_NODE)
      for g in sorted(
        (leaf_gallery[m][i] for m in leaves if i < len(leaf_gallery[m])), key=lambda g: -g["p"]
      )
    ]
    gens = {}
    for kind, per_leaf in generated.items():
      # Round-robin over the node's leaves, so an inner node shows each of its leaves.
      picks = [
        per_leaf[m][i] for i in range(GENERATED_PER_NODE) for m in leaves if i < len(per_leaf[m])
      ]
      gens[kind] = picks[:GENERATED_PER_NODE]
    nodes.append(
      {
        "id": n,
        "parent": tree.parent(n),
        "children": list(tree.children(n)),
        "leaf": tree.is_leaf(n),
        "x": pos[n][0],
        "depth": pos[n][1],
        "path": list(tree.path(n)),
        "count": len(members),
        "share": len(members) / total,
        "splits": {s: sum(r["split"] == s for r in members) for s in ("train", "test")},
        "labels": sorted(labels.items(), key=lambda kv: -kv[1]),
        "real": gallery[:REAL_PER_NODE],
        "generated": gens,
      }
    )
  metrics = []
  for title, path in (
    ("Stage 1 (stage1_metrics.json)", run_dir.stage1_metrics),
    ("Evaluation (eval/metrics.json)", run_dir.eval_metrics),
  ):
    obj = _json_or_none(path)
    if isinstance(obj, dict):
      skip = ("tree",)
      metrics.append(
        {"title": title, "rows": _scalars({k: v for k, v in obj.items() if k not in skip})}
      )
  name = data_config.get("name", "?")
  if data_config.get("folder"):
    name = f"{name}: {data_config['folder']}"
  payload = {
    "title": f"tree_diffusion run {workdir}",
    "dataset": name,
    "images": images.urls,
    "nodes": nodes,
    "metrics": metrics,
    "num_images": len(rows),
    "note": note,
    "num_leaves": tree.num_leaves,
    "has_generations": bool(generated),
  }
  text = json.dumps(payload, separators=(",", ":"))
  # Inside <script>, "</script>" or "<!--" in a file name would end the element: escape < > &.
  text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
  return _PAGE.replace("__TITLE__", html.escape(payload["title"])).replace("__DATA__", text)


def write(workdir: str) -> str:
  """Writes :func:`build` to ``WORKDIR/report.html`` atomically; returns its path."""
  path = RunDir(workdir).report
  files.write_text(path, build(workdir))
  return path


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 10px 16px; background: #234; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
header p { margin: 2px 0 0; opacity: .85; }
main { display: grid; grid-template-columns: minmax(420px, 1.2fr) 1fr; gap: 12px; padding: 12px; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; }
#tree-panel { overflow-x: auto; }
#metrics-panel { grid-column: 1 / span 2; }
svg text { font-size: 11px; pointer-events: none; }
.node { cursor: pointer; }
.node rect { fill: #e8eef7; stroke: #567; }
.node.leaf rect { fill: #fff4dd; }
.node.selected rect { stroke: #d40; stroke-width: 3; }
.edge { stroke: #999; fill: none; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 10px; }
figure { margin: 0; width: 72px; text-align: center; }
figure img { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 10px; overflow-wrap: anywhere; color: #444; }
.bar { display: flex; align-items: center; gap: 6px; font-size: 12px; }
.bar span.fill { display: inline-block; height: 10px; background: #58a; }
table { border-collapse: collapse; font-size: 12px; }
td { border-bottom: 1px solid #eee; padding: 2px 8px 2px 0; vertical-align: top; }
td:first-child { color: #555; }
.metrics { display: flex; flex-wrap: wrap; gap: 24px; }
.note { color: #a40; }
</style>
</head>
<body>
<header><h1 id="title"></h1><p id="subtitle"></p></header>
<main>
<section id="tree-panel"><h2>Tree</h2><p>Click a node: its images, labels and generations.</p>
<svg id="tree" xmlns="http://www.w3.org/2000/svg"></svg></section>
<section id="node-panel"><h2 id="node-title">No node selected</h2>
<div id="node-body"></div></section>
<section id="metrics-panel"><h2>Metrics</h2><div id="metrics" class="metrics"></div></section>
</main>
<script type="application/json" id="report-data">__DATA__</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const byId = new Map(data.nodes.map(function (n) { return [n.id, n]; }));

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(function (kv) { e.setAttribute(kv[0], kv[1]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    Object.entries(attrs || {}).forEach(function (kv) { e.setAttribute(kv[0], String(kv[1])); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function pct(x) { return (100 * x).toFixed(1) + "%"; }

  document.getElementById("title").textContent = data.title;
  document.getElementById("subtitle").textContent = data.dataset + " \\u2014 " + data.num_leaves +
      " leaves, " + data.num_images + " images (train and test)";
  if (data.note) {
    document.getElementById("tree-panel").appendChild(el("p", {"class": "note"}, data.note));
  }

  // The tree: leaves spread left to right, one row per depth.
  const W = 78, H = 76, BW = 66, BH = 34;
  const maxX = Math.max.apply(null, data.nodes.map(function (n) { return n.x; }));
  const maxD = Math.max.apply(null, data.nodes.map(function (n) { return n.depth; }));
  const svg = document.getElementById("tree");
  // Scaled to the panel's width, never below 60% of its natural size (then the panel scrolls).
  const width = (maxX + 1) * W + 10, height = (maxD + 1) * H + 40;
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.style.width = "100%";
  svg.style.minWidth = Math.round(0.6 * width) + "px";
  svg.style.maxWidth = width + "px";
  function cx(n) { return 5 + n.x * W + W / 2; }
  function cy(n) { return 5 + n.depth * H + BH / 2; }
  data.nodes.forEach(function (n) {
    if (n.parent !== null) {
      const p = byId.get(n.parent);
      svg.appendChild(svgEl("path", {"class": "edge", "d": "M" + cx(p) + "," + (cy(p) + BH / 2) +
          " L" + cx(n) + "," + (cy(n) - BH / 2)}));
    }
  });
  data.nodes.forEach(function (n) {
    const g = svgEl("g", {"class": n.leaf ? "node leaf" : "node", "data-node": n.id});
    g.appendChild(svgEl("rect", {"x": cx(n) - BW / 2, "y": cy(n) - BH / 2, "width": BW,
                                 "height": BH, "rx": 5}));
    g.appendChild(svgEl("text", {"x": cx(n), "y": cy(n) - 3, "text-anchor": "middle"},
                        (n.leaf ? "leaf " : "node ") + n.id));
    g.appendChild(svgEl("text", {"x": cx(n), "y": cy(n) + 11, "text-anchor": "middle"},
                        pct(n.share)));
    // Under a leaf, its two most probable real images.
    const thumbs = (n.leaf ? n.real : []).filter(function (item) {
      return item.img !== undefined;
    });
    thumbs.slice(0, 2).forEach(function (item, i) {
      g.appendChild(svgEl("image", {"href": data.images[item.img], "x": cx(n) - 31 + 32 * i,
                                    "y": cy(n) + BH / 2 + 3, "width": 30, "height": 30,
                                    "style": "image-rendering: pixelated"}));
    });
    const title = svgEl("title", {}, (n.leaf ? "leaf " : "node ") + n.id + ": " + n.count +
                        " images (" + pct(n.share) + ")");
    g.appendChild(title);
    g.addEventListener("click", function () { show(n.id); });
    svg.appendChild(g);
  });

  function gallery(kind, items, caption) {
    const div = el("div", {"class": "gallery", "data-kind": kind});
    items.forEach(function (item) {
      const fig = el("figure");
      if (item.img !== undefined) {
        fig.appendChild(el("img", {"src": data.images[item.img], "alt": caption(item)}));
      }
      fig.appendChild(el("figcaption", {"title": caption(item)}, caption(item)));
      div.appendChild(fig);
    });
    return div;
  }

  function show(id) {
    const n = byId.get(id);
    document.querySelectorAll(".node.selected").forEach(function (g) {
      g.classList.remove("selected");
    });
    document.querySelector('.node[data-node="' + id + '"]').classList.add("selected");
    document.getElementById("node-title").textContent = (n.leaf ? "Leaf " : "Node ") + n.id;
    const body = document.getElementById("node-body");
    body.replaceChildren();
    body.appendChild(el("p", {}, n.count + " images, " + pct(n.share) + " of the data (train " +
        n.splits.train + ", test " + n.splits.test + "); path " + n.path.join(" \\u2192 ") +
        (n.leaf ? "" : "; children " + n.children.join(", "))));
    if (n.labels.length) {
      body.appendChild(el("h3", {}, "Labels"));
      const hist = el("div", {"class": "labels"});
      n.labels.forEach(function (kv) {
        const row = el("div", {"class": "bar"});
        row.appendChild(el("span", {"class": "name"}, kv[0]));
        const fill = el("span", {"class": "fill"});
        fill.style.width = Math.round(200 * kv[1] / n.count) + "px";
        row.appendChild(fill);
        row.appendChild(el("span", {}, kv[1] + " (" + pct(kv[1] / n.count) + ")"));
        hist.appendChild(row);
      });
      body.appendChild(hist);
    }
    body.appendChild(el("h3", {}, "Most probable real images"));
    if (!n.real.length) {
      body.appendChild(el("p", {}, "No image was assigned to this " +
                          (n.leaf ? "leaf." : "node.")));
    }
    body.appendChild(gallery("real", n.real, function (item) {
      return item.file + " (leaf " + item.leaf + ", p=" + item.p.toFixed(3) + ")";
    }));
    if (data.has_generations) {
      [["treevae", "TreeVAE generations"], ["diffusion", "Diffusion generations"]].forEach(
          function (kt) {
            body.appendChild(el("h3", {}, kt[1]));
            body.appendChild(gallery(kt[0], (n.generated[kt[0]] || []).map(function (i) {
              return {"img": i};
            }), function () { return kt[1].split(" ")[0]; }));
          });
    } else {
      body.appendChild(el("p", {}, "Generations appear here once python -m launch.sample has run."));
    }
  }

  const metrics = document.getElementById("metrics");
  if (!data.metrics.length) {
    metrics.appendChild(el("p", {}, "No metrics yet."));
  }
  data.metrics.forEach(function (m) {
    const box = el("div");
    box.appendChild(el("h3", {}, m.title));
    const table = el("table");
    m.rows.forEach(function (r) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, r[0]));
      tr.appendChild(el("td", {}, r[1]));
      table.appendChild(tr);
    });
    box.appendChild(table);
    metrics.appendChild(box);
  });
  show(0);
})();
</script>
</body>
</html>
"""
