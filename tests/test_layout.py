"""The layout's two rules, read from the source's imports (every import statement, lazy ones inside functions too):

1. No import circle between project modules.
2. Floors: a module imports only from its own floor or the ones below it,
   services/engine < drafter_db < services/serve < deploy.
   (the decoder knows no database, the databases no Serve, nothing below deploy/ knows a config).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "drafter_db", "deploy")
FLOORS = ("services.engine", "drafter_db", "services.serve", "deploy")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a `from package import name` of a submodule
    counts as importing that submodule)."""
    files = {module_name(root, p): p for package in PACKAGES for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {name for name in names if name in files and name != module}
        graph[module] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor(module: str) -> int | None:
    for level, prefix in enumerate(FLOORS):
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None  # a package's own __init__ (services/__init__.py): documentation only


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
            if floor(module) is not None and floor(target) is not None and floor(target) > floor(module)]


def test_no_import_circle():
    assert circles(import_graph(ROOT)) == []


def test_lower_floors_never_import_higher_ones():
    assert upward_imports(import_graph(ROOT)) == []


def test_every_folder_is_a_package():
    """Code only in packages: a folder without __init__.py would be skipped by setuptools' package list."""
    for package in PACKAGES:
        for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
            if any(folder.glob("*.py")):
                assert (folder / "__init__.py").exists(), f"{folder} holds modules but is not a package"


def test_the_checks_catch_a_planted_circle_and_an_upward_import(tmp_path):
    """The checker itself: a copy of the tree with a circle and an upward import planted."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    tree = tmp_path / "services" / "engine" / "tree.py"
    tree.write_text(tree.read_text() + "\n\ndef _planted():\n    from services.engine import verify  # noqa\n")
    planted = tmp_path / "drafter_db" / "keys.py"
    planted.write_text(planted.read_text() + "\nfrom deploy.config import HierspecConfig  # noqa\n")
    graph = import_graph(tmp_path)
    assert ["services.engine.tree", "services.engine.verify"] in circles(graph)
    assert "drafter_db.keys -> deploy.config" in upward_imports(graph)
