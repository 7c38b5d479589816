"""The package's shape: no import circle, modules of one idea (about 300 lines or fewer), and
the training loop and the recipe registry independent of the recipes.

Run alone with ``.venv/bin/pytest tests/test_layout.py``. The import graph is read from the
source with ``ast`` (function-level imports included, since a lazy import is still a
dependency), so the check does not depend on import order at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffkit"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, current: str, is_package: bool, level: int) -> str:
    if level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        name = ".".join(base + ([name] if name else []))
    return name


def imports_of(name: str) -> set[str]:
    """The diffkit modules ``name`` imports (``from P import m`` counts m when it is a module)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module or "", name, is_package, node.level)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    # diffkit.checkpoints imports the model classes by name (importlib), which ast cannot see;
    # the train command line imports the recipes at module level
    assert "diffkit.recipes" in GRAPH["diffkit.train.__main__"]
    assert "diffkit.recipes.registry" in GRAPH["diffkit.recipes.ddpm"]


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, f"import circle: {' -> '.join(find_cycle(GRAPH))}"


def test_the_training_loop_and_the_registry_import_no_recipe():
    recipe_modules = {m for m in MODULES if m.startswith("diffkit.recipes")} - {
        "diffkit.recipes.registry"}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for start in ("diffkit.train.loop", "diffkit.train", "diffkit.recipes.registry"):
        assert not reachable(start) & recipe_modules, start


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (split it: one idea per module)"


def test_every_folder_is_a_role():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} \
        == {"adapters", "data", "diffusion", "eval", "latent", "nn", "recipes", "text", "train"}
