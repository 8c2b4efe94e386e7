"""The engine's house: every import points down the road (read -> initialize -> optimize -> export), no
module imports one that imports it back, nothing imports the command line or Slicer, and the file
formats and the protocol import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "GaussianSVRLib"
#: The layers, lowest first: a module may import modules of its own layer or lower ones.
LAYERS = {
    "errors": 0, "settings": 0, "geometry": 0, "timing": 0,
    "io": 1,
    "devices": 2, "model": 2, "atlas": 2,
    "fit": 3,
    "export": 4, "qa": 4, "sim": 4,
    "preflight": 5,
    "brain_search": 6,
    "pipeline": 6,
    "demo": 7, "cohort": 7,
    "cli": 8,
    "__main__": 9,
}  # fmt: skip
#: Modules Slicer's process imports (GaussianSVRSlicer): they must not pull in torch.
LIGHT = ["GaussianSVRLib.settings", "GaussianSVRLib.io.progress", "GaussianSVRLib.io.gaussians_file"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts and "data" not in path.relative_to(PACKAGE).parts
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The engine modules a module imports, at its top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                target = f"{module}.{alias.name}"
                found.add(target if target in known else module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {module for module in found if module in known and module != name}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else -1


def graph() -> dict[str, set[str]]:
    modules = engine_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_import_points_down_the_road():
    wrong = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        for target in targets
        if layer(target) > layer(name)
    ]
    assert wrong == []


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_nothing_imports_the_command_line_or_slicer():
    for name, path in engine_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        names |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not names & {"slicer", "qt", "ctk", "GaussianSVRSlicer"}, name
    importers = [name for name, targets in graph().items() if "GaussianSVRLib.cli" in targets]
    assert importers == ["GaussianSVRLib.__main__"]


def test_the_formats_and_the_protocol_import_without_torch():
    probe = "import sys\n" + "".join(f"import {name}\n" for name in LIGHT)
    probe += "print(sorted(m for m in ('torch', 'numba', 'faiss', 'scipy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
