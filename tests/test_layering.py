"""The import layering: base modules → treevae → diffusion → eval → the benchmark and the package's
``__init__``; a ``train`` module imported only by launchers, nothing in the library importing
``launch`` or ``configs``;
launchers share only ``launch/common.py``, and config files import no code that touches jax. The
back-edges that exist are listed; a new one fails, and so does a listed one that is gone (remove
it from the list)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tree_diffusion")
LAYERS = {"": 0, "treevae": 1, "diffusion": 2, "eval": 3}  # "": the base modules at the top
# Library modules above every layer: the benchmark (it measures all of them, from their step
# modules, not their ``train`` modules) and the package's __init__, which hands out load_run.
TOP = ("benchmark", "__init__")

# (importer, imported) pairs that break the layering today.
KNOWN_BACK_EDGES = set()


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield (name[: -len(".__init__")] if name.endswith(".__init__") else name), path


def _imports(path, known):
  """The tree_diffusion modules (names relative to the package) and other top-level packages
  that ``path`` imports."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:  # `from tree_diffusion.x import y`: y may be a module of x
        full = f"{node.module}.{a.name}"
        out.add(full if full.removeprefix("tree_diffusion.") in known else node.module)
  return {
    m.removeprefix("tree_diffusion.") if m.startswith("tree_diffusion.") else "!" + m
    for m in out
    if m != "tree_diffusion"
  }


def _layer(module):
  if module in TOP:
    return len(LAYERS)
  # A package's own __init__ ("eval") is in its package's layer, as its modules are.
  top = module.split(".")[0]
  return LAYERS[top if top in LAYERS else ""]


def test_imports_follow_the_layering():
  modules = dict(_modules())
  edges = {(m, i) for m, path in modules.items() for i in _imports(path, modules)}
  foreign = {
    (m, i[1:])
    for m, i in edges
    if i.startswith("!") and i[1:].split(".")[0] in ("launch", "configs")
  }
  assert not foreign, f"the library imports launchers or configs: {sorted(foreign)}"
  edges = {(m, i) for m, i in edges if not i.startswith("!") and i in modules}
  back = {(m, i) for m, i in edges if _layer(i) > _layer(m) or i.endswith(".train")}
  assert back - KNOWN_BACK_EDGES == set(), f"new back-edges: {sorted(back - KNOWN_BACK_EDGES)}"
  assert KNOWN_BACK_EDGES - back == set(), (
    f"gone (remove from KNOWN_BACK_EDGES): {sorted(KNOWN_BACK_EDGES - back)}"
  )


def test_no_module_imports_its_own_package():
  """A package's ``__init__`` gathers its modules (``data/__init__`` builds the registry from the
  dataset modules' ``SOURCES``), so a module importing its own package back would be a cycle."""
  modules = dict(_modules())
  packages = {m for m, path in modules.items() if path.endswith("__init__.py")}
  cycles = sorted(
    (m, m.rsplit(".", 1)[0])
    for m, path in modules.items()
    if "." in m
    and m.rsplit(".", 1)[0] in packages
    and not path.endswith("__init__.py")
    and m.rsplit(".", 1)[0] in _imports(path, modules)
  )
  assert not cycles, f"modules importing their own package: {cycles}"


# What the config files may import from the library: plain values and paths, nothing that
# configures or imports jax (a config is read before the launcher sets jax up).
CONFIG_IMPORTS = {"errors", "files", "runs"}


def _package_imports(package):
  """``{file name: dotted names it imports}`` of the top-level ``package`` folder (``launch``,
  ``configs``); ``from a import b`` counts as ``a.b``."""
  folder = os.path.join(os.path.dirname(ROOT), package)
  out = {}
  for f in sorted(os.listdir(folder)):
    if not f.endswith(".py") or f == "__init__.py":
      continue
    names = set()
    for node in ast.walk(ast.parse(open(os.path.join(folder, f)).read())):
      if isinstance(node, ast.Import):
        names.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names.update(f"{node.module}.{a.name}" for a in node.names)
    out[f[:-3]] = names
  return out


def _library_modules(names):
  """The library modules among dotted import names (``tree_diffusion.treevae.export.X`` →
  ``treevae.export``)."""
  library = dict(_modules())
  found = set()
  for n in names:
    parts = n.split(".")
    if parts[0] != "tree_diffusion":
      continue
    for k in range(len(parts), 1, -1):
      if ".".join(parts[1:k]) in library:
        found.add(".".join(parts[1:k]))
        break
  return found


def test_launchers_share_only_launch_common_and_configs_import_no_jax_code():
  for name, imports in _package_imports("launch").items():
    others = {i for i in imports if i.startswith("launch.")} - {"launch.common"}
    assert not others, f"launch/{name}.py imports another launcher: {sorted(others)}"
    # configs.run reads a run's recorded config (what sample.py and evaluate.py use by default).
    configs = {i for i in imports if i.startswith("configs.")} - {"configs.common", "configs.run"}
    assert not configs, f"launch/{name}.py imports a config file (pass it as --config): {configs}"
  for name, imports in _package_imports("configs").items():
    used = _library_modules(imports)
    assert used <= CONFIG_IMPORTS, (
      f"configs/{name}.py imports library modules beyond {sorted(CONFIG_IMPORTS)}: "
      f"{sorted(used - CONFIG_IMPORTS)}"
    )
    assert not {i for i in imports if i.startswith("launch")}, f"configs/{name}.py imports launch"
