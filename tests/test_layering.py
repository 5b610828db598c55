"""The package's shape, read from its source (an AST walk, nothing imported): no import circle,
no import of configs/, samplers that know no objective, models that know no data nor torch, and a
training loop whose whole import closure (what it imports, and what that imports, ...) holds
neither the evaluator, the VAE nor Inception."""
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


def _imports(path: str) -> set:
  """Every module a source file imports (any import, at any depth, third-party ones included)."""
  imported = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:  # `from package import submodule` imports the submodule
        submodule = f"{node.module}.{alias.name}"
        imported.add(submodule if _exists(submodule) else node.module)
  return imported


def _sources():
  for directory, _, files in os.walk(PACKAGE):
    yield from (os.path.join(directory, file) for file in files if file.endswith(".py"))


def import_graph() -> dict:
  """{module: set of the kdiff_jax / configs modules it imports} (any import, at any depth)."""
  graph = {}
  for path in _sources():
    module = _module_name(path)
    graph[module] = {name for name in _imports(path)
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


def closure(graph: dict, module: str) -> dict:
  """{every module `module` imports directly or through others: the chain that reaches it}."""
  chains, frontier = {module: [module]}, [module]
  while frontier:
    current = frontier.pop()
    for target in sorted(graph.get(current, ())):
      if target not in chains:
        chains[target] = chains[current] + [target]
        frontier.append(target)
  del chains[module]
  return chains


def test_the_walk_sees_the_package():
  assert {"kdiff_jax.train", "kdiff_jax.sampling", "kdiff_jax.objectives.imm"} <= set(GRAPH)
  assert "kdiff_jax.objectives" in GRAPH["kdiff_jax.sampling"]
  # main.py's training path does reach the evaluators (it hands them to the loop), so a closure
  # that missed them would be seen here.
  assert "kdiff_jax.models.inception" in closure(GRAPH, "kdiff_jax.evaluate")


def test_no_import_circle():
  assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize("rule, violations", [
    ("kdiff_jax imports nothing from configs/",
     lambda m, t: t.split(".")[0] == "configs"),
    ("samplers import no objective (an objective's description assembles its sampler)",
     lambda m, t: m.startswith("kdiff_jax.samplers") and t.startswith("kdiff_jax.objectives")),
    ("objectives read no config.sampling assembly",
     lambda m, t: m.startswith("kdiff_jax.objectives") and t == "kdiff_jax.sampling"),
    ("models import no data",
     lambda m, t: m.startswith("kdiff_jax.models") and t.startswith("kdiff_jax.data")),
    ("models import only models, the rule vocabulary, the sharding helpers, image resizing and "
     "the schedule / parameterization formulas (pMF's network converts its own output)",
     lambda m, t: m.startswith("kdiff_jax.models") and not t.startswith("kdiff_jax.models")
     and t not in ("kdiff_jax.schema", "kdiff_jax.parallel", "kdiff_jax.images",
                   "kdiff_jax.parameterization", "kdiff_jax.schedules")),
], ids=["configs", "samplers-objectives", "objectives-sampling", "models-data", "models-only"])
def test_layering(rule, violations):
  assert _importers(violations) == [], rule


def test_models_know_no_torch():
  """models/ are Flax networks only: no torch, no torch file format, and no torch names (every
  network's torch names and layouts live in export/convert.py, weight files in
  export/weight_files.py)."""
  torch_related = sorted(f"{_module_name(path)} -> {name}" for path in _sources()
                         if _module_name(path).startswith("kdiff_jax.models")
                         for name in _imports(path)
                         if name.split(".")[0] in ("torch", "safetensors") or "torch" in name)
  assert torch_related == []
  sources = [open(path).read() for path in _sources()
             if _module_name(path).startswith("kdiff_jax.models")]
  assert not [name for name in ("def torch_name", "def to_torch", "def from_torch", "TORCH_LEAF")
              if any(name in source for source in sources)]


EVALUATORS = ("kdiff_jax.evaluate", "kdiff_jax.models.vae", "kdiff_jax.models.inception")


@pytest.mark.parametrize("module", ["kdiff_jax.train", "kdiff_jax.train_state", "kdiff_jax.aot"])
def test_the_loop_and_its_state_reach_no_evaluator(module):
  """Nothing the training loop (or the train state that AOT and the importer build) imports,
  at any depth, is the evaluator, the VAE or Inception: the caller hands those actions in."""
  reached = closure(GRAPH, module)
  assert not [" -> ".join(reached[name]) for name in EVALUATORS if name in reached]


@pytest.mark.parametrize("module", ["kdiff_jax.aot", "kdiff_jax.export.checkpoints",
                                    "kdiff_jax.generation"])
def test_tools_do_not_import_the_loop(module):
  """AOT and export build the train state from train_state, sampling draws its images through
  viewing: none of them imports the loop or its actions."""
  assert not {"kdiff_jax.train", "kdiff_jax.actions"} & set(closure(GRAPH, module))
