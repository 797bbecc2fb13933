"""The package's layering, read from its source: which folder may import which, and no import circle.

Imports inside functions count (an import on use is still a dependency a reader follows); imports under
`if TYPE_CHECKING:` do not (they run only for a type checker). The table below is the one the folders'
docstrings state; a new import that breaks it fails here with the file and the import.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tp_plugin"

# Lowest first. Each layer may import itself and the layers listed for it, nothing else of the package.
PLAN_TIME = ("tp_plugin.policy", "tp_plugin.plan", "tp_plugin.styles", "tp_plugin.policies", "tp_plugin.auto")
MODEL_STATE = ("tp_plugin.mesh", "tp_plugin.state", "tp_plugin.checks", "tp_plugin.launch_config")
SPLIT = ("tp_plugin.split", "tp_plugin.apply", "tp_plugin.hf_methods", "tp_plugin.grad_norm", "tp_plugin.state_dicts",
         "tp_plugin.sequence_hooks")
LAYERS = {
    "sharding": (("tp_plugin.sharding",), []),
    "runtime": (("tp_plugin.runtime",), ["sharding"]),
    "plan time": (PLAN_TIME, ["runtime", "sharding"]),
    "model state": (MODEL_STATE, ["plan time", "runtime", "sharding"]),
    "checkpoint files": (("tp_plugin.checkpoint",), ["model state", "runtime", "sharding"]),
    "split": (SPLIT, ["checkpoint files", "model state", "plan time", "runtime", "sharding"]),
}


def _module(path: pathlib.Path) -> tuple[str, bool]:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__"), path.name == "__init__.py"


MODULES = {_module(p)[0]: p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: pathlib.Path) -> dict[str, int]:
    """The package's modules `path` imports (at module level or in any function), with the line of each."""
    current, is_package = _module(path)
    found: dict[str, int] = {}

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if _is_type_checking(node.test):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_ImportFrom(self, node):
            if node.level:
                base = current.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            for name in submodules or [target]:
                found.setdefault(name, node.lineno)

        def visit_Import(self, node):
            for alias in node.names:
                found.setdefault(alias.name, node.lineno)

    Visitor().visit(ast.parse(path.read_text()))
    return {m: line for m, line in found.items() if m in MODULES and m != current}


# The package's `__init__` re-exports the public API from every layer; importing it is not a structural edge.
GRAPH = {name: {m: line for m, line in imports_of(path).items() if m != "tp_plugin"}
         for name, path in MODULES.items() if name != "tp_plugin"}


def _layer(module: str) -> str | None:
    for layer, (prefixes, _) in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def test_no_import_circle_counting_imports_inside_functions():
    visiting, done, circles = [], set(), []

    def visit(node):
        if node in done:
            return
        if node in visiting:
            circles.append(" -> ".join(visiting[visiting.index(node):] + [node]))
            return
        visiting.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            visit(dep)
        visiting.pop()
        done.add(node)

    for node in sorted(GRAPH):
        visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, deps in GRAPH.items():
        layer = _layer(module)
        if layer is None:
            continue
        allowed = {layer, *LAYERS[layer][1]}
        for dep, line in deps.items():
            if _layer(dep) not in allowed:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({layer}) imports {dep} "
                             f"({_layer(dep) or 'above the split'})")
    assert not wrong, "\n".join(sorted(wrong))


# Above the split the layers interleave (parallelize wires the engines; the pipeline and the zero-code route call
# parallelize), so there the table names what each folder must never import.
NEVER = {
    "tp_plugin.parallel": ("tp_plugin.integrations", "tp_plugin.tools", "tp_plugin.loading", "tp_plugin.launch"),
    "tp_plugin.integrations": ("tp_plugin.tools", "tp_plugin.launch"),
    "tp_plugin.parallelize": ("tp_plugin.tools", "tp_plugin.loading", "tp_plugin.parallel.pipeline"),
    "tp_plugin.loading": ("tp_plugin.tools",),
}


def test_above_the_split_no_folder_imports_what_it_must_not():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {dep}" for m, deps in GRAPH.items()
             for owner, banned in NEVER.items() if m == owner or m.startswith(owner + ".")
             for dep, line in deps.items() if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not wrong, "\n".join(sorted(wrong))


def test_every_folder_says_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)}: its docstring should say what the folder may import"
