"""Tests of GaussianSVRLib.io.outputs: atomic, verified writers; output sets; locks; where outputs may go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import assert_same_geometry, gaussians, listing, make_image

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.export import montage
from GaussianSVRLib.io import gaussians_file, outputs

# ---------------------------------------------------------------- images and JSON


@pytest.mark.parametrize("name, atol", [("out.nii.gz", 1e-5), ("out.nii", 1e-5), ("out.nrrd", 1e-9)])
def test_image_round_trip_keeps_geometry_and_values(tmp_path, name, atol):
    image = make_image()
    outputs.write_image(image, tmp_path / name)
    assert listing(tmp_path) == [name]
    back = sitk.ReadImage(str(tmp_path / name))
    assert back.GetSize() == image.GetSize()
    assert_same_geometry(back, image, atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_nii_gz_is_gzip_compressed(tmp_path):
    outputs.write_image(make_image(), tmp_path / "out.nii.gz")
    assert (tmp_path / "out.nii.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_two_file_formats_are_refused(tmp_path):
    with pytest.raises(InputError):
        outputs.write_image(make_image(), tmp_path / "out.nhdr")
    assert listing(tmp_path) == []


def test_json_converts_nan_and_numpy(tmp_path):
    data = {"psnr": np.float32(31.5), "ssim": float("nan"), "loss": [1.0, float("inf"), -float("inf")]}
    data["weights"] = np.array([0.5, np.nan])
    data["iterations"] = np.int64(7)
    outputs.write_json(data, tmp_path / "report.json")
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "psnr"')
    assert json.loads(text) == {
        "psnr": 31.5,
        "ssim": None,
        "loss": [1.0, None, None],
        "weights": [0.5, None],
        "iterations": 7,
    }


WRITERS = {
    "image": (lambda path: outputs.write_image(make_image(), path), "out.nii.gz"),
    "json": (lambda path: outputs.write_json({"a": 1}, path), "out.json"),
    "npz": (lambda path: gaussians_file.save_gaussians(path, *gaussians()), "out.npz"),
    "vtp": (lambda path: gaussians_file.write_ellipsoids(path, *gaussians()), "out.vtp"),
    "png": (lambda path: montage.write_montage(make_image(), path), "out.png"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_write_into_unwritable_folder_raises_and_leaves_nothing(tmp_path, kind):
    write, name = WRITERS[kind]
    (tmp_path / "not_a_folder").write_text("x")
    for folder in (tmp_path / "missing", tmp_path / "not_a_folder"):
        with pytest.raises(outputs.OutputError) as raised:
            write(folder / name)
        assert raised.value.path == str(folder / name) and "unchanged" in raised.value.problem
    assert listing(tmp_path) == ["not_a_folder"]


@pytest.mark.parametrize("kind", WRITERS)
def test_failed_rename_removes_temporary_and_keeps_old_file(tmp_path, kind, monkeypatch):
    write, name = WRITERS[kind]
    (tmp_path / name).write_bytes(b"previous")

    def failing_replace(src, dst):
        assert os.path.exists(src) and os.path.dirname(src) == os.path.dirname(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        write(tmp_path / name)
    assert listing(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == b"previous"


def truncating_write_image(image, path, *args, **kwargs):
    """What ITK's NIfTI writer does on a full disk: it writes part of the file, says so on stderr only,
    and returns as if it had succeeded."""
    real_write_image(image, path, *args, **kwargs)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


real_write_image = sitk.WriteImage


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd"])
def test_a_silently_truncated_image_is_caught_and_the_old_file_kept(tmp_path, monkeypatch, name):
    (tmp_path / name).write_bytes(b"previous")
    monkeypatch.setattr(outputs.sitk, "WriteImage", truncating_write_image)
    with pytest.raises(outputs.OutputError, match="could not be written"):
        outputs.write_image(make_image(), tmp_path / name)
    assert listing(tmp_path) == [name] and (tmp_path / name).read_bytes() == b"previous"


def test_an_output_set_appears_whole_or_not_at_all(tmp_path):
    (tmp_path / "a.json").write_text("old a")
    with outputs.OutputSet() as staged:
        staged.add(tmp_path / "a.json", lambda path: outputs.save_json({"a": 1}, path))
        staged.add(tmp_path / "b.nii.gz", lambda path: outputs.save_image(make_image(), path))
        assert (tmp_path / "a.json").read_text() == "old a" and not (tmp_path / "b.nii.gz").exists()
        with pytest.raises(outputs.OutputError, match="c.json"):
            staged.add(tmp_path / "missing" / "c.json", lambda path: outputs.save_json({}, path))
    # Left without a commit (the third failed): nothing new, the old file as it was, no temporary left.
    assert listing(tmp_path) == ["a.json"] and (tmp_path / "a.json").read_text() == "old a"
    with outputs.OutputSet() as staged:
        staged.add(tmp_path / "a.json", lambda path: outputs.save_json({"a": 1}, path))
        staged.add(tmp_path / "b.nii.gz", lambda path: outputs.save_image(make_image(), path))
        staged.commit()
    assert listing(tmp_path) == ["a.json", "b.nii.gz"] and json.loads((tmp_path / "a.json").read_text()) == {
        "a": 1
    }


# ---------------------------------------------------------------- where outputs may go


def test_targets_that_cannot_be_replaced_are_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "real.json").write_text("{}")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    refused = {
        "folder": "is a folder",
        "pipe": "not a regular file",
        "link.json": "symbolic link",
        "missing/out.json": "does not exist",
        "real.json/out.json": "is not a folder",
    }
    for name, problem in refused.items():
        with pytest.raises(InputError, match=problem):
            outputs.check_target(tmp_path / name, "JSON report")
    outputs.check_target(tmp_path / "real.json", "JSON report")
    outputs.check_target(tmp_path / "new.json", "JSON report")
    assert (tmp_path / "real.json").read_text() == "{}"


def test_an_input_under_another_name_is_refused(tmp_path):
    stack = tmp_path / "stack.nii.gz"
    stack.write_bytes(b"voxels")
    os.link(stack, tmp_path / "hard.nii.gz")
    os.symlink(stack, tmp_path / "soft.nii.gz")
    inputs = {stack: "input stack"}
    for name in ("stack.nii.gz", "hard.nii.gz", "soft.nii.gz", "sub/../stack.nii.gz"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError, match="would overwrite the input stack"):
            outputs.check_not_inputs({tmp_path / name: "output volume"}, inputs)
    with pytest.raises(InputError, match="both as the output volume and as the JSON report"):
        outputs.check_not_inputs(
            {tmp_path / "x": "output volume", tmp_path / "sub" / ".." / "x": "JSON report"}, inputs
        )
    outputs.check_not_inputs({tmp_path / "other.nii.gz": "output volume"}, inputs)


def test_a_second_run_is_kept_off_locked_outputs_and_a_stale_lock_is_taken_over(tmp_path):
    target = tmp_path / "volume.nii.gz"
    with outputs.OutputLock([target]):
        assert outputs.lock_path(target).exists()
        with pytest.raises(InputError, match=f"process {os.getpid()}"):
            with outputs.OutputLock([tmp_path / "other.json", target]):
                pass
        assert not outputs.lock_path(tmp_path / "other.json").exists(), "a half-taken set of locks was kept"
    assert listing(tmp_path) == []
    # A lock whose process has ended (a killed run) does not block the next run.
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    outputs.lock_path(target).write_text(f"{child.stdout.strip()} {socket.gethostname()}\n")
    with outputs.OutputLock([target]):
        assert outputs.lock_path(target).read_text().split()[0] == str(os.getpid())
    assert listing(tmp_path) == []
