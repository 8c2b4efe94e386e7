"""Installed as a user installs it: the wheel built from this repository holds the engine and its demo
data with their licences, and its ``gaussiansvr demo`` runs from any folder, with no repository in sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def printed(python: Path, code: str, **options) -> str:
    return subprocess.check_output([str(python), "-c", code], text=True, **options).strip()


@pytest.mark.slow
def test_the_wheel_holds_the_demo_data_and_its_demo_runs_from_anywhere(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info into the source folder.
    source = tmp_path / "source"
    left_out = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*output", "__pycache__")
    shutil.copytree(REPO, source, ignore=left_out)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(dist)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    required = ["cli.py", "io/outputs.py", "data/README.md", "data/atlas/LICENSE.txt",
                "data/atlas/SB_GA28_operated_T2w.nii.gz", "data/sub01/LICENSE_repo_BSD3.txt",
                "data/sub01/sub-01_run-6_T2w_desc-brain_mask.nii.gz", "data/standard/LICENSE.txt",
                "data/standard/GA21_T2w.nii.gz", "data/standard/GA34_brainmask.nii.gz"]  # fmt: skip
    for name in required:
        assert f"GaussianSVRLib/{name}" in names, name
    assert not any(name.startswith(("Testing/", "bench/", "GaussianSVR/")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = Path(printed(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    # torch and the other dependencies come from this environment: its site-packages on the new one's
    # path, as a plain folder (its .pth files, the editable install of this repository's among them, are
    # not read there).
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = printed(python, "import GaussianSVRLib; print(GaussianSVRLib.__file__)", cwd=elsewhere, env=env)
    assert Path(where).is_relative_to(venv), where
    done = subprocess.run(
        [str(venv / "bin" / "gaussiansvr"), "demo", "--output-dir", "out", "--preset", "preview",
         "--iterations", "1", "--device", "cpu"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("simulated", "sub01"):
        for name in (
            "volume.nii.gz",
            "gaussians.npz",
            "gaussians.vtp",
            "report.json",
            "qc.png",
            "montage.png",
        ):
            assert (elsewhere / "out" / case / name).is_file(), f"{case}/{name}"
    assert "naive_average" in done.stdout
