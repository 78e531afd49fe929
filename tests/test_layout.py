"""The layout keeps its architecture: imports run down the layers only, no import circles, the generator's kind and the
modality list each live in one place, and every module is short and says what it is."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

# Lower layers first; a module may import its own package and any package of a lower rank, never a higher one.
LAYERS: dict[str, int] = {"errors": 0, "zoo": 0, "core": 1, "data": 2, "encoders": 3, "bridges": 3, "generators": 3,
                          "training": 4, "serve": 5, "eval": 6, "cli": 7, "__main__": 8, "zoo.build": 9}
KIND_INTERNALS = re.compile(r"\.unet\b|\bIGNORE_INDEX\b|\.markers\b|\.output\s*[!=]=|\.text_encoder\b")
MODALITY_LIST = re.compile(r"""["']image["'],\s*["']audio["'],\s*["']points["']""")


def python_files() -> list[Path]:
    return sorted(p for folder in ("mmadapt", "bridges") for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package(module: str) -> str:
    """The layer a module belongs to: its first package under mmadapt (zoo.build apart), or bridges."""
    parts = module.split(".")
    if parts[0] == "bridges":
        return "bridges"
    if parts[1:3] == ["zoo", "build"]:
        return "zoo.build"
    return parts[1] if len(parts) > 1 else "mmadapt"


def runtime_imports(path: Path) -> set[str]:
    """mmadapt and bridges modules a file imports at run time (anywhere, lazily too), not those under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import module` imports pkg.module too
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {n for n in names if n.split(".")[0] in ("mmadapt", "bridges")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in python_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in runtime_imports(path):  # `from module import name` also lists module.name: keep real modules
            targets.add(imported if imported in modules else imported.rsplit(".", 1)[0])
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_imports_run_down_the_layers_only() -> None:
    upward = [f"{module} ({package(module)}) imports {target} ({package(target)})"
              for module, targets in import_graph().items() for target in targets
              if package(module) != package(target) and package(module) in LAYERS and package(target) in LAYERS
              and LAYERS[package(target)] > LAYERS[package(module)]]
    assert not upward, "\n".join(upward)
    assert set(map(package, import_graph())) - {"mmadapt"} <= set(LAYERS), "a package the layer table does not place"


def test_no_import_circles() -> None:
    graph, cycles = import_graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_nothing_imports_the_zoo_builders() -> None:
    users = [m for m, targets in import_graph().items() if package(m) != "zoo.build" and any(package(t) == "zoo.build" for t in targets)]
    assert not users


def test_the_generator_kind_and_the_modality_list_live_in_one_place() -> None:
    """U-Net and text-encoder internals, label masks, markers and the output kind are read inside generators/ only
    (the demos' card check names `output` through card_summary's class attribute, not a model's); the modality names
    are listed once, in the modality table."""
    leaks, lists = [], []
    for path in python_files() + sorted((REPO / "demos").glob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if not relative.startswith("mmadapt/generators/") and relative != "demos/audio2image.py":
            leaks += [f"{relative}:{text[: m.start()].count(chr(10)) + 1}: {m.group()}" for m in KIND_INTERNALS.finditer(text)]
        if relative != "mmadapt/data/modalities.py":
            lists += [relative for _ in MODALITY_LIST.finditer(text)]
    assert not leaks, "\n".join(leaks)
    assert not lists, lists


def test_every_module_is_short_and_opens_with_a_docstring() -> None:
    for path in python_files():
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)) is not None, f"{path.relative_to(REPO)}: no module docstring"
        assert len(text.splitlines()) <= 600, f"{path.relative_to(REPO)}: {len(text.splitlines())} lines"
