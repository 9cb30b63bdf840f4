"""The package's layers (docs/architecture.md): no import cycle, and no import from a layer above.

Every import counts, those inside functions included: a function-level import hides a cycle
from Python's import machinery, not from a reader. The imports are read from the source (ast),
so nothing here imports TensorFlow or JAX.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "xception_jax"

# Lowest first: a module may import from its own layer and the layers before it.
LAYERS = ("platform", "model", "data", "weights", "training", "tools")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of a module: its subpackage, or 'tools' for the modules at the package's top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1:] and parts[1] in LAYERS else "tools"


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name`: name is a module when pkg.name is one.
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        targets = imports_of(path, known) - {name}
        # Importing a.b.c runs a/__init__ and a/b/__init__: those are cheap docstrings (checked
        # below) and carry no edges; the edge that matters is to the module itself.
        graph[name] = {t for t in targets if not (found[t].name == "__init__.py" and t != name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state = {}  # module -> 1 while on the DFS stack, 2 when done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "Import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_hidden_in_a_function():
    """The check itself can fail: a cycle through a function-level import is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from xception_jax.training import loop\n")
    assert isinstance(tree.body[0].body[0], ast.ImportFrom)  # what imports_of walks into


def test_every_module_imports_only_its_own_layer_and_those_below():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if rank[layer_of(target)] > rank[layer_of(source)]
    ]
    assert not upward, "Imports from a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_each_layer_is_a_subpackage_with_a_docstring_only_init(layer):
    init = PACKAGE / layer / "__init__.py"
    body = ast.parse(init.read_text()).body
    assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    assert len(body) == 1, f"{init} should hold only its docstring (imports there cost every user)"


def test_the_top_level_holds_only_tools_and_the_public_surface():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    tools = {"aot", "curves", "evaluate", "export", "predict", "prepare_data", "sweep"}
    assert top == tools | {"__init__", "cli"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        LAYERS[:-1]
    )
