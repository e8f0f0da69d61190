"""The packages of molink import each other without cycles.

Each top-level part (molink/engine, molink/pipeline, molink/cli, ...) is a node; an edge
A -> B means some module of A imports a module of B (lazy imports inside functions count:
they are dependencies too). The graph is read from the source with ``ast``, so nothing is run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "molink"

# Edges that still close a cycle, each with where it sits: models and their config and
# quantized weights remain entangled. Without these two edges the graph must be acyclic.
KNOWN_BACK_EDGES = {
    ("config", "models"),  # ModelConfig.from_hf_dict resolves architecture names
    ("models", "quant"),  # the loader packs quantized groups (molink/models/loading.py)
}


def part_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported_parts(tree: ast.AST) -> set[str]:
    parts = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        parts.update(n.split(".")[1] for n in names if n.startswith("molink."))
    return parts


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE_ROOT.rglob("*.py"):
        if "generated" in path.parts:
            continue
        source = part_of(path)
        graph[source] |= imported_parts(ast.parse(path.read_text(encoding="utf-8"))) - {source}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; returns the components of more than one part."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_strongly_connected_finds_a_three_part_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]


def test_engine_knows_nothing_of_cli_or_pipeline() -> None:
    graph = import_graph()
    assert "cli" not in graph["engine"]
    assert "pipeline" not in graph["engine"]
    assert "pipeline" not in graph["discovery"] or "discovery" not in graph["pipeline"]


def test_no_cycles_between_parts_beyond_the_known_ones() -> None:
    graph = import_graph()
    pruned = {a: {b for b in succ if (a, b) not in KNOWN_BACK_EDGES} for a, succ in graph.items()}
    assert strongly_connected(pruned) == []
