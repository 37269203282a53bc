"""The import contract of ranger-ps, checked on every ``make lint``.

The layers of the library, from the edge down; a module may import from its own layer's package
and from any layer below it, never from above. Packages on one line are siblings that do not
import each other. ``ranger_ps.server`` and ``ranger_ps.worker`` (the applications, installed from
the top-level ``server/`` and ``worker/`` folders) may import the library, but only the CLI imports
them, and neither imports the other. There are no import cycles between modules. The algorithm
imports no gRPC, protobuf or asyncio.

Every import counts: at module level, inside functions (lazy imports) and under ``TYPE_CHECKING``.
This is a plain AST walk rather than import-linter because the applications install under the
library's name through a package-dir mapping, which import-linter's module discovery cannot see.

Usage: ``python .ci/check_imports.py`` (exit 1 and one line per broken rule).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Folders and the package names they install as.
SOURCES = {"ranger_ps": ROOT / "ranger_ps", "ranger_ps.server": ROOT / "server", "ranger_ps.worker": ROOT / "worker"}

ENTRY = ("ranger_ps", "ranger_ps.__main__")
"""The package root (lazy re-exports) and ``python -m ranger_ps``: above every layer."""

EXAMPLES = "ranger_ps.examples"
"""Scripts written as a user writes them: above every layer (they import the package root, as users
do); nothing imports them."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("ranger_ps.cli",),
    ("ranger_ps.server", "ranger_ps.worker"),
    ("ranger_ps.bench",),
    ("ranger_ps.orchestration",),
    ("ranger_ps.workloads",),
    ("ranger_ps.optim",),
    ("ranger_ps.observability",),
    ("ranger_ps.client",),
    ("ranger_ps.config",),
    ("ranger_ps.wire", "ranger_ps.storage"),
    ("ranger_ps.algorithm",),
    ("ranger_ps.settings", "ranger_ps.errors", "ranger_ps.files", "ranger_ps.version"),
)
"""From the edge down. The applications sit just under the CLI: only the CLI imports them."""

FORBIDDEN_EXTERNAL = {"ranger_ps.algorithm": ("grpc", "google.protobuf", "asyncio", "grpc_health")}


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *parts])


def discover() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "_proto" in path.parts:
                continue
            modules[module_name(package, folder, path)] = path
    return modules


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in a file; ``from a import b`` is ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return index
    return None


def package_of(module: str) -> str | None:
    for layer in LAYERS:
        for p in layer:
            if module == p or module.startswith(p + "."):
                return p
    return None


def check() -> list[str]:
    modules = discover()
    known = set(modules)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        where = f"{path.relative_to(ROOT)}"
        user_code = name == EXAMPLES or name.startswith(EXAMPLES + ".")
        if name not in ENTRY and not user_code and layer_of(name) is None:
            problems.append(f"{where}: {name} is in no layer of the contract")
        for target, line in imports(name, path, known):
            for package, banned in FORBIDDEN_EXTERNAL.items():
                if name.startswith(package) and any(target == b or target.startswith(b + ".") for b in banned):
                    problems.append(f"{where}:{line}: {package} must not import {target}")
            if not (target == "ranger_ps" or target.startswith("ranger_ps.")):
                continue
            resolved = target
            while resolved not in known and "." in resolved:
                resolved = resolved.rsplit(".", 1)[0]
            if resolved not in known:
                problems.append(f"{where}:{line}: imports {target}, which does not exist")
                continue
            if resolved != name:
                graph[name].add(resolved)
            if resolved == EXAMPLES or resolved.startswith(EXAMPLES + "."):
                if not user_code:
                    problems.append(f"{where}:{line}: imports the examples {resolved} (user code; nothing imports it)")
                continue
            if name in ENTRY or user_code:
                continue
            if resolved in ENTRY:
                problems.append(f"{where}:{line}: imports the package root {resolved} (import the module itself)")
                continue
            mine, theirs = layer_of(name), layer_of(resolved)
            if mine is None or theirs is None:
                continue  # reported for the module itself
            own, other = package_of(name), package_of(resolved)
            if theirs < mine:
                problems.append(f"{where}:{line}: {own} (lower layer) imports {other} (higher layer): {resolved}")
            elif theirs == mine and own != other:
                problems.append(f"{where}:{line}: siblings {own} and {other} must not import each other")
    problems = list(dict.fromkeys(problems))  # one line per broken rule, not per imported name
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} import contract violations (see .ci/check_imports.py)")
        return 1
    print(f"import contract kept ({len(discover())} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
