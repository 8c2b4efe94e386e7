"""The extension's build files without CMake: every listed script and resource exists (Slicer's macro
fails at configure time otherwise), every Python file is listed (or it would not be installed), the
metadata is complete, the ExtensionsIndex entry fits its schema, and the icon is a 128x128 PNG."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from slicer_helpers import REPO

#: Allowed and required keys of Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json.
CATALOG_KEYS = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
    "dicom_support_rule", "build_subdirectory", "enabled", "tier",
}  # fmt: skip
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
METADATA = (
    "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
)  # fmt: skip


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMake file; quoted arguments keep their text, comments are dropped."""
    text = path.read_text(encoding="utf-8")
    token = re.compile(r'"((?:[^"\\]|\\.)*)"|(#[^\n]*)|([()])|([^\s()"#]+)')
    commands: list[tuple[str, list[str]]] = []
    name, arguments, depth, previous = None, [], 0, None
    for quoted, comment, paren, word in token.findall(text):
        if comment:
            continue
        if paren == "(":
            if depth == 0:
                name, arguments = previous, []
            depth += 1
        elif paren == ")":
            depth -= 1
            if depth == 0:
                commands.append((name.lower(), arguments))
        elif depth > 0:
            arguments.append(quoted if quoted or not word else word)
        previous = word
    return commands


def variables(commands) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, arguments in commands:
        if name == "set" and arguments:
            values[arguments[0]] = [substitute(a, values) for a in arguments[1:]]
    return values


def substitute(text: str, values: dict[str, list[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(values[m.group(1)]), text)


def build_call(commands) -> dict[str, list[str]]:
    """The slicerMacroBuildScriptedModule call's keyword sections, variables expanded."""
    values = variables(commands)
    (arguments,) = [a for name, a in commands if name == "slicermacrobuildscriptedmodule"]
    sections: dict[str, list[str]] = {}
    current = None
    for argument in arguments:
        if argument in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR"):
            current = argument
            sections.setdefault(current, [])
            continue
        expanded = substitute(argument, values)
        sections[current] += expanded.split() if argument.startswith("${") else [expanded]
    return sections


def python_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def test_top_level_cmake_follows_the_extension_template():
    commands = cmake_commands(REPO / "CMakeLists.txt")
    names = [name for name, _ in commands]
    values = variables(commands)
    assert ("project", ["GaussianSVR"]) in commands
    for key in METADATA:
        assert values.get(key) and all(v.strip() for v in values[key]), key
    assert values["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert ("find_package", ["Slicer", "REQUIRED"]) in commands
    subdirectories = [a[0] for name, a in commands if name == "add_subdirectory"]
    assert subdirectories == ["GaussianSVRLib", "GaussianSVR"]
    includes = [a[0] for name, a in commands if name == "include"]
    assert includes == [
        "${Slicer_USE_FILE}",
        "${Slicer_EXTENSION_GENERATE_CONFIG}",
        "${Slicer_EXTENSION_CPACK}",
    ]
    assert names.index("find_package") < names.index("add_subdirectory")


def test_module_cmake_lists_every_script_and_resource():
    folder = REPO / "GaussianSVR"
    commands = cmake_commands(folder / "CMakeLists.txt")
    sections = build_call(commands)
    assert sections["NAME"] == ["GaussianSVR"] and "WITH_GENERIC_TESTS" in sections
    for listed in sections["SCRIPTS"] + sections["RESOURCES"]:
        assert (folder / listed).is_file(), f"listed but missing: {listed}"
    assert set(sections["SCRIPTS"]) == python_files(folder)
    resources = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*") if p.is_file()}
    assert set(sections["RESOURCES"]) == resources
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands


def test_library_cmake_installs_every_library_file_in_its_own_folder():
    folder = REPO / "GaussianSVRLib"
    sections = build_call(cmake_commands(folder / "CMakeLists.txt"))
    assert sections["NAME"] == ["GaussianSVRLib"] and "WITH_SUBDIR" in sections
    listed = set(sections["SCRIPTS"])
    missing = sorted(name for name in listed if not (folder / name).is_file())
    assert missing == [], f"listed but missing (the CMake configure step would fail): {missing}"
    assert python_files(folder) == listed


def test_extensions_index_entry_matches_the_schema_and_the_dependencies():
    entry = json.loads((REPO / "GaussianSVR.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_KEYS
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["scm_url"].startswith("https://")
    depends = variables(cmake_commands(REPO / "CMakeLists.txt"))["EXTENSION_DEPENDS"]
    assert entry["build_dependencies"] == depends
    assert 1 <= entry.get("tier", 1) <= 5


def test_icon_is_a_128_pixel_png():
    data = (REPO / "GaussianSVR" / "Resources" / "Icons" / "GaussianSVR.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
