"""The tree shows the architecture, and imports never run back up it.

format layer (``paligemma``) -> engines (``service.engines``) -> HTTP app (``service.api``, ``service.guards``,
``service.app``); ``finetune`` uses the format layer and the engines, never the HTTP app. Inside ``finetune``:
``config``/``options`` -> ``data`` -> ``evaluation`` -> ``training`` -> ``recipes`` (``__main__`` on top). And no
modules import each other in a circle, at the top of a file or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "paligemma": ("service", "finetune"),
    "service/engines": ("service.api", "service.guards", "service.app", "service.deps", "finetune"),
    "service/guards": ("service.api", "service.app", "finetune"),
    "finetune": ("service.api", "service.guards", "service.app", "service.deps"),
}


def _imports(path: Path) -> set[str]:
    """Every absolute import of ``path``, at the top or inside a function; ``from pkg import name`` gives both
    ``pkg`` and ``pkg.name`` (``name`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_back_up(layer: str) -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / layer).rglob("*.py"))
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])
    ]
    assert bad == []


FINETUNE_ROOMS = ("finetune.data", "finetune.evaluation", "finetune.training", "finetune.recipes")
"""Each room may import those before it, never those after."""
PACKAGES = ("paligemma", "service", "finetune")


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> int | None:
    """The index of ``module``'s room (``len(FINETUNE_ROOMS)`` for ``__main__``), None for config/options."""
    if module == "finetune.__main__":
        return len(FINETUNE_ROOMS)
    return next((i for i, room in enumerate(FINETUNE_ROOMS) if module == room or module.startswith(room + ".")), None)


def test_finetune_rooms_import_only_rooms_before_them() -> None:
    bad = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        mine = _room(_module_name(path))
        for name in _imports(path):
            theirs = _room(name) if name.startswith("finetune.") else None
            if theirs is not None and (mine is None or theirs > mine):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert bad == []


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import module`` counts as importing the module)."""
    files = {_module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other in a circle (strongly connected components above one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_a_circle_is_found(tmp_path: Path) -> None:
    """The check itself: two modules importing each other (one inside a function) are a circle."""
    (tmp_path / "finetune" / "room").mkdir(parents=True)
    (tmp_path / "finetune" / "__init__.py").write_text("")
    (tmp_path / "finetune" / "room" / "__init__.py").write_text("")
    (tmp_path / "finetune" / "room" / "a.py").write_text("from finetune.room import b\n")
    (tmp_path / "finetune" / "room" / "b.py").write_text("def f():\n    from finetune.room.a import g\n")
    (tmp_path / "finetune" / "c.py").write_text("import finetune.room.a\n")
    for package in ("paligemma", "service"):
        (tmp_path / package).mkdir()
    assert circles(import_graph(tmp_path)) == [["finetune.room.a", "finetune.room.b"]]
