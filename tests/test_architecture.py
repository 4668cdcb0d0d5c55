"""Import-layer contract (docs/architecture.md): imports run one way, from a layer to lower layers.

Every module under h3jax/ belongs to one group of one layer (longest prefix in LAYERS wins). A module
may import its own group and any group of a lower layer; groups in the same layer are independent;
nothing imports upward. Package-level imports must have no cycle either. Every import counts:
module-level and function-level (lazy) ones alike, and `import h3jax` / `from h3jax import NAME`
count as imports of the modules the root's lazy table (`h3jax._LAZY`) loads. The one exception is a
module-level `if __name__ == "__main__":` block: it runs only when the module is the program, so its
imports count as those of a `python -m` entry point (the top layer), not of the module's package.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest layer first: {group: module prefixes}.
# `python -m h3jax.<verb>` entry points: shims that call h3jax.cli.<verb>.run().
ENTRY_POINTS = ("h3jax.train.__main__", "h3jax.prepare", "h3jax.generate", "h3jax.export", "h3jax.merge",
                "h3jax.moe", "h3jax.extract_lora", "h3jax.pipeline", "h3jax.evaluate")
LAYERS = (
    {"base": ("h3jax.config", "h3jax.io_atomic", "h3jax.compile_cache", "h3jax.progress", "h3jax.rules",
              "h3jax.hostmem", "h3jax.kernels")},
    {"model": ("h3jax.model",), "data": ("h3jax.data",)},
    {"hf": ("h3jax.hf", "h3jax.checkpoint"), "generation": ("h3jax.generation",)},
    {"merging": ("h3jax.merging",), "fusion": ("h3jax.fusion",)},
    {"train": ("h3jax.train",)},
    {"evaluation": ("h3jax.evaluation",)},
    {"study": ("h3jax.study",)},
    {"cli": ("h3jax.cli", "h3jax.study.__main__")},  # the command lines (the study keeps its own beside it)
    {m.split(".", 1)[1]: (m,) for m in ENTRY_POINTS},  # each entry point its own group
)
MAIN_BLOCK = (len(LAYERS) - 1, "__main__")  # (layer, group) of an `if __name__ == "__main__":` block


def modules(root: pathlib.Path) -> dict:
  """{dotted name: file} of every module under root/h3jax (a package is its __init__.py)."""
  out = {}
  for p in sorted((root / "h3jax").rglob("*.py")):
    parts = p.relative_to(root).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  return out


def lazy_table(mods: dict) -> dict:
  """The root package's `_LAZY` {name: module} (its names load those modules on first access)."""
  for node in ast.parse(mods["h3jax"].read_text()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
      return {k: v[0] for k, v in ast.literal_eval(node.value).items()}
  return {}


def _main_block_nodes(tree: ast.Module) -> set:
  """ids of the nodes inside module-level `if __name__ == "__main__":` blocks."""
  out = set()
  for node in tree.body:
    t = node.test if isinstance(node, ast.If) else None
    if (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
        and len(t.comparators) == 1 and getattr(t.comparators[0], "value", None) == "__main__"):
      out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
  return out


def imports(name: str, path: pathlib.Path, mods: dict, lazy: dict):
  """(line, imported h3jax module, inside a `__main__` block) for every import statement in the file,
  nested ones included."""
  pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
  tree = ast.parse(path.read_text(), str(path))
  main_block = _main_block_nodes(tree)
  for line, target, node in _imports(tree, pkg, mods, lazy):
    yield line, target, id(node) in main_block


def _imports(tree, pkg, mods, lazy):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name == "h3jax":
          yield from ((node.lineno, m, node) for m in sorted(set(lazy.values())))
        elif a.name.startswith("h3jax."):
          yield node.lineno, a.name, node
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
        base = ".".join(up + ([node.module] if node.module else []))
      if base != "h3jax" and not base.startswith("h3jax."):
        continue
      for a in node.names:
        full = f"{base}.{a.name}"
        yield node.lineno, (full if full in mods else lazy[a.name] if base == "h3jax" and a.name in lazy
                            else base), node


def layer_of(module: str):
  """(layer index, group) by the longest matching prefix, or None."""
  best = None
  for i, groups in enumerate(LAYERS):
    for group, prefixes in groups.items():
      for p in prefixes:
        if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
          best = (len(p), i, group)
  return best and best[1:]


def check(root: pathlib.Path):
  """(unassigned modules, layer violations, package cycles), each a list of readable lines."""
  mods = modules(root)
  lazy = lazy_table(mods)
  unassigned = [m for m in mods if m != "h3jax" and layer_of(m) is None]
  bad, edges = [], {}
  for name, path in mods.items():
    if name == "h3jax" or layer_of(name) is None:
      continue  # the root holds no import statements; unassigned modules are reported above
    rel = path.relative_to(root)
    for line, target, in_main in dict.fromkeys(imports(name, path, mods, lazy)):  # one per (statement, module)
      if target == "h3jax" or target == name or layer_of(target) is None:
        continue
      (li, gi), (lt, gt) = (MAIN_BLOCK if in_main else layer_of(name)), layer_of(target)
      why = ("an upward import" if lt > li else
             "groups in one layer are independent" if lt == li and gt != gi else None)
      if why:
        bad.append(f"{rel}:{line}: {name} ({gi}, layer {li}) imports {target} ({gt}, layer {lt}): {why}")
      src, dst = _package(name, mods), _package(target, mods)
      if src != dst and not in_main:  # a `__main__` block is no import-time dependency of its package
        edges.setdefault(src, {}).setdefault(dst, f"{rel}:{line} imports {target}")
  return unassigned, bad, _cycles(edges)


def _package(module: str, mods: dict) -> str:
  """The package a module lives in (a top-level module counts as its own package)."""
  parent = module.rpartition(".")[0]
  if module in mods and mods[module].name == "__init__.py" or parent == "h3jax":
    return module
  return parent


def _cycles(edges: dict) -> list:
  """One line per cycle found by depth-first search, naming an import for each hop."""
  out, state, stack = [], {}, []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in edges.get(u, {}):
      if state.get(v) == "open":
        hops = stack[stack.index(v):] + [v]
        out.append(" -> ".join(hops) + "  (" + "; ".join(edges[a][b] for a, b in zip(hops, hops[1:])) + ")")
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = "done"

  for u in sorted(edges):
    if u not in state:
      visit(u)
  return out


def test_every_module_has_a_layer():
  unassigned, _, _ = check(REPO)
  assert not unassigned, (f"modules missing from the layer table in {__file__} (and docs/architecture.md): "
                          f"{unassigned}")


def test_imports_run_one_way():
  _, bad, _ = check(REPO)
  assert not bad, "imports against the layer contract (docs/architecture.md):\n" + "\n".join(bad)


def test_no_package_level_cycles():
  _, _, cycles = check(REPO)
  assert not cycles, "package-level import cycles:\n" + "\n".join(cycles)


def test_checker_reports_planted_violations(tmp_path):
  files = {
      "__init__.py": '_LAZY = {"save_pretrained": ("h3jax.hf.export", "save_pretrained")}\n',
      "config.py": "",
      "model/__init__.py": "",
      "model/llama.py": "from h3jax import config\n\ndef f():\n  from h3jax.train import loop\n",
      "model/params.py": "def g():\n  import h3jax\n",
      "hf/__init__.py": "",
      "hf/export.py": "from .. import config\nfrom . import keymap\n",
      "hf/keymap.py": "",
      "train/__init__.py": "",
      "train/loop.py": "from h3jax.model import llama\nfrom h3jax.fusion import x\n",
      "fusion.py": "from h3jax.merging import tree\n",
      "merging/__init__.py": "",
      "merging/tree.py": "from h3jax import save_pretrained\n",
      "unlisted.py": "",
  }
  for rel, text in files.items():
    (tmp_path / "h3jax" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "h3jax" / rel).write_text(text)
  unassigned, bad, cycles = check(tmp_path)
  assert unassigned == ["h3jax.unlisted"]
  assert bad == [
      "h3jax/fusion.py:1: h3jax.fusion (fusion, layer 3) imports h3jax.merging.tree (merging, layer 3): "
      "groups in one layer are independent",
      "h3jax/model/llama.py:4: h3jax.model.llama (model, layer 1) imports h3jax.train.loop (train, layer 4): "
      "an upward import",
      "h3jax/model/params.py:2: h3jax.model.params (model, layer 1) imports h3jax.hf.export (hf, layer 2): "
      "an upward import",
  ]
  assert cycles == ["h3jax.model -> h3jax.train -> h3jax.model  (h3jax/model/llama.py:4 imports "
                    "h3jax.train.loop; h3jax/train/loop.py:1 imports h3jax.model.llama)"]


def test_main_block_imports_count_as_an_entry_point(tmp_path):
  files = {
      "__init__.py": "",
      "config.py": "",
      "cli/__init__.py": "",
      "cli/tool.py": "from h3jax.evaluation import runner\n",
      "evaluation/__init__.py": "",
      "evaluation/runner.py": ('from h3jax import config\n\nif __name__ == "__main__":\n'
                               '  from h3jax.cli import tool\n  tool.run()\n'),
      "data/__init__.py": "",
      "data/sources.py": "def f():\n  from h3jax.cli import tool\n",
  }
  for rel, text in files.items():
    (tmp_path / "h3jax" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "h3jax" / rel).write_text(text)
  unassigned, bad, cycles = check(tmp_path)
  assert unassigned == [] and cycles == []  # the __main__ block adds no package edge evaluation -> cli
  assert bad == ["h3jax/data/sources.py:2: h3jax.data.sources (data, layer 1) imports "
                 f"h3jax.cli.tool (cli, layer {len(LAYERS) - 2}): an upward import"]


@pytest.mark.parametrize("module, layer", [("h3jax.train.__main__", len(LAYERS) - 1), ("h3jax.train.loop", 4),
                                           ("h3jax.fusion.losses", 3), ("h3jax.hf.refs", 2),
                                           ("h3jax.cli.merge", len(LAYERS) - 2),
                                           ("h3jax.study.__main__", len(LAYERS) - 2), ("h3jax.merge", len(LAYERS) - 1)])
def test_longest_prefix_decides_the_layer(module, layer):
  assert layer_of(module)[0] == layer
