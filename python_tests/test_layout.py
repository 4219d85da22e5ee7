"""The package's layers (docs/design.md, "Layout"): ops <- sampling <- integrations/models <- cli.

A lower layer never imports a higher one, and no module imports itself back through others
(function-local imports count: they run too). The checks read the source with ``ast``, so they
see every import, not only the ones a particular run executes.
"""

import ast
from pathlib import Path

import pytest

import specdiff_kernels

PKG_DIR = Path(specdiff_kernels.__file__).parent
PKG = "specdiff_kernels"

# layer -> the layers it must never import (every package of the project is listed)
FORBIDDEN = {
    "ops": {"sampling", "integrations", "models", "cli", "testing"},
    "sampling": {"integrations", "models", "cli", "testing"},
    "integrations": {"models", "cli", "testing"},
    "models": {"integrations", "cli", "testing"},
    "testing": {"ops", "sampling", "integrations", "models", "cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG_DIR.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every project module ``name`` imports, at any depth of its code."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and _is_package(f"{PKG}.{parts[1]}") else ""


def _violations(graph: dict, layer: str) -> list[str]:
    return [
        f"{m} imports {dep}"
        for m in sorted(graph)
        if _layer(m) == layer
        for dep in sorted(graph[m])
        if _layer(dep) in FORBIDDEN[layer]
    ]


def _cycles(graph: dict) -> list[str]:
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    def edges(m):
        return {d for d in graph[m] if not (_is_package(m) and d.startswith(m + "."))}

    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges(m)):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    bad = _violations(GRAPH, layer)
    assert not bad, "\n".join(bad)


def test_forbidden_table_names_every_layer():
    packages = {_layer(m) for m in MODULES} - {""}
    assert packages == set(FORBIDDEN) | {"cli"}


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "\n".join(cycles)


def test_the_checks_can_fail():
    # an ops module importing the sampler, and the sampler importing the CLI back, are caught
    graph = {m: set(deps) for m, deps in GRAPH.items()}
    graph[f"{PKG}.ops.verify"].add(f"{PKG}.sampling.sampler")
    graph[f"{PKG}.sampling.sampler"].add(f"{PKG}.ops.verify")
    graph[f"{PKG}.cli.commands"].add(f"{PKG}.cli.demo")
    graph[f"{PKG}.cli.demo"].add(f"{PKG}.cli.commands")
    assert _violations(graph, "ops") == [f"{PKG}.ops.verify imports {PKG}.sampling.sampler"]
    cycles = _cycles(graph)
    assert any(f"{PKG}.ops.verify" in c for c in cycles)
    assert any(f"{PKG}.cli.demo" in c for c in cycles)


# ------------------------------------------------------------------ function length in sampling/
MAX_FUNCTION_LINES = 60  # def line to the last line of the body, docstring included


def _long_functions(source: str, filename: str = "<source>") -> list[str]:
    """``name (lines)`` of every function in ``source`` longer than MAX_FUNCTION_LINES (nested
    functions and methods included; decorators not counted)."""
    return [
        f"{filename}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source, filename))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_in_sampling_over_60_lines():
    long = [
        f
        for path in sorted((PKG_DIR / "sampling").glob("*.py"))
        for f in _long_functions(path.read_text(), path.name)
    ]
    assert not long, "\n".join(long)


def test_the_function_length_check_can_fail():
    def function(lines: int, prefix: str = "") -> str:  # def line + body: `lines` lines in all
        return f"{prefix}def f():\n" + "".join(f"{prefix}    x = {i}\n" for i in range(lines - 1))

    assert _long_functions(function(60)) == []
    assert _long_functions(function(61)) == ["<source>:1 f (61 lines)"]
    method = "class C:\n" + function(61, prefix="    ").replace("def f():", "async def f(self):")
    assert _long_functions(method) == ["<source>:2 f (61 lines)"]


def test_the_coercers_sit_below_every_layer():
    """specdiff_kernels.validate (the scalar coercers of every layer) imports no project module,
    so ops, sampling and everything above may use it without a cycle."""
    assert GRAPH[f"{PKG}.validate"] == set()
