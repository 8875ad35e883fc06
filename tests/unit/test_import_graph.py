"""The shape of the import graph over adapter/, core/ and tools/: no cycle (type-only imports
included), and nothing below the handlers reaches up into ``adapter/matrix/handlers/``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = "adapter.matrix.handlers"
# The wiring at the top: it hands the handlers to the dispatcher.
ALLOWED_TO_IMPORT_HANDLERS = {"adapter.matrix.bot"}


def module_name(path: Path) -> str:
    """A file's module name. The tools run with tools/ on ``sys.path``, so their modules
    import each other by their name under tools/ (``reset_tool.plan``, ``homeserver``)."""
    rel = path.relative_to(ROOT / "tools" if path.is_relative_to(ROOT / "tools") else ROOT)
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for top in ("adapter", "core", "tools")
            for path in sorted((ROOT / top).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            target = target.removeprefix("tools.")
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_tree():
    edges = graph()
    assert "adapter.matrix.chain.command_table" in edges["adapter.matrix.chain.middlewares"]
    assert "reset_tool.plan" in edges["reset_local"]


def test_no_import_cycle_among_adapter_core_and_tools():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_handlers_imports_them():
    reaching_up = {name for name, targets in graph().items()
                   if not (name == HANDLERS or name.startswith(HANDLERS + "."))
                   and name not in ALLOWED_TO_IMPORT_HANDLERS
                   and any(t == HANDLERS or t.startswith(HANDLERS + ".") for t in targets)}
    assert reaching_up == set()
