"""The engine's packages inside Slicer: the decisions (what to install, in which order, what may be
declined), the probe that imports nothing, the pip command line with Slicer's packages pinned (run
through the real pip, offline), and that the declared list matches what the worker really imports
(the real worker with every optional package blocked)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from GaussianSVRSlicer import command, deps, params
from GaussianSVRSlicer.runner import EventKind, WorkerProcess
from slicer_helpers import REPO, TINY_SETTINGS

SCIPY, NUMBA = (next(p for p in deps.PACKAGES if p.distribution == name) for name in ("scipy", "numba"))
#: Imported by the engine but deliberately not installed for the worker: why, per top-level module.
UNDECLARED = {
    "tqdm": "the terminal progress bar only; the worker runs with --progress json",
    "faiss": "the neighbour search on CUDA when faiss has GPU support; the CPU uses scipy's k-d tree",
    "distributed": "the cohort command (gaussiansvr batch) only, which Slicer does not run",
}
#: Import names of what Slicer ships (vtk's modules import as vtkmodules) and of torch (the extension).
SLICER_PROVIDES = {"numpy", "vtk", "vtkmodules", "SimpleITK", "torch"}


def fake_versions(installed: dict[str, str]):
    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    return version


def environment(torch="2.13.0+cpu", extension=True, **packages) -> deps.Environment:
    found = {p.distribution: packages.get(p.distribution) for p in deps.PACKAGES}
    return deps.Environment(torch=torch, pytorch_extension=extension, packages=found, protected={})


def actions(steps: list[deps.Step]) -> list[tuple]:
    return [(s.action, s.package.distribution if s.package else None, s.required) for s in steps]


# -- decisions --------------------------------------------------------------------------------------


def test_probe_reads_metadata_and_falls_back_to_find_spec():
    env = deps.probe(
        fake_versions({"torch": "2.13.0+cpu", "numba": "0.68.1", "numpy": "2.4.6"}),
        find_spec=lambda name: object() if name in {"PyTorchUtils", "scipy", "vtk"} else None,
    )
    assert env.torch == "2.13.0+cpu" and env.pytorch_extension
    assert env.packages == {"scipy": deps.UNKNOWN_VERSION, "numba": "0.68.1"}
    # pins come from metadata only: a version must be known to be pinned
    assert env.protected == {"numpy": "2.4.6", "vtk": None, "SimpleITK": None}
    nothing = deps.probe(fake_versions({}), find_spec=lambda name: None)
    assert nothing.torch is None and not nothing.pytorch_extension
    assert nothing.packages == {"scipy": None, "numba": None}


def test_the_real_probe_imports_none_of_the_packages():
    code = textwrap.dedent(
        """
        import json, sys
        from GaussianSVRSlicer import deps
        env = deps.probe()
        heavy = {"torch", "scipy", "numba", "faiss", "numpy", "vtk", "SimpleITK"} & set(sys.modules)
        print(json.dumps({"imported": sorted(heavy), "torch": env.torch, "packages": env.packages}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "GaussianSVR")},
        timeout=60,
        check=True,
    )
    found = json.loads(result.stdout)
    assert found["imported"] == []
    assert found["torch"] == importlib.metadata.version("torch")
    assert found["packages"] == {
        p.distribution: importlib.metadata.version(p.distribution) for p in deps.PACKAGES
    }


def test_plan_torch_first_then_required_then_optional_packages():
    steps = deps.plan(environment(torch=None, numba=None, scipy=None))
    assert actions(steps) == [
        (deps.Action.INSTALL_TORCH, None, True),
        (deps.Action.PIP_INSTALL, "scipy", True),
        (deps.Action.PIP_INSTALL, "numba", False),
    ]
    assert steps[1].package is SCIPY and "needed" in steps[1].reason and "not installed" in steps[1].reason
    assert "optional" in steps[2].reason and "9x" in steps[2].reason


def test_optional_packages_are_offered_once_required_ones_always():
    env = environment(numba=None, scipy=None)
    assert actions(deps.plan(env, declined={"numba", "scipy"})) == [(deps.Action.PIP_INSTALL, "scipy", True)]
    assert deps.plan(environment(numba=None, scipy="1.17.1"), declined={"numba"}) == []


def test_plan_upgrades_what_is_too_old_and_trusts_what_imports_without_metadata():
    (step,) = deps.plan(environment(numba="0.59.1", scipy=deps.UNKNOWN_VERSION))
    assert step.package is NUMBA and "0.59.1 is older than 0.60" in step.reason
    assert deps.plan(environment(numba="0.68.1", scipy="1.17.1")) == []


def test_plan_without_the_pytorch_extension_explains_what_to_do():
    (step,) = deps.plan(environment(torch="2.0.1", extension=False, numba="0.68.1", scipy="1.13.1"))
    assert step.action is deps.Action.NEED_PYTORCH_EXTENSION and step.required
    assert "2.0.1" in step.reason and "Extensions Manager" in step.reason


def test_version_comparison():
    assert deps.version_at_least("2.13.0+cpu", "2.2")
    assert deps.version_at_least("2.2", "2.2.0")
    assert not deps.version_at_least("2.1.9", "2.2")
    assert not deps.version_at_least("garbage", "2.2")
    assert deps.satisfied(deps.UNKNOWN_VERSION, "9.9") and not deps.satisfied(None, "0")


