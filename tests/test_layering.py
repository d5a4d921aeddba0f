"""The library's import layering: base modules → treevae → diffusion → eval, a
``train`` module imported only by launchers and the benchmark, nothing importing ``launch`` or
``configs``. The back-edges that exist are listed; a new one fails, and so does a listed one that
is gone (remove it from the list)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tree_diffusion")
LAYERS = {"": 0, "treevae": 1, "diffusion": 2, "eval": 3}   # "": the base modules at the top
# Library modules above every layer: the benchmark (it measures all of them), a trained run as
# one object and the page that shows it (they use both stages' outputs), and the package's
# __init__, which hands out load_run.
TOP = ("benchmark", "trained", "html_report", "__init__")

# (importer, imported) pairs that break the layering today.
KNOWN_BACK_EDGES = {
    ("checkpoint", "treevae.model"),
    ("treevae.train", "eval.clustering"),
}


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield (name[:-len(".__init__")] if name.endswith(".__init__") else name), path


def _imports(path, known):
  """The tree_diffusion modules (names relative to the package) and other top-level packages
  that ``path`` imports."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:   # `from tree_diffusion.x import y`: y may be a module of x
        full = f"{node.module}.{a.name}"
        out.add(full if full.removeprefix("tree_diffusion.") in known else node.module)
  return {m.removeprefix("tree_diffusion.") if m.startswith("tree_diffusion.") else "!" + m
          for m in out if m != "tree_diffusion"}


def _layer(module):
  if module in TOP:
    return len(LAYERS)
  top = module.split(".")[0]
  return LAYERS[top if top in LAYERS and "." in module else ""]


def test_imports_follow_the_layering():
  modules = dict(_modules())
  edges = {(m, i) for m, path in modules.items() for i in _imports(path, modules)}
  foreign = {(m, i[1:]) for m, i in edges if i.startswith("!") and
             i[1:].split(".")[0] in ("launch", "configs")}
  assert not foreign, f"the library imports launchers or configs: {sorted(foreign)}"
  edges = {(m, i) for m, i in edges if not i.startswith("!") and i in modules}
  back = {(m, i) for m, i in edges
          if _layer(i) > _layer(m) or (i.endswith(".train") and m not in TOP)}
  assert back - KNOWN_BACK_EDGES == set(), f"new back-edges: {sorted(back - KNOWN_BACK_EDGES)}"
  assert KNOWN_BACK_EDGES - back == set(), (
      f"gone (remove from KNOWN_BACK_EDGES): {sorted(KNOWN_BACK_EDGES - back)}")
