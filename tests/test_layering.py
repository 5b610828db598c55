"""The package's shape, read from its source (an AST walk, nothing imported): no import circle,
no import of configs/, objectives that know no sampler, models that know no data, a trainer
that knows neither the VAE nor Inception."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kdiff_jax")


def _module_name(path: str) -> str:
  name = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _exists(module: str) -> bool:
  path = os.path.join(ROOT, *module.split("."))
  return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def import_graph() -> dict:
  """{module: set of the kdiff_jax / configs modules it imports} (any import, at any depth)."""
  graph = {}
  for directory, _, files in os.walk(PACKAGE):
    for file in files:
      if not file.endswith(".py"):
        continue
      path = os.path.join(directory, file)
      module = _module_name(path)
      imported = set()
      for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
          imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          for alias in node.names:  # `from package import submodule` imports the submodule
            submodule = f"{node.module}.{alias.name}"
            imported.add(submodule if _exists(submodule) else node.module)
      graph[module] = {name for name in imported
                       if name.split(".")[0] in ("kdiff_jax", "configs") and name != module}
  return graph


def find_cycle(graph: dict):
  """One import circle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    state[module] = "done"
    stack.pop()
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


GRAPH = import_graph()


def _importers(condition):
  return sorted(f"{module} -> {target}" for module, targets in GRAPH.items()
                for target in targets if condition(module, target))


def test_the_walk_sees_the_package():
  assert {"kdiff_jax.train", "kdiff_jax.sampling", "kdiff_jax.objectives.imm"} <= set(GRAPH)
  assert "kdiff_jax.objectives" in GRAPH["kdiff_jax.sampling"]


def test_no_import_circle():
  assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("rule, violations", [
    ("kdiff_jax imports nothing from configs/",
     lambda m, t: t.split(".")[0] == "configs"),
    ("objectives import no sampler",
     lambda m, t: m.startswith("kdiff_jax.objectives") and t.startswith("kdiff_jax.samplers")),
    ("objectives read no config.sampling assembly",
     lambda m, t: m.startswith("kdiff_jax.objectives") and t == "kdiff_jax.sampling"),
    ("models import no data",
     lambda m, t: m.startswith("kdiff_jax.models") and t.startswith("kdiff_jax.data")),
    ("models import only models, the rule vocabulary, the sharding helpers and image resizing",
     lambda m, t: m.startswith("kdiff_jax.models") and not t.startswith("kdiff_jax.models")
     and t not in ("kdiff_jax.schema", "kdiff_jax.parallel", "kdiff_jax.images")),
    ("train.py imports neither the VAE nor Inception",
     lambda m, t: m == "kdiff_jax.train" and t in ("kdiff_jax.models.vae",
                                                   "kdiff_jax.models.inception")),
], ids=["configs", "objectives-samplers", "objectives-sampling", "models-data", "models-only",
        "train-vae-inception"])
def test_layering(rule, violations):
  assert _importers(violations) == [], rule
