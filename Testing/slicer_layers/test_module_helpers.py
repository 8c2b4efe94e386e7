"""The module's plain-Python helpers: the worker's command line and environment, and the QC summary
of a report (the dependency decisions are in test_deps.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from GaussianSVRSlicer import command, engine_path, params, report
from slicer_helpers import REPO

# -- command ------------------------------------------------------------------------------------------


def files(tmp_path: Path) -> command.RunFiles:
    return command.RunFiles.in_folders(tmp_path / "out", tmp_path / "work", "Brain_01")


def test_reconstruct_command_lists_stacks_masks_thicknesses_and_outputs(tmp_path):
    stacks = [
        command.StackFiles(Path("a.nrrd"), Path("ma.nrrd"), 3.0),
        command.StackFiles(Path("b.nrrd"), Path("mb.nrrd"), 2.5),
    ]
    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    run_files = files(tmp_path)
    args = command.reconstruct_command(["PythonSlicer"], stacks, run_files, settings)

    assert args[:4] == ["PythonSlicer", "-m", "GaussianSVRLib", "reconstruct"]

    def after(flag: str, count: int) -> list[str]:
        index = args.index(flag)
        return args[index + 1 : index + 1 + count]

    assert after("--input-stacks", 2) == ["a.nrrd", "b.nrrd"]
    assert after("--stack-masks", 2) == ["ma.nrrd", "mb.nrrd"]
    assert [float(t) for t in after("--thicknesses", 2)] == [3.0, 2.5]
    assert after("--output-volume", 1) == [str(tmp_path / "out" / "Brain_01.nii.gz")]
    assert after("--output-gaussians", 1) == [str(tmp_path / "out" / "Brain_01_gaussians.vtp")]
    assert run_files.gaussians_npz.name == "Brain_01_gaussians.npz"
    assert after("--preview-dir", 1) == [str(tmp_path / "work" / "preview")]
    assert after("--stop-file", 1) == [str(tmp_path / "work" / "stop")]
    assert after("--progress", 1) == ["json"]
    assert args[-len(params.engine_arguments(settings)) :] == params.engine_arguments(settings)


def test_the_engine_parses_the_command_into_the_chosen_settings(tmp_path):
    from GaussianSVRLib import cli

    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    settings.update(
        poseSearch=False,
        maskDilation=2.5,
        cutToBrain=False,
        biasCorrection=params.BiasCorrection.NONE,
        coarseToFine=False,
        device=params.Device.CPU,
        seed=7,
    )
    stacks = [command.StackFiles(Path("a.nrrd"), Path("ma.nrrd"), 3.0)]
    run_files = files(tmp_path)
    args = command.reconstruct_command(["py"], stacks, run_files, settings, tmp_path / "last.npz")
    parsed = cli.parser().parse_args(args[3:])
    engine = cli.settings_from(parsed)
    assert (engine.pose_search, engine.mask_dilation_mm, engine.bias_correction) == (False, 2.5, "none")
    assert engine.cut_to_brain is False
    assert (engine.coarse_to_fine, engine.device, engine.seed) == (False, "cpu", 7)
    assert engine.init_gaussians == str(tmp_path / "last.npz")
    assert parsed.output_qc == str(run_files.qc) and run_files.qc.name == "Brain_01_qc.png"
    defaults = cli.settings_from(
        cli.parser().parse_args(
            command.reconstruct_command(
                ["py"], stacks, run_files, {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
            )[3:]
        )
    )
    assert (defaults.pose_search, defaults.mask_dilation_mm, defaults.bias_correction) == (True, 0.0, "n4")
    assert defaults.cut_to_brain is True
    assert defaults.init_gaussians is None


def test_stacks_without_a_mask_get_the_placeholder(tmp_path):
    from GaussianSVRLib import cli

    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    unmasked = [command.StackFiles(Path("a.nrrd"), None, 3.0)]
    assert "--stack-masks" not in command.reconstruct_command(["py"], unmasked, files(tmp_path), settings)
    mixed = [*unmasked, command.StackFiles(Path("b.nrrd"), Path("m.nrrd"), 3.0)]
    args = command.reconstruct_command(["py"], mixed, files(tmp_path), settings)
    masks = args[args.index("--stack-masks") + 1 :][:2]
    assert masks == [command.NO_MASK, "m.nrrd"]
    with pytest.raises(ValueError, match="no input"):
        command.reconstruct_command(["py"], [], files(tmp_path), settings)
    boxed = command.reconstruct_command(
        ["py"], unmasked, files(tmp_path), settings, roi=tmp_path / "roi.mrk.json"
    )
    assert cli.parser().parse_args(boxed[3:]).roi_from == str(tmp_path / "roi.mrk.json")


def test_worker_environment_puts_the_engine_first(tmp_path):
    env = command.worker_environment({"PYTHONPATH": "/slicer/lib", "HOME": "/home/x"}, tmp_path)
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/slicer/lib"
    assert env["HOME"] == "/home/x" and env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8"
    assert command.worker_environment({}, tmp_path)["PYTHONPATH"] == str(tmp_path)


def test_engine_and_interpreter_are_found():
    assert engine_path.find_engine_dir() == REPO
    assert command.python_command(lambda name: "/opt/Slicer/bin/PythonSlicer") == [
        "/opt/Slicer/bin/PythonSlicer"
    ]
    assert command.python_command(lambda name: None) == [sys.executable]


def test_engine_found_in_the_source_layout_when_not_on_the_path(tmp_path, monkeypatch):
    module_dir = tmp_path / "repo" / "GaussianSVR" / "GaussianSVRSlicer"
    module_dir.mkdir(parents=True)
    (tmp_path / "repo" / "GaussianSVRLib").mkdir()
    (tmp_path / "repo" / "GaussianSVRLib" / "__init__.py").write_text("")
    monkeypatch.setattr(engine_path.importlib.util, "find_spec", lambda name: None)
    assert engine_path.find_engine_dir(module_dir) == tmp_path / "repo"
    with pytest.raises(FileNotFoundError, match="reinstall"):
        engine_path.find_engine_dir(tmp_path / "elsewhere" / "GaussianSVRSlicer")


def test_safe_file_name():
    assert command.safe_file_name("Fetus 3/T2 (recon)") == "Fetus_3_T2__recon"
    assert command.safe_file_name("..") == "reconstruction"


# -- QC summary ------------------------------------------------------------------------------------------


def sample_report() -> dict:
    slices = [
        {
            "stack": s,
            "k": k,
            "excluded": (s, k) in {(0, 3), (1, 0)},
            "reason": "motion <b>outlier</b>" if s else None,
        }
        for s in range(2)
        for k in range(5)
    ]
    return {
        "device": "cuda",
        "timings": {"read_s": 1.0, "optimize_s": 60.0, "total_s": 65.0},
        "slices": slices,
        "stacks": [
            {
                "path": "/tmp/x/stack_00.nrrd",
                "n_slices": 5,
                "n_excluded": 1,
                "verdict": "stack 1: 1 of 5 slices rejected",
            },
            {
                "path": "/tmp/x/stack_01.nrrd",
                "n_slices": 5,
                "n_excluded": 1,
                "verdict": "stack 2: 1 of 5 slices rejected",
            },
        ],
    }


def test_qc_summary_lists_stacks_and_excluded_slices_with_reasons():
    data = sample_report()
    assert report.excluded_slices(data) == [(0, 3, "outlier"), (1, 0, "motion <b>outlier</b>")]
    assert report.total_seconds(data) == 65.0
    html = report.summary_html(data, ["Axial T2", "Coronal <T2>"])
    assert "2 of 10 slices excluded" in html and "device cuda" in html and "1 min 05 s" in html
    assert "Axial T2" in html and "Coronal &lt;T2&gt;" in html and "stack_00" not in html
    assert (
        "stack 1, slice 3: outlier" in html and "stack 2, slice 0: motion &lt;b&gt;outlier&lt;/b&gt;" in html
    )
    assert "stack_01.nrrd" in report.summary_html(data)  # no names given: the file names


def test_qc_summary_caps_the_list():
    data = sample_report()
    for entry in data["slices"]:
        entry["excluded"] = True
    html = report.summary_html(data, max_listed=3)
    assert html.count("<li>") == 4 and "and 7 more" in html


def test_qc_summary_leads_with_stacks_that_were_not_brought_together():
    data = sample_report()
    assert "could not be" not in report.summary_html(data)
    data["verdict"] = {"status": "not_aligned", "stacks": [0, 1], "text": "the stacks could not be <joined>"}
    html = report.summary_html(data)
    assert html.startswith("<p><b><font color='#d03030'>The stacks could not be &lt;joined&gt;.")
