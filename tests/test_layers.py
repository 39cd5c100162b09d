"""The import graph the folders draw (docs/architecture.md), kept true: layers import only downward,
no import cycle anywhere, and the server's packages stay free of what they must not need."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "export", "bench", "requirements")
# service/'s layers from the top: a module may import its own layer and the layers below it only.
SERVICE_LAYERS = (
    ("service.__main__", "service.workers", "service.server"),
    ("service.client",),
    ("service.rpc",),
    ("service.scheduler",),
    ("service.engine",),
    ("service.decoding", "service.config", "service.metrics"),
    ("service.modeldir",),
    ("service.api",),
)
# What must never be imported from these packages, at any depth of the module's own imports.
FORBIDDEN = {
    "service": ("export", "bench", "torch", "transformers", "tests"),
    "service.modeldir": ("grpc", "onnxruntime", "service.engine", "service.scheduler", "service.rpc"),
    "service.scheduler": ("grpc", "onnxruntime", "service.rpc"),
    "service.decoding": ("grpc", "onnxruntime"),
}
REFERENCE_DECODER = "service.engine.reference_decoder"  # tests, export checks and benchmarks only
# Imports deferred into a function on purpose (never to dodge a cycle), with the reason.
DEFERRED = {
    ("bench.load_engine", "bench.kv_cache"): "imports torch: only when the KV-cache cell runs",
    ("bench.load_engine", "bench.variants"): "imports torch: only when the KV-cache cell runs",
    ("bench.import_hf", "bench.report"): "imports torch: not in the process sessions_apart spawns",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "api/translator" not in path.as_posix()
    }


def _imports(module: str, path: Path) -> Iterator[tuple[str, bool]]:
    """(imported module, at module level) for every import statement of `path`; imports under
    `if TYPE_CHECKING:` are for the type checker only and left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(parent: ast.AST, top: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for node in ast.iter_child_nodes(parent):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, top
            else:
                scope = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
                yield from walk(node, top and not isinstance(node, scope))

    for node, top in walk(tree, True):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` depends on that module, `from module import name` on
            # the module
            names = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")] or [base]
        for name in names:
            yield name, top


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports at module level."""
    modules = _modules()
    return {
        module: {name for name, top in _imports(module, path) if top and name in modules and name != module}
        for module, path in modules.items()
    }


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    for depth, layer in enumerate(SERVICE_LAYERS):
        if any(_within(module, prefix) for prefix in layer):
            return depth
    return None


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), dict[str, int](), []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                cycles.append(" → ".join([*stack[stack.index(name) :], name]))
            elif name not in state:
                visit(name, [*stack, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_service_layers_import_only_downward() -> None:
    upward = []
    for module, names in _graph().items():
        here = _layer(module)
        if here is None:
            continue
        for name in names:
            there = _layer(name)
            if there is not None and there < here:
                upward.append(f"{module} → {name}")
    assert not upward


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_nothing_they_must_not(package: str) -> None:
    found = [
        f"{module} imports {name}"
        for module, path in _modules().items()
        if _within(module, package)
        for name, _ in _imports(module, path)
        if any(_within(name, banned) for banned in FORBIDDEN[package])
    ]
    assert not found


def test_only_tests_export_checks_and_benchmarks_import_the_reference_decoder() -> None:
    found = [
        module
        for module, path in _modules().items()
        if _within(module, "service") and module != REFERENCE_DECODER
        for name, _ in _imports(module, path)
        if _within(name, REFERENCE_DECODER)
    ]
    assert not found


def test_no_function_imports_a_project_module() -> None:
    """An import inside a function is how a cycle hides; the project's own modules are imported at
    the top (third-party ones may be deferred, e.g. an optional dependency)."""
    modules = _modules()
    hidden = sorted(
        f"{module} → {name}"
        for module, path in modules.items()
        for name, top in _imports(module, path)
        if not top and name in modules and (module, name) not in DEFERRED
    )
    assert not hidden
