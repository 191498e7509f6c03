"""The package's import graph, read from the source with ``ast`` (module-level and function-level imports): no cycle
among its modules, and the layering

    datasets -> models.ops -> models -> benchmarks -> reports

in which no module imports a later layer. Models and layers use the ops layer through its public names only.

Edges are the modules an import statement names (``from .x import y`` reaches ``x``, or ``x.y`` where that is a
module), not the parent packages that Python executes on the way: every submodule of ``grcn_bench.models`` runs
``grcn_bench/models/__init__.py`` first, which would otherwise put every model above the ops layer it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Installed package name -> repository folder (setup.cfg's package_dir; subpackages live inside their folder).
PACKAGES = {
    "grcn_bench.datasets": "datasets",
    "grcn_bench.models": "models",
    "grcn_bench.benchmarks": "benchmarks",
    "grcn_bench.reports": "reports",
}

#: The layers, lowest first: a module may import its own layer and earlier ones. Longer prefixes win.
LAYERS = ("grcn_bench.datasets", "grcn_bench.models.ops", "grcn_bench.models", "grcn_bench.benchmarks",
          "grcn_bench.reports")

#: Modules allowed to import a later layer, and why.
LAYERING_EXCEPTIONS = {
    # The command line (the ``grcn-bench`` console script's ``main``) dispatches every subcommand, ``report`` and
    # ``compare-search`` included, so it sits above every layer; it imports reports inside those commands only.
    "grcn_bench.benchmarks.cli",
}


def package_modules() -> dict[str, Path]:
    """Every module of the package (``grcn_bench`` itself included), by its installed dotted name."""
    modules = {"grcn_bench": REPO / "grcn_bench" / "__init__.py"}
    for package, folder in PACKAGES.items():
        root = REPO / folder
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(not (root.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))):
                continue  # not inside a package (scripts, data)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` (at ``path``) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def layer_of(name: str) -> int | None:
    matches = [(len(prefix), index) for index, prefix in enumerate(LAYERS)
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert {"grcn_bench.models.ops", "grcn_bench.models.ops.native", "grcn_bench.models.grcn",
            "grcn_bench.benchmarks.cli", "grcn_bench.reports.bundle", "grcn_bench.datasets.base"} <= set(graph)
    assert "grcn_bench.models.ops" in graph["grcn_bench.models.grcn"]
    assert "grcn_bench.models.ops.native" in graph["grcn_bench.models.ops.sparse"]
    assert "grcn_bench.models" in graph["grcn_bench.models.grcn"]  # `from . import register_model`


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_later_layer():
    graph = import_graph()
    violations = [
        f"{name} (layer {LAYERS[layer_of(name)]}) imports {target} (layer {LAYERS[layer_of(target)]})"
        for name, targets in sorted(graph.items()) if layer_of(name) is not None and name not in LAYERING_EXCEPTIONS
        for target in sorted(targets) if layer_of(target) is not None and layer_of(target) > layer_of(name)
    ]
    assert not violations, "layering violations:\n" + "\n".join(violations)
    # the root package's __init__ is no layer's: it imports none of them
    assert not graph["grcn_bench"], graph["grcn_bench"]


def test_models_use_only_the_public_ops_api():
    """Model files and layers import ``grcn_bench.models.ops`` itself (never ``ops.native`` or another submodule),
    and only names that it exports."""
    import grcn_bench.models.ops as ops

    modules = package_modules()
    problems = []
    for name, path in sorted(modules.items()):
        if not name.startswith("grcn_bench.models") or layer_of(name) != LAYERS.index("grcn_bench.models"):
            continue
        targets = imports_of(name, path, set(modules))
        problems += [f"{name} imports {t}" for t in sorted(targets) if t.startswith("grcn_bench.models.ops.")]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "ops":
                problems += [f"{name} imports ops.{alias.name}, which ops does not export"
                             for alias in node.names if alias.name not in ops.__all__]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_look_for():
    """The helpers find a planted cycle and a planted layering violation."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("grcn_bench.models.ops.native") == 1 and layer_of("grcn_bench.models.grcn") == 2
    assert layer_of("grcn_bench.reports.bundle") > layer_of("grcn_bench.benchmarks.trainer")
