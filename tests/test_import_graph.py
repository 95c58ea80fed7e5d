"""The library's import graph: no cycles, and every arrow points down the layers written in
``LAYERS`` below (docs/layout.md says the same in words).

Every import counts, those inside functions too (a function-level import that breaks a cycle at
load time still ties the modules). Imports inside functions are few and each says why
(``MAX_FUNCTION_LEVEL_IMPORTS``), so the arrows a reader sees at the top of a file are the arrows.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "modules", "engine", "tasks", "methods", "decoding", "cli", "experiments", "distillation")
CORE_FILES = ("config", "errors", "optimizer", "utils")  # top-level core modules (the graders import them)
SCRIPTS = ("classifier", "paraphrase_detection", "sonnet_generation", "pretrain", "generate", "prepare_submit",
           "export", "demo", "sanity_check", "optimizer_test")  # the graders' checks count as scripts

# What each part of the project may import (besides itself). Read top to bottom: the entry points
# use everything; the engine trains any nn.Module, so it knows neither models, tasks nor methods;
# methods and decoding change or run a model and may use models and modules, never tasks or cli.
LAYERS: dict[str, set[str]] = {
    "scripts": {"experiments", "distillation", "cli", "tasks", "engine", "methods", "decoding", "models", "modules",
                *CORE_FILES},
    "experiments": {"distillation", "cli", "tasks", "engine", "methods", "decoding", "models", "modules",
                    *CORE_FILES, *SCRIPTS},
    "distillation": {"cli", "tasks", "engine", "methods", "decoding", "models", "modules", *CORE_FILES, *SCRIPTS},
    "cli": {"tasks", "engine", "methods", "decoding", "models", "modules", *CORE_FILES},
    "tasks": {"engine", "methods", "decoding", "models", "modules", *CORE_FILES},
    "methods": {"engine", "decoding", "models", "modules", *CORE_FILES},
    "decoding": {"models", "modules", *CORE_FILES},
    "engine": {"optimizer", "errors"},
    "models": {"modules", "config", "errors"},
    "modules": {"config"},
    "config": set(),
    "errors": set(),
    "optimizer": set(),
    "utils": {"models", "modules", "config"},  # what the graders' sanity_check imports beside the model
}
MAX_FUNCTION_LEVEL_IMPORTS = 5


def part_of(module: str) -> str:
    """The layer a module belongs to: its package, or 'scripts' / the core file's own name."""
    top = module.split(".")[0]
    return "scripts" if top in SCRIPTS else top


def library_modules() -> dict[str, Path]:
    found = {f"{pkg}.{p.relative_to(ROOT / pkg).with_suffix('').as_posix().replace('/', '.')}": p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found = {name.removesuffix(".__init__"): p for name, p in found.items()}
    found.update({name: ROOT / f"{name}.py" for name in (*CORE_FILES, *SCRIPTS)})
    return found


def imports_of(path: Path, package: str, names: set[str]) -> tuple[set[str], list[str]]:
    """(project modules ``path`` imports, those imported inside a function as 'file:line module')."""
    tree = ast.parse(path.read_text())
    deps: set[str] = set()
    in_function: list[str] = []
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        found: set[str] = set()
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found = {m for m in (base, *(f"{base}.{a.name}" for a in node.names)) if m in names}
        elif isinstance(node, ast.Import):
            found = {a.name for a in node.names if a.name in names}
        deps |= found
        if found and id(node) in nested:  # one entry per import statement: its most specific module
            in_function.append(f"{path.relative_to(ROOT)}:{node.lineno} {max(found, key=len)}")
    return deps, in_function


def library_imports() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the project modules it imports (anywhere in its body), and the function-level ones."""
    modules = library_modules()
    names = set(modules)
    graph, in_function = {}, []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps, nested = imports_of(path, package, names)
        graph[name] = deps - {name}
        in_function += nested
    return graph, in_function


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (each reported once per back edge)."""
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point against ``LAYERS``."""
    bad = []
    for module, deps in sorted(graph.items()):
        own = part_of(module)
        for d in sorted(deps):
            if part_of(d) != own and part_of(d) not in LAYERS[own]:
                bad.append(f"{module} -> {d}")
    return bad


def test_no_import_cycles_in_the_library():
    graph, _ = library_imports()
    assert "models.decoding" in graph["models.beam_search"]  # the scan sees the imports
    bad = cycles(graph)
    assert not bad, f"import cycles: {[' -> '.join(c) for c in bad]}"


def test_every_import_points_down_the_layers():
    graph, _ = library_imports()
    assert "engine.trainer" in graph["tasks.common"]  # the scan sees the imports
    assert set(LAYERS) >= {part_of(m) for m in graph}, "a part of the project is missing from LAYERS"
    bad = upward(graph)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_few_imports_hide_inside_functions():
    _, in_function = library_imports()
    assert len(in_function) <= MAX_FUNCTION_LEVEL_IMPORTS, "\n".join(in_function)


def test_the_checks_find_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward({"engine.trainer": {"models.gpt2"}, "models.gpt2": {"modules.attention"}}) == [
        "engine.trainer -> models.gpt2"]
    path = ROOT / "tests" / "_nested_import_probe.py"
    path.write_text("import os\n\ndef f():\n    from engine import trainer\n    return trainer\n")
    try:
        deps, nested = imports_of(path, "tests", {"engine", "engine.trainer"})
    finally:
        path.unlink()
    assert deps == {"engine", "engine.trainer"} and nested == ["tests/_nested_import_probe.py:4 engine.trainer"]
