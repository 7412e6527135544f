"""The layout shows the architecture, and stays that way (ARCHITECTURE.md).

* no module over 600 lines and no class over 350: a component that grows is
  split into a private subpackage of one-concern files;
* the import graph has no cycles;
* a component imports another only through its public names (the names its
  package exports without a leading underscore), never a private module or a
  private name of it; only the shared primitives may be imported freely.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import atempstore

PACKAGE = Path(atempstore.__file__).parent
#: The shared primitives every component may use, private names included.
SHARED = {"_threads", "_durable", "_paths", "_errors", "_handles", "_flock"}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 350


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def component(module: str) -> str:
    """``atempstore._cache._session`` → ``_cache``; the root package → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(module: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for each import run at import time."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # typing-only imports create no runtime edge
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [alias.name for alias in node.names], node.lineno


def test_no_module_or_class_is_too_big() -> None:
    too_big = []
    for module, path in modules():
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{module}.{node.name}: {size} lines")
    assert too_big == [], "split these into one-concern files:\n" + "\n".join(too_big)


def test_the_import_graph_has_no_cycles() -> None:
    known = dict(modules())
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module, path in known.items():
        for target, names, _line in imports(module, path):
            for candidate in [target, *(f"{target}.{name}" for name in names)]:
                if candidate in known and candidate != module:
                    graph[module].add(candidate)
    # A package's __init__ importing its own submodules is how re-exports
    # work, and a submodule importing a sibling through the package is the
    # same edge seen from below: only cycles among modules count.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if known[nxt].name == "__init__.py" and node.startswith(nxt + "."):
                continue  # a submodule importing its own package's names
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_components_use_each_other_only_through_public_names() -> None:
    crossings = []
    for module, path in modules():
        mine = component(module)
        for target, names, line in imports(module, path):
            if not target.startswith("atempstore"):
                continue
            theirs = component(target)
            if theirs in ("", mine) or theirs in SHARED:
                continue
            depth = len(target.split("."))
            private_module = depth > 2 and any(p.startswith("_") for p in target.split(".")[2:])
            private_names = [n for n in names if n.startswith("_")]
            if private_module or private_names:
                crossings.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} {names}")
    assert crossings == [], "\n".join(crossings)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_primitives_depend_on_no_component(name: str) -> None:
    path = PACKAGE / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{name} is not a module here")
    for target, _names, line in imports(f"atempstore.{name}", path):
        if target.startswith("atempstore."):
            assert component(target) in SHARED, f"{name}.py:{line} imports {target}"
