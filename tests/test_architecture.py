"""The layout's rules (README, "Architecture"), checked on the code's own imports.

    shared_models   imports none of the other fedfer packages
    privacy         imports only shared_models
    client, server  never import each other
    simulations     imported only by fedfer/commands (and tests)
    no import cycles between modules

Every `import` counts, also the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedfer", "shared_models", "privacy", "client", "server", "simulations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every fedfer module `path` imports (dotted names, as written)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # `from a.b import c` names module a.b.c if it exists, else a.b: keep the ones that are modules
        graph[name] = {imp for imp in _imports(path) if imp in modules and imp != name}
    return graph


def _package(module: str) -> str:
    return "fedfer.commands" if module.startswith("fedfer.commands") else module.split(".")[0]


def test_packages_import_only_what_the_layout_allows():
    allowed = {
        "shared_models": {"shared_models"},
        "privacy": {"privacy", "shared_models"},
        "client": {"client", "privacy", "shared_models"},
        "server": {"server", "privacy", "shared_models"},
        "simulations": {"simulations", "shared_models", "privacy", "client", "server"},
        "fedfer": {"fedfer"},
        "fedfer.commands": set(PACKAGES) | {"fedfer.commands"},
    }
    broken = sorted(f"{module} imports {target}"
                    for module, targets in _graph().items() for target in targets
                    if _package(target) not in allowed[_package(module)]
                    and not (_package(module) == "fedfer" and _package(target) == "fedfer.commands"))
    assert not broken, "\n".join(broken)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}   # 1 visiting, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_are_checked_on_real_imports():
    # the checker itself must see imports, including lazy ones inside functions
    graph = _graph()
    assert "shared_models.models.registry" in graph["server.run"]
    assert any(t.startswith("simulations") for t in graph["fedfer.commands.simulate"])
