"""The import graph stays a ladder: no cycles, and no library module climbs up to a CLI.

A cycle means neither module can be read, tested or imported alone, and the order of
imports decides whether a name exists yet. A library module importing a CLI module drags
click and every command into code that a script or a worker process imports. The graph is
read with :mod:`ast` (nothing is imported): imports at module level and inside functions
both count, imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("featurestore", "extract", "recommend", "eval", "data")
CLI_DECORATORS = ("command", "group")
# Modules of the CLIs' own conventions (options, error printing, ``--config``), above every library module.
CLI_SUPPORT = ("featurestore.cliutil", "featurestore.configfile", "recommend.cli_options")  # click helpers of the CLIs


@dataclass
class Module:
    """One project module: where it is, what it imports (name -> first line) and whether it is a CLI
    (it defines a click command, is a ``__main__`` or holds the CLIs' conventions)."""

    name: str
    path: Path
    imports: dict[str, int] = field(default_factory=dict)
    cli: bool = False


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        children = node.orelse if _type_checking(node) else ast.iter_child_nodes(node)
        stack.extend(children)


def _defines_command(node: ast.AST) -> bool:
    """A function decorated ``@x.command(...)`` / ``@x.group(...)``: the mark of a click CLI module."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in CLI_DECORATORS:
            return True
    return False


def _targets(node: ast.AST, module: Module, known: set[str]) -> list[str]:
    """The project modules an import statement names (``from pkg import module`` names the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    names = [f"{source}.{alias.name}" for alias in node.names]
    return [name for name in names if name in known] or [source]


def _project_module(name: str, known: set[str]) -> str | None:
    """``name`` or its nearest enclosing project module (``import a.b.c`` of a non-module ``c``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, Module]:
    """Every module of the project packages with the project modules it imports."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            modules[_module_name(path)] = Module(_module_name(path), path, cli=path.name == "__main__.py")
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        for node in _nodes(tree):
            module.cli = module.cli or _defines_command(node) or module.name in CLI_SUPPORT
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, known):
                    found = _project_module(target, known)
                    if found and found != module.name:
                        module.imports.setdefault(found, node.lineno)
    return modules


def strongly_connected(modules: dict[str, Module]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for other in modules[name].imports:
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in on_stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return sorted(found)


def describe(modules: dict[str, Module], cycles: list[list[str]]) -> str:
    """Each cycle as its modules and the import lines that close it."""
    lines = []
    for component in cycles:
        lines.append(f"cycle of {len(component)} modules: {', '.join(component)}")
        for name in component:
            module = modules[name]
            for other, line in module.imports.items():
                if other in component:
                    lines.append(f"    {name} -> {other}  ({module.path.relative_to(REPO)}:{line})")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(modules: dict[str, Module]) -> None:
    # a function-level import counts; a TYPE_CHECKING one does not; `from pkg import module` names the module
    assert "featurestore.errors" in modules["featurestore.registry"].imports
    assert "data.formats.hm" in modules["data.formats"].imports
    assert modules["featurestore.cli"].cli and not modules["featurestore.store"].cli


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    cycles = strongly_connected(modules)
    assert not cycles, "import cycles:\n" + describe(modules, cycles)


def test_no_library_module_imports_a_cli_module(modules: dict[str, Module]) -> None:
    climbing = [f"{module.path.relative_to(REPO)}:{line} imports {other}"
                for module in modules.values() if not module.cli
                for other, line in module.imports.items() if modules[other].cli]
    assert not climbing, "library modules importing a CLI module:\n" + "\n".join(climbing)
