"""The shape of the package: an import graph without cycles, and functions a reader can hold.

Every import statement counts, also those inside functions (the lazy ones), so that no module
leans on an import order to break a cycle. A `from X import name` is an edge to X.name where
that is a module, else to X. Imports by a computed name (importlib) are not read.
"""

import ast
import pathlib

import pytest

import refusal_kernels

PACKAGE_DIR = pathlib.Path(refusal_kernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}
# Compiled extensions (_C) are modules too, with no imports of their own to read.
EXTENSIONS = {_module_name(path.with_name(path.name.split(".")[0] + ".py")) for path in PACKAGE_DIR.rglob("*.so")}


def _resolved(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolved(module, path.name == "__init__.py", node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in MODULES or submodule in EXTENSIONS else source)
    return {target for target in targets if target in MODULES and target != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle() -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_graph_is_read():
    # A parser that found no edge would pass the cycle test vacuously.
    assert "refusal_kernels._checks" in GRAPH["refusal_kernels.ops"]
    assert "refusal_kernels.quant.int8" in GRAPH["refusal_kernels.backends.torch_reference"]


def test_the_import_graph_has_no_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("leaf", ["refusal_kernels._checks", "refusal_kernels.reference"])
def test_leaf_modules_import_nothing_from_the_package(leaf):
    assert GRAPH[leaf] == set()


# A function a reader can hold: at most a screen of code (its docstring not counted).
MAX_FUNCTION_LINES = 60


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} {node.name} ({_code_lines(node)} lines)"
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, "split these functions:\n" + "\n".join(long)
