"""The package's shape: imports run one way (no circles; data and models never import each other), and
the data modules keep no mutable state at module level (bookkeeping travels in the batch, by value)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "more_scale"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """more_scale modules `path` imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("more_scale")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("more_scale"):
            for a in node.names:  # `from more_scale.data import cxr` names a module; `... import X` a name in one
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module)
    return found & set(MODULES)


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_no_import_circle():
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_data_and_models_never_import_each_other():
    crossing = [f"{a} imports {b}" for a, deps in GRAPH.items() for b in deps
                if (a.startswith("more_scale.data") and b.startswith("more_scale.models"))
                or (a.startswith("more_scale.models") and b.startswith("more_scale.data"))]
    assert not crossing, crossing


MUTABLE_CALLS = {"Counter", "defaultdict", "dict", "list", "set", "OrderedDict", "deque"}


def test_data_modules_keep_no_mutable_state():
    found = []
    for name, path in MODULES.items():
        if not name.startswith("more_scale.data"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                value = node.value
                call = isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in MUTABLE_CALLS
                if call or isinstance(value, (ast.Dict, ast.List, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
                    found.append(f"{name}:{node.lineno}")
        found += [f"{name}:{n.lineno}: global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not found, f"module-level mutable state: {found}"