def test_declared_minimums_are_the_engines():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = text[text.index("\ndependencies = [") :]
    dependencies = re.findall(r'"([^"]+)"', block[: block.index("]")])  # no tomllib on Python 3.10
    for package in deps.PACKAGES:
        assert package.requirement in dependencies
    assert f"torch>={deps.TORCH_MINIMUM}" in dependencies


# -- what the worker imports ----------------------------------------------------------------------------


def engine_imports() -> set[str]:
    """Top-level names of every import in GaussianSVRLib, including those inside functions; a script's
    import of a script beside it (the data scripts) is no package."""
    names: set[str] = set()
    for path in (REPO / "GaussianSVRLib").rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        names |= found - {beside.stem for beside in path.parent.glob("*.py")}
    return names - set(sys.stdlib_module_names) - {"GaussianSVRLib"}


def test_every_package_the_engine_imports_is_declared_or_deliberately_left_out():
    declared = {p.import_name for p in deps.PACKAGES}
    imported = engine_imports()
    assert imported <= SLICER_PROVIDES | declared | set(UNDECLARED), "declare it in deps.PACKAGES"
    assert declared | set(UNDECLARED) <= imported, "no longer imported: remove it"
    assert not declared & set(UNDECLARED)


BLOCKER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec returns None
assert sys.argv[1] == "-m"
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_worker_without(
    blocked: set[str], stacks: list[Path], masks: list[Path | None], tmp_path: Path
) -> list:
    """The module's worker command on the tiny phantom, with ``blocked`` modules unimportable."""
    blocker = tmp_path / "blocker.py"
    blocker.write_text(BLOCKER.format(blocked=sorted(blocked)), encoding="utf-8")
    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    settings.update(TINY_SETTINGS, preset=params.Preset.PREVIEW, device=params.Device.CPU, iterations=1)
    files = command.RunFiles.in_folders(tmp_path / "out", tmp_path / "work", "recon")
    for folder in (files.volume.parent, files.preview_dir):
        folder.mkdir(parents=True, exist_ok=True)
    stack_files = [command.StackFiles(path, mask, 4.0) for path, mask in zip(stacks, masks, strict=True)]
    args = command.reconstruct_command([sys.executable, str(blocker)], stack_files, files, settings)
    worker = WorkerProcess(args, env=command.worker_environment(os.environ, REPO), cwd=tmp_path)
    worker.start()
    events: list = []
    deadline = time.monotonic() + 240
    while not (events and events[-1].kind is EventKind.EXITED):
        if time.monotonic() > deadline:
            worker.kill()
            raise AssertionError(f"worker did not finish; last events: {events[-5:]}")
        events += worker.poll()
        time.sleep(0.05)
    return events


def test_the_worker_runs_with_only_the_required_packages(phantom_files, phantom_masks, tmp_path):
    blocked = {p.import_name for p in deps.PACKAGES if not p.required} | set(UNDECLARED)
    events = run_worker_without(blocked, phantom_files, phantom_masks, tmp_path)
    log = [e.text for e in events if e.kind is not EventKind.MESSAGE and e.text]
    assert events[-1].returncode == 0, log[-20:]
    done = [e.message for e in events if e.kind is EventKind.MESSAGE and e.message["type"] == "done"]
    assert done and Path(done[0]["volume"]).is_file()


def test_the_worker_fails_without_a_required_package(phantom_files, phantom_masks, tmp_path):
    events = run_worker_without({SCIPY.import_name}, phantom_files, phantom_masks, tmp_path)
    assert events[-1].returncode != 0
    log = [e.text for e in events if e.kind is not EventKind.EXITED]
    assert any("ModuleNotFoundError" in line and "scipy" in line for line in log), log[-10:]


# -- pip -------------------------------------------------------------------------------------------------


def test_constraints_pin_slicers_packages_and_nothing_else():
    text = deps.constraints_text({"numpy": "2.4.6", "vtk": None, "SimpleITK": "2.5.3"})
    assert text == "SimpleITK==2.5.3\nnumpy==2.4.6\n"
    args = deps.pip_install_arguments(NUMBA.requirement, "/tmp/c.txt")
    assert args[:3] == ["-m", "pip", "install"] and args[-2:] == ["-c", "/tmp/c.txt"]
    assert NUMBA.requirement in args and "--only-binary" in args
    assert not any(name.lower() in " ".join(args).lower() for name in ("numpy", "vtk", "simpleitk", "torch"))


def pip_dry_run(requirement: str, pins: dict[str, str | None], tmp_path: Path) -> subprocess.CompletedProcess:
    """The module's pip command, resolved offline against what this Python has installed."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(deps.constraints_text(pins), encoding="utf-8")
    args = [
        sys.executable,
        *deps.pip_install_arguments(requirement, str(constraints)),
        "--dry-run",
        "--no-index",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("package", deps.PACKAGES, ids=lambda p: p.distribution)
def test_pip_accepts_the_command_and_keeps_the_installed_numpy(package, tmp_path):
    pins = {"numpy": importlib.metadata.version("numpy")}
    result = pip_dry_run(package.requirement, pins, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Would install" not in result.stdout


def test_pip_refuses_rather_than_replace_a_pinned_numpy(tmp_path):
    result = pip_dry_run(NUMBA.requirement, {"numpy": "1.0.0"}, tmp_path)
    assert result.returncode != 0
    assert "numpy" in result.stdout + result.stderr
