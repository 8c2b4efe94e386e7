"""The extension's build files without CMake: every listed script and resource exists (Slicer's macro
fails at configure time otherwise), every Python file is listed (or it would not be installed), the
metadata is complete, the ExtensionsIndex entry fits its schema, and the icon is a 128x128 PNG."""

from __future__ import annotations

import ast
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
    # The demo data (and the scripts that derived them) serve the command line, not Slicer; the
    # standard-space atlases serve both.
    assert {name for name in python_files(folder) if not name.startswith("data/")} == listed
    standard = {p.relative_to(folder).as_posix() for p in (folder / "data" / "standard").iterdir()}
    assert set(sections["RESOURCES"]) == standard


def test_extensions_index_entry_matches_the_schema_and_the_dependencies():
    entry = json.loads((REPO / "GaussianSVR.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_KEYS
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["scm_url"].startswith("https://")
    depends = variables(cmake_commands(REPO / "CMakeLists.txt"))["EXTENSION_DEPENDS"]
    assert entry["build_dependencies"] == depends
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5, "tier: 1 to 5, and stated"


def test_icon_is_a_128_pixel_png():
    data = (REPO / "GaussianSVR" / "Resources" / "Icons" / "GaussianSVR.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


#: What Slicer/ExtensionsIndex scripts/check_description_files.py checks without the network, as rules
#: (read there on 2026-12-01): the accepted categories, the schemes of scm_url, the name of the repository,
#: the CMake project name, the icon and screenshot URLs as its regular expressions find them, a license
#: file among these names.
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration",
    "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression",
    "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely",
    "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography", "Training",
    "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
}  # fmt: skip
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
ICON_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOTS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/([^/]+)/([^/]+)/([^/]+)/(.+)")


def in_this_repository(url: str, scm_url: str) -> Path:
    """The file of this repository a raw.githubusercontent.com URL of the extension's repository serves."""
    found = RAW_URL.fullmatch(url)
    assert found, f"{url}: not a raw file URL of the extension's repository"
    owner, name, _branch, path = found.groups()
    assert scm_url.rstrip("/").endswith(f"github.com/{owner}/{name}"), f"{url} is not from {scm_url}"
    return REPO / path


def test_the_description_passes_the_extension_index_checks_that_need_no_network():
    entry = json.loads((REPO / "GaussianSVR.json").read_text(encoding="utf-8"))
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert entry["category"] in ACCEPTED_CATEGORIES
    scheme, _, rest = entry["scm_url"].partition("://")
    assert scheme in ("git", "https") and rest
    repository = rest.rstrip("/").split("/")[-1].removesuffix(".git")
    assert "slicer" in repository.lower(), f"the index wants the repository named Slicer...: {repository}"
    assert re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake, re.IGNORECASE)[0] == "GaussianSVR"
    (icon,) = re.findall(ICON_PATTERN, cmake, re.IGNORECASE)
    (screenshots,) = re.findall(SCREENSHOTS_PATTERN, cmake, re.IGNORECASE)
    for url in [icon, *screenshots.split()]:
        file = in_this_repository(url, entry["scm_url"])
        assert file.is_file() and file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{url}: no PNG at {file}"
    assert any((REPO / name).is_file() for name in LICENSE_NAMES)
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")


def test_contributors_are_stated_once_as_name_and_affiliation():
    values = variables(cmake_commands(REPO / "CMakeLists.txt"))
    contributors = [c.strip() for c in " ".join(values["EXTENSION_CONTRIBUTORS"]).split(",")]
    assert contributors and all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors), contributors
    module = (REPO / "GaussianSVR" / "GaussianSVR.py").read_text(encoding="utf-8")
    stated = re.search(r"self\.parent\.contributors = (\[.*?\])", module)
    assert stated and ast.literal_eval(stated.group(1)) == contributors, (
        "the module and CMakeLists.txt differ"
    )


def test_the_screenshot_is_rendered_offscreen_from_a_reconstruction(phantom, phantom_gaussians, tmp_path):
    """docs/make_screenshot.py on the phantom (rendered as a perfect reconstruction): the 3-D view with
    its orange ellipsoids beside the montage."""
    import importlib.util

    import SimpleITK as sitk

    from GaussianSVRLib.io.gaussians_file import save_gaussians

    run = tmp_path / "run"
    run.mkdir()
    sitk.WriteImage(phantom[0], str(run / "volume.nii.gz"))
    save_gaussians(
        run / "gaussians.npz", **{k: phantom_gaussians[k] for k in ("means", "covariances", "intensities")}
    )
    spec = importlib.util.spec_from_file_location("make_screenshot", REPO / "docs" / "make_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_screenshot(run, tmp_path / "shot.png")
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "shot.png")))
    height, width, _ = picture.shape
    assert height == module.VIEW_SIZE[1] and width > 2 * height
    view = picture[:, : module.VIEW_SIZE[0]].astype(int)
    orange = (view[..., 0] > 120) & (view[..., 0] > view[..., 2] + 60)
    assert orange.mean() > 0.005, "no ellipsoids in the 3-D view"
    assert (picture[:, module.VIEW_SIZE[0] + 8 :] > 50).mean() > 0.05, "no montage beside it"
