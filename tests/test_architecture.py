"""The house stays light: no import cycle between nin's modules, no function too long to read."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nin"
MAX_FUNCTION_LINES = 85


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each nin module and the nin modules it imports (anywhere in the file, type-only too)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module_name(path)] = {m for m in found if m.startswith("nin.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep == node:  # a package importing its own submodules
                continue
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


def test_no_import_cycle() -> None:
    graph = imports()
    assert "nin.train" in graph and "nin.checkpoint" in graph["nin.train"]
    assert cycles(graph) == []
    # The search itself sees a cycle when there is one.
    assert cycles({"nin.a": {"nin.b"}, "nin.b": {"nin.a"}}) == [["nin.a", "nin.b", "nin.a"]]


def test_no_function_too_long_to_read() -> None:
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert long == []
