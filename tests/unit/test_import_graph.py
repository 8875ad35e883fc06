"""The shape of the import graph over adapter/, core/ and tools/: the layers of SPEC §2, where
no module imports one above its own (type-only imports included), and no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
M = "adapter.matrix"
# An event's way through the bot, top to bottom. A module may import its own layer and those
# below it, never one above. Each entry is a package or module prefix.
LAYERS: list[tuple[str, ...]] = [
    (f"{M}.__main__", f"{M}.run", f"{M}.bot", f"{M}.modes"),  # the wiring
    (f"{M}.handlers",),
    (f"{M}.chain",),  # the dispatcher, its links, what they hand the handlers
    (f"{M}.healing", f"{M}.conversation"),
    (f"{M}.delivery",),  # the inbox and the lanes
    (f"{M}.ingest",),  # every way in: sync, sweep, catch-up
    (f"{M}.homeserver",),  # the client: one method per request, the session
    (f"{M}.store",),  # the typed records
    (f"{M}.vocabulary",),  # io.lambda.* keys, markers, message content
    (f"{M}.observe", f"{M}.config"),  # metrics, health, configuration: used at every level
    ("core",),  # knows nothing of Matrix
]


def module_name(path: Path) -> str:
    """A file's module name. The tools run with tools/ on ``sys.path``, so their modules
    import each other by their name under tools/ (``reset_tool.plan``, ``homeserver``)."""
    rel = path.relative_to(ROOT / "tools" if path.is_relative_to(ROOT / "tools") else ROOT)
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for top in ("adapter", "core", "tools")
        for path in sorted((ROOT / top).rglob("*.py"))
    }


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
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
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


def layer_of(module: str) -> int | None:
    """The index of the layer ``module`` belongs to (0 is the top); None outside the layers
    (tools, tests, the ``adapter`` packages themselves)."""
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (name, target)
        for name, targets in edges.items()
        for target in targets
        if (own := layer_of(name)) is not None and (up := layer_of(target)) is not None and up < own
    )


def test_every_adapter_and_core_module_has_a_layer():
    unplaced = [
        name
        for name in graph()
        if name.startswith(("adapter.matrix.", "core.")) and layer_of(name) is None
    ]
    assert unplaced == []


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(graph()) == []


def test_an_upward_import_is_found():
    edges = {f"{M}.ingest.sync": {f"{M}.delivery.inbox"}, f"{M}.delivery.inbox": {"core.store"}}
    assert upward_imports(edges) == [(f"{M}.ingest.sync", f"{M}.delivery.inbox")]
