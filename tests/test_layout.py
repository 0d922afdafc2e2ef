"""The tree shows the architecture, and imports never run back up it.

format layer (``paligemma``) -> engines (``service.engines``) -> HTTP app (``service.api``, ``service.guards``,
``service.app``); ``finetune`` uses the format layer and the engines, never the HTTP app.
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
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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
