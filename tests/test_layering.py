"""The import graph of the tinymoe package: no circles, and every import points down the layer path.

    cli -> train -> models -> nn -> functional -> kernels -> engine       (a module imports only downward)
    io, distributed -> engine only; optim -> nn, engine;  functional (and above) may import distributed;
    models may import io;  train may import io and optim.

The graph is read from the source with `ast`, not from `sys.modules`: every `import` and `from ... import`
statement counts, wherever it sits (module level, inside a function, under `if TYPE_CHECKING`), because a
function-level import that goes upward is still a circle at run time, only a better hidden one.
`python tests/test_layering.py` prints the edges that break a rule and every circle.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / "tinymoe"
PACKAGE = "tinymoe"

# layer -> the layers its modules may import (besides their own). "root" is the package façade
# (tinymoe/__init__.py and __main__.py): it may import anything, and only cli, the top layer, may import it
# (for `__version__`); "selfcheck" is tinymoe/selfcheck.py, the gradient checks behind `tinymoe gradcheck`.
_BELOW_NN = {"engine", "kernels", "distributed", "functional"}
ALLOWED = {
    "engine": set(),
    "kernels": {"engine"},
    "distributed": {"engine"},
    "io": {"engine"},
    "optim": {"engine", "nn"},  # optimizers update nn Parameters
    "functional": {"engine", "kernels", "distributed"},
    "nn": _BELOW_NN,
    "models": _BELOW_NN | {"nn", "io"},
    "testing": _BELOW_NN,  # tm.testing: gradient assertions for users' test suites
    "selfcheck": _BELOW_NN | {"nn", "models", "testing"},
    "train": _BELOW_NN | {"nn", "models", "io", "optim"},
    "cli": _BELOW_NN | {"nn", "models", "io", "optim", "train", "selfcheck", "testing", "root"},
    "root": {"engine", "kernels", "distributed", "functional", "nn", "models", "io", "optim", "train", "cli",
             "selfcheck", "testing"},
}


def module_files() -> dict:
    """Dotted module name -> path, for every .py file of the package (a package is named by its __init__)."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: pathlib.Path, modules: dict) -> set:
    """The tinymoe modules that `module` imports anywhere in its source (`from pkg import sub` names the
    submodule when `sub` is one, else the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(_deepest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(module, is_package, node.level, node.module)
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in modules else _deepest_module(source, modules))
    found.discard(module)
    return found


def _deepest_module(name: str, modules: dict) -> str:
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict:
    modules = module_files()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "root"
    return parts[1]


def find_cycles(graph: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
    index_of, lowlink, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(start):
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index_of[start] = lowlink[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index_of:
                    index_of[successor] = lowlink[successor] = counter[0]
                    counter[0] += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index_of[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index_of[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for module in sorted(graph):
        if module not in index_of:
            visit(module)
    return sorted(components)


def layer_violations(graph: dict) -> list:
    """'importer -> imported (layer a may not import layer b)' for each edge that breaks the layer rules."""
    problems = []
    for module, imported in sorted(graph.items()):
        layer = layer_of(module)
        if layer not in ALLOWED:
            problems.append(f"{module}: layer {layer!r} is not in tests/test_layering.py's ALLOWED table")
            continue
        for target in sorted(imported):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                problems.append(f"{module} -> {target} ({layer} may not import {target_layer})")
    return problems


def test_the_graph_sees_known_edges():
    # The reader must really find imports, relative ones included, or the two tests below prove nothing.
    graph = import_graph()
    assert "tinymoe.engine.tensor" in graph["tinymoe.engine.function"]
    assert "tinymoe.engine.backend" in graph["tinymoe.engine.tensor"]
    assert "tinymoe.functional" in graph["tinymoe"]


def test_function_level_imports_are_seen(tmp_path):
    source = "def f():\n    from ..nn import moe\n    import tinymoe.cli.main\n"
    path = tmp_path / "mod.py"
    path.write_text(source)
    modules = {"tinymoe.engine.mod": path, "tinymoe.nn.moe": path, "tinymoe.cli.main": path}
    assert imports_of("tinymoe.engine.mod", path, modules) == {"tinymoe.nn.moe", "tinymoe.cli.main"}


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles among tinymoe modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    problems = layer_violations(import_graph())
    assert not problems, "imports that go upward or sideways:\n" + "\n".join(problems)


if __name__ == "__main__":
    _graph = import_graph()
    for _problem in layer_violations(_graph):
        print("layer:", _problem)
    for _cycle in find_cycles(_graph):
        print("cycle:", " <-> ".join(_cycle))
