"""report.html (tree_diffusion/html_report.py) in a real browser: headless Chromium opens the page
of a hand-made run from a file:// URL, clicks an inner node and a leaf, and every gallery, label
histogram and metric it shows is checked against what the run directory holds."""

import base64
import csv
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from browser import Browser, find_chromium
from launchers import ODD_NAMES
from tree_diffusion import data, html_report
from tree_diffusion.runs import RunDir
from tree_diffusion.tree import Tree

TREE = Tree((0, 1, 2, 5, 6))  # leaves 1, 5, 6; node 2 is the inner node below the root
CHROMIUM = find_chromium()
# CI (.ci/run) installs Chromium and sets this: the browser test must run there, never skip.
REQUIRED = os.environ.get("TREE_DIFFUSION_REQUIRE_BROWSER") == "1"

pytestmark = pytest.mark.skipif(
  CHROMIUM is None and not REQUIRED,
  reason="no Chromium (apt-get install chromium; .ci/run installs it)",
)


def _make_run(root):
  """A run directory as stage 1 and sample.py leave it, written by hand: a labelled folder of 20
  images (two classes, file names with spaces, quotes, commas, non-ASCII and markup), the tree
  (in stage1_metrics.json, as stage 1 records it), assignments.csv with chosen leaves and
  probabilities, metrics, and sample_all_leaves."""
  folder, workdir = root / "images", root / "run ü x"
  rng = np.random.default_rng(0)
  names = list(ODD_NAMES) + [f"img_{i:02d}.png" for i in range(16)]
  for i, name in enumerate(names):
    (folder / f"class {'ab'[i % 2]}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
      folder / f"class {'ab'[i % 2]}" / name
    )
  data_config = dict(
    name="folder",
    folder=str(folder),
    image_size=28,
    channels=1,
    resize=False,
    test_fraction=0.25,
    seed=0,
    data_dir=str(root / "tfds"),
  )
  run_dir = RunDir(str(workdir))
  os.makedirs(workdir)
  with open(run_dir.config, "w") as f:
    json.dump({"data": data_config}, f)
  rows = []
  for split in ("train", "test"):
    arrays = data.load_arrays(data_config, split)
    for i, name in enumerate(arrays.files):
      leaf = TREE.leaves[int(rng.integers(3))]
      rows.append(
        {
          "split": split,
          "index": i,
          "file": name,
          "label": int(arrays.labels[i]),
          "leaf": leaf,
          "leaf_probability": f"{rng.uniform(0.3, 1):.6g}",
          "path": "/".join(map(str, TREE.path(leaf))),
        }
      )
  with open(run_dir.assignments, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(run_dir.stage1_metrics, "w") as f:
    json.dump({"tree": json.loads(TREE.to_json()), "num_leaves": 3, "test": {"nmi": 0.4321}}, f)
  os.makedirs(run_dir.eval)
  with open(run_dir.eval_metrics, "w") as f:
    json.dump({"checkpoints": {"3": {"fid_gen": 12.5}}}, f)
  n, k = 10, TREE.num_leaves
  images = rng.integers(0, 256, (n, k, 28, 28, 1), dtype=np.uint8)
  os.makedirs(run_dir.samples("sample_all_leaves"))
  np.savez(
    os.path.join(run_dir.samples("sample_all_leaves"), "samples.npz"),
    images=images,
    vae_images=255 - images,
    leaf_probs=rng.uniform(size=(n, k)),
    leaf_nodes=np.asarray(TREE.leaves),
  )
  return workdir, rows, data_config


def _pixels(url):
  assert url.startswith("data:image/png;base64,")
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_the_page_shows_every_node_s_images_labels_and_generations_in_chromium(tmp_path):
  assert CHROMIUM is not None, "TREE_DIFFUSION_REQUIRE_BROWSER=1 but no chromium on PATH"
  workdir, rows, data_config = _make_run(tmp_path)
  path = html_report.write(str(workdir))
  assert path == os.path.join(str(workdir), "report.html")
  text = open(path, encoding="utf-8").read()
  assert "<img src=x" not in text  # names are data, never markup
  # Nothing is fetched: the only URL is the SVG namespace's name (the images are data: URLs).
  assert set(re.findall(r"\w+://[^\s\"']*", text)) == {"http://www.w3.org/2000/svg"}
  arrays = {s: data.load_arrays(data_config, s) for s in ("train", "test")}
  npz = np.load(os.path.join(RunDir(str(workdir)).samples("sample_all_leaves"), "samples.npz"))

  def expected(node):
    """The node's gallery and label histogram, computed from the rows by hand."""
    leaves = [n for n in TREE.subtree(node) if TREE.is_leaf(n)]
    members = [r for r in rows if r["leaf"] in leaves]
    ranked = [
      sorted((r for r in members if r["leaf"] == leaf), key=lambda r: -float(r["leaf_probability"]))
      for leaf in leaves
    ]
    best = []
    for i in range(12):  # the best of each leaf, then the second best, ... (ties: leaf order)
      best += sorted(
        (mine[i] for mine in ranked if i < len(mine)), key=lambda r: -float(r["leaf_probability"])
      )
    best = best[:12]
    labels = {}
    for r in members:
      name = f"class {'ab'[r['label']]}"
      labels[name] = labels.get(name, 0) + 1
    return best, labels, len(members)

  with Browser(CHROMIUM) as browser:
    browser.open(workdir.joinpath("report.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('.node').length") == 5
    for node in (2, 6):  # an inner node, then a leaf
      browser.evaluate(
        f"document.querySelector('.node[data-node=\"{node}\"]')"
        f".dispatchEvent(new MouseEvent('click', {{bubbles: true}}))"
      )
      title = browser.evaluate("document.getElementById('node-title').textContent")
      assert title == ("Node 2" if node == 2 else "Leaf 6")
      best, labels, count = expected(node)
      real = browser.evaluate(
        "Array.from(document.querySelectorAll('#node-body .gallery[data-kind=real] figure'))"
        ".map(f => [f.querySelector('img').src, f.querySelector('figcaption').textContent])"
      )
      assert len(real) == len(best) > 0
      for (src, caption), r in zip(real, best):
        assert caption == f"{r['file']} (leaf {r['leaf']}, p={float(r['leaf_probability']):.3f})"
        np.testing.assert_array_equal(_pixels(src), arrays[r["split"]].images[r["index"], ..., 0])
      bars = browser.evaluate(
        "Array.from(document.querySelectorAll('#node-body .bar'))"
        ".map(b => [b.querySelector('.name').textContent, b.lastChild.textContent])"
      )
      assert {name: int(n.split()[0]) for name, n in bars} == labels
      body = browser.evaluate("document.getElementById('node-body').textContent")
      assert f"{count} images, {100 * count / len(rows):.1f}% of the data" in body
      # Generations: per leaf the 8 draws most likely to reach it, round-robin over the leaves.
      leaves = [n for n in TREE.subtree(node) if TREE.is_leaf(n)]
      order = np.argsort(-npz["leaf_probs"], axis=0, kind="stable")
      want = [(order[i, TREE.leaf_index(m)], TREE.leaf_index(m)) for i in range(8) for m in leaves][
        :8
      ]
      for kind, key in (("diffusion", "images"), ("treevae", "vae_images")):
        srcs = browser.evaluate(
          f"Array.from(document.querySelectorAll('#node-body .gallery[data-kind={kind}] img'))"
          ".map(i => i.src)"
        )
        assert len(srcs) == 8
        for src, (i, j) in zip(srcs, want):
          np.testing.assert_array_equal(_pixels(src), npz[key][i, j, ..., 0])
    # Every name shown as text, none run as markup; every image decoded.
    captions = browser.evaluate(
      "document.querySelector('.node[data-node=\"0\"]').dispatchEvent(new MouseEvent('click', "
      "{bubbles: true})); Array.from(document.querySelectorAll('figcaption'))"
      ".map(c => c.textContent).join('\\n')"
    )
    shown = [r["file"] for r in expected(0)[0]]
    assert all(name in captions for name in shown)
    assert browser.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert browser.evaluate(
      "Array.from(document.images).every(i => i.complete && i.naturalWidth === 28)"
    )
    metrics = browser.evaluate("document.getElementById('metrics').textContent")
    assert "test.nmi0.4321" in metrics and "checkpoints.3.fid_gen12.5" in metrics
    browser.screenshot(str(tmp_path / "report.png"))
    assert browser.errors == []
  assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_page_before_sampling_and_without_readable_images_still_opens(tmp_path):
  """No samples.npz yet and the image folder gone: the page says so and shows names only."""
  assert CHROMIUM is not None, "TREE_DIFFUSION_REQUIRE_BROWSER=1 but no chromium on PATH"
  workdir, rows, data_config = _make_run(tmp_path)
  os.remove(os.path.join(RunDir(str(workdir)).samples("sample_all_leaves"), "samples.npz"))
  import shutil

  shutil.rmtree(data_config["folder"])
  shutil.rmtree(data_config["data_dir"])
  html_report.write(str(workdir))
  with Browser(CHROMIUM) as browser:
    browser.open(workdir.joinpath("report.html").as_uri())
    body = browser.evaluate("document.body.textContent")
    assert "The images could not be read" in body
    assert "Generations appear here once python -m launch.sample has run." in body
    assert browser.evaluate("document.querySelectorAll('#node-body figcaption').length") == 12
    assert browser.evaluate("document.querySelectorAll('#node-body img').length") == 0
    assert browser.errors == []
