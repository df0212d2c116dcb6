"""No module imports from a layer above it.

Layers, bottom to top: errors/fileio/console -> models -> data -> distribute
-> training -> serving/pretrain -> runner.py, config.py, scripts/.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    "leo_suite.errors": 0, "leo_suite.fileio": 0, "leo_suite.console": 0,
    "leo_suite.models": 1, "leo_suite.data": 2, "leo_suite.distribute": 3,
    "leo_suite.training": 4, "leo_suite.serving": 5, "leo_suite.pretrain": 5,
}


def layer_of(module):
  for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
    if module == prefix or module.startswith(prefix + "."):
      return layer
  return None


def imported_modules(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        yield f"{node.module}.{alias.name}"


def test_no_module_imports_upward():
  violations = []
  for root, _, files in os.walk(os.path.join(REPO, "leo_suite")):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
      own = layer_of(module.removesuffix(".__init__"))
      if own is None:
        continue
      for target in imported_modules(path):
        other = layer_of(target)
        if other is not None and other > own:
          violations.append(f"{module} (layer {own}) imports {target} (layer {other})")
      assert "config" not in {t.split(".")[0] for t in imported_modules(path)}, module
  assert not violations, "\n".join(violations)
