"""The import layering of leo_suite (issue 28): imports point only downwards.

    base      leo_suite/*.py (errors, fileio, console, progress, ...)
    data      leo_suite/data/
    models    leo_suite/models/
    training  leo_suite/training/, leo_suite/distribute.py
    pretrain  leo_suite/pretrain/  } siblings: neither imports the other
    serving   leo_suite/serving/   }
    bench     leo_suite/bench/      } siblings: whole jobs built on everything below
    pipelines leo_suite/pipelines/  }
    entry     runner.py, config.py, scripts/, experiments/ (never imported by leo_suite)

Every import of every module counts, including those inside functions (an
in-function import still runs, and hiding an upward arrow there hides a
cycle). Modules are also held to at most `MAX_LINES` lines.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "leo_suite")
MAX_LINES = 400
# Rank of each layer; equal ranks are siblings, which may not import each other.
LAYERS = {"base": 0, "data": 1, "models": 2, "training": 3, "pretrain": 4, "serving": 4,
          "bench": 5, "pipelines": 5}
TRAINING_AT_TOP_LEVEL = {"leo_suite.distribute"}
ENTRY_POINTS = {"runner", "config", "scripts", "experiments"}


def module_files(root=ROOT):
  """{dotted module name: path} of every .py file under `root`."""
  modules = {}
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, os.path.dirname(root))[:-len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        modules[".".join(parts)] = path
  return modules


def layer_of(module):
  """The layer name of a leo_suite module; KeyError names an unplaced package."""
  parts = module.split(".")
  if module in TRAINING_AT_TOP_LEVEL:
    return "training"
  if len(parts) <= 2 and not (len(parts) == 2 and parts[1] in LAYERS):
    return "base"    # leo_suite itself and its top-level modules
  if parts[1] not in LAYERS:
    raise KeyError(f"{module}: leo_suite/{parts[1]}/ is in no layer; add it to LAYERS")
  return parts[1]


def imports_of(path, module, modules):
  """[(line, imported leo_suite module)] for every import statement in `path`."""
  with open(path, encoding="utf-8") as handle:
    tree = ast.parse(handle.read(), path)
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import name`: the submodule pkg.name if there is one, else pkg.
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]   # `import leo_suite.x.y as z` -> longest known
      if target in modules and target != module:
        found.append((node.lineno, target))
  return found


def import_graph(root=ROOT):
  """{module: {imported module: first line}} over leo_suite."""
  modules = module_files(root)
  graph = {}
  for module, path in modules.items():
    edges = graph.setdefault(module, {})
    for line, target in imports_of(path, module, modules):
      edges.setdefault(target, line)
  return graph


def cycles(graph):
  """Strongly connected components with more than one module (Tarjan), sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(graph.get(node, ())):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(found)


def upward_imports(graph):
  """['a (layer) -> b (layer), line n'] for imports to a higher layer or a sibling."""
  bad = []
  for module, edges in sorted(graph.items()):
    here = layer_of(module)
    for target, line in sorted(edges.items()):
      there = layer_of(target)
      if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != here):
        bad.append(f"{module} ({here}) -> {target} ({there}), line {line}")
  return bad


def entry_point_imports(root=ROOT):
  """['module imports name, line n'] for imports of the top-level entry points."""
  found = []
  for module, path in sorted(module_files(root).items()):
    with open(path, encoding="utf-8") as handle:
      tree = ast.parse(handle.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or ""]
      else:
        continue
      found += [f"{module} imports {name}, line {node.lineno}" for name in names
                if name.split(".")[0] in ENTRY_POINTS]
  return found


# -- the checks themselves on small known graphs ---------------------------------------
def test_cycles_finds_exactly_the_strongly_connected_modules():
  graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {},
           "e": {"f": 1}, "f": {"e": 1}, "g": {"a": 1}}
  assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]
  assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


def test_upward_imports_flags_higher_layers_and_siblings_only():
  graph = {
      "leo_suite.fileio": {"leo_suite.data.embeddings": 3},             # base -> data
      "leo_suite.data.episodes": {"leo_suite.errors": 1},                # fine
      "leo_suite.models.base": {"leo_suite.data.episodes": 2},           # fine
      "leo_suite.training.run": {"leo_suite.distribute": 4},             # same layer
      "leo_suite.distribute": {"leo_suite.serving.export": 5},           # training -> serving
      "leo_suite.serving.sets": {"leo_suite.pretrain.extract": 6},       # sibling
      "leo_suite.bench.timing": {"leo_suite.serving.export": 7},         # fine
  }
  assert upward_imports(graph) == [
      "leo_suite.distribute (training) -> leo_suite.serving.export (serving), line 5",
      "leo_suite.fileio (base) -> leo_suite.data.embeddings (data), line 3",
      "leo_suite.serving.sets (serving) -> leo_suite.pretrain.extract (pretrain), line 6",
  ]


def test_in_function_and_relative_imports_are_counted(tmp_path):
  package = tmp_path / "leo_suite"
  (package / "data").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "errors.py").write_text("")
  (package / "data" / "__init__.py").write_text("")
  (package / "data" / "a.py").write_text(
      "def f():\n  from leo_suite.data import b\n  from .. import errors\n")
  (package / "data" / "b.py").write_text("import leo_suite.data.a as a\n\n\ndef g():\n"
                                          "  import config\n")
  graph = import_graph(str(package))
  assert graph["leo_suite.data.a"] == {"leo_suite.data.b": 2, "leo_suite.errors": 3}
  assert cycles(graph) == [["leo_suite.data.a", "leo_suite.data.b"]]
  assert entry_point_imports(str(package)) == ["leo_suite.data.b imports config, line 5"]


def test_every_module_has_a_layer():
  assert {layer_of(m) for m in import_graph()} <= set(LAYERS)
  assert layer_of("leo_suite.progress") == "base"
  assert layer_of("leo_suite.distribute") == "training"
  with pytest.raises(KeyError, match="leo_suite/nowhere/"):
    layer_of("leo_suite.nowhere.x")


# -- the package ------------------------------------------------------------------------
def test_no_import_cycles():
  assert cycles(import_graph()) == []


def test_imports_point_only_down_the_layers():
  assert upward_imports(import_graph()) == []


def test_no_module_imports_the_entry_points():
  assert entry_point_imports() == []


def test_no_module_exceeds_the_line_limit():
  too_long = {}
  for module, path in module_files().items():
    with open(path, encoding="utf-8") as handle:
      count = len(handle.read().splitlines())
    if count > MAX_LINES:
      too_long[os.path.relpath(path, os.path.dirname(ROOT))] = count
  assert too_long == {}
