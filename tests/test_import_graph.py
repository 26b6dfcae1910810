"""The import graph of csref_model, read from the source with `ast`: no cycles, no imports of our
own modules hidden inside functions, and nothing from csref_ros or csref_training."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "csref_model"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def read_graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> csref_model modules it imports, imports inside functions, imports of other packages of ours)."""
    sources = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph, in_functions, foreign = {}, [], []
    for name, path in sources.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        graph[name] = set()
        for node in ast.walk(tree):
            for target in imported_modules(node):
                if target.split(".")[0] in ("csref_ros", "csref_training"):
                    foreign.append(f"{name} imports {target}")
                if target in sources and target != name:
                    graph[name].add(target)
                    if id(node) not in top_level:
                        in_functions.append(f"{name} imports {target} inside a function or block")
    return graph, in_functions, foreign


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_csref_model_has_no_import_cycle_and_no_hidden_imports():
    graph, in_functions, foreign = read_graph()
    assert "csref_model.runtime.contract" in graph and graph["csref_model.srec"]  # the scan sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert not in_functions, in_functions
    assert not foreign, foreign


def test_the_scan_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
