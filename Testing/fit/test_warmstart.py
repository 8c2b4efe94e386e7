"""Warm start (--init-gaussians): continuing a finished or cancelled run; refusing foreign files."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from GaussianSVRLib.cli import EXIT_INPUT_ERROR
from GaussianSVRLib.fit.warmstart import (
    file_digest,
    initial_slice_state,
    read_saved,
    repivot,
    scales_and_quaternions,
)
from GaussianSVRLib.geometry import rotvec_to_matrix_np
from GaussianSVRLib.io.gaussians_file import load_gaussians, save_gaussians
from GaussianSVRLib.io.slices import extract_slices
from GaussianSVRLib.io.stacks import read_stacks
from GaussianSVRLib.model.gaussians import GaussianField
from GaussianSVRLib.pipeline import Outputs, reconstruct
from GaussianSVRLib.qa.metrics import evaluate
from GaussianSVRLib.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TINY = Settings(
    iterations=60, n_gaussians=1500, batch_pixels=4096, output_resolution=1.6, checkpoint_interval_s=1e9
)
#: Every learning rate at zero: a continued run must then reproduce the saved one exactly.
FROZEN = {
    name: 0.0
    for name in (
        "lr_means",
        "lr_scales",
        "lr_quaternions",
        "lr_intensities",
        "lr_rotation",
        "lr_translation",
        "lr_slice_scale",
    )
}
SHORT = 5


def ncc(a: sitk.Image, b: sitk.Image, mask: sitk.Image) -> float:
    inside = sitk.GetArrayFromImage(sitk.Resample(mask, a, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    return float(np.corrcoef(sitk.GetArrayFromImage(a)[inside], sitk.GetArrayFromImage(b)[inside])[0, 1])


def mapped_centres(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Where each saved slice map puts its slice centre: c + t (the rotation pivots at c)."""
    return arrays["slice_centre"] + arrays["slice_translation"]


@pytest.fixture(scope="module")
def first_run(phantom_stacks, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    outputs = Outputs(str(out / "volume.nii.gz"), str(out / "gaussians"))
    result = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, TINY, outputs)
    return result, str(out / "gaussians.npz")


def test_covariances_round_trip_through_scales_and_quaternions():
    rng = np.random.default_rng(0)
    n = 500
    scales = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (n, 3)))
    scales[:5] = 2.0  # isotropic: any frame will do
    quaternions = rng.normal(size=(n, 4))
    field_ = GaussianField(torch.zeros(n, 3), torch.tensor(scales), torch.zeros(n), torch.tensor(quaternions))
    covariances = field_.covariances().detach().numpy()
    back_scales, back_quaternions = scales_and_quaternions(covariances)
    assert np.allclose(np.linalg.norm(back_quaternions, axis=1), 1.0)
    assert np.allclose(back_scales, np.sort(scales, axis=1), rtol=1e-6)
    rebuilt = GaussianField(
        torch.zeros(n, 3), torch.tensor(back_scales), torch.zeros(n), torch.tensor(back_quaternions)
    )
    assert np.allclose(rebuilt.covariances().detach().numpy(), covariances, rtol=1e-6, atol=1e-9)


def test_repivoting_keeps_the_slice_map():
    rng = np.random.default_rng(1)
    rotvec, translation = rng.normal(0, 0.3, (20, 3)), rng.normal(0, 5, (20, 3))
    centre, new_centre, points = (rng.normal(0, 50, (20, 3)) for _ in range(3))
    moved = repivot(rotvec, translation, centre, new_centre)
    rotation = rotvec_to_matrix_np(rotvec)
    before = np.einsum("mij,mj->mi", rotation, points - centre) + centre + translation
    after = np.einsum("mij,mj->mi", rotation, points - new_centre) + new_centre + moved
    assert np.allclose(before, after)


def test_the_gaussians_file_identifies_every_slice(first_run, phantom_stacks):
    result, npz = first_run
    arrays = load_gaussians(npz)
    m = len(result.report["slices"])
    assert arrays["slice_rotation"].shape == arrays["slice_centre"].shape == (m, 3)
    assert [int(k) for k in arrays["slice_k"]] == [s["k"] for s in result.report["slices"]]
    assert list(arrays["stack_digests"]) == [file_digest(p) for p in phantom_stacks.stack_paths]
    assert [tuple(shape) for shape in arrays["stack_shapes"]] == [
        sitk.GetArrayFromImage(sitk.ReadImage(p)).shape for p in phantom_stacks.stack_paths
    ]


def test_a_frozen_continuation_reproduces_the_run(first_run, phantom_stacks, phantom):
    """Zero learning rates: the continued run must predict and export exactly what was saved, whatever
    n_gaussians says (the file's count wins)."""
    result, npz = first_run
    # Given as its stem, as --output-gaussians was: the .npz is meant.
    settings = TINY.updated(iterations=1, n_gaussians=300, init_gaussians=npz[: -len(".npz")], **FROZEN)
    again = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, settings)
    assert again.report["n_gaussians"] == result.report["n_gaussians"]
    assert ncc(again.volume, result.volume, phantom[1]) > 0.9999
    for before, after in zip(result.report["slices"], again.report["slices"], strict=True):
        assert np.allclose(before["rotation"], after["rotation"], atol=1e-4)
        assert np.allclose(before["translation"], after["translation"], atol=1e-3)
    for key in ("means", "intensities"):
        assert np.allclose(again.gaussians[key], result.gaussians[key], rtol=1e-4, atol=1e-3), key


def test_continuing_is_close_to_the_run_and_far_better_than_starting_over(first_run, phantom_stacks, phantom):
    """Default learning rates: Adam's first steps move every parameter by about its learning rate, so
    a few steps shake a converged run a little (measured: NCC 0.95 with the first run, same PSNR)
    where a fresh run is nowhere yet (NCC 0.42, 2.6 dB below)."""
    result, npz = first_run
    volume, mask = phantom
    short = TINY.updated(iterations=SHORT)
    continued = reconstruct(
        phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, short.updated(init_gaussians=npz)
    )
    fresh = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, short)
    psnr = {name: evaluate(r.volume, volume, mask)["psnr"] for name, r in
            (("first", result), ("continued", continued), ("fresh", fresh))}  # fmt: skip
    similarity = {
        name: ncc(r.volume, result.volume, mask) for name, r in (("continued", continued), ("fresh", fresh))
    }
    assert similarity["continued"] > 0.93 > similarity["fresh"] + 0.3, similarity
    assert psnr["continued"] > psnr["first"] - 0.5, psnr
    assert psnr["fresh"] < psnr["first"] - 1.5, psnr


def test_a_cancelled_run_continues_from_its_preview(phantom_stacks, tmp_path):
    polls = iter(range(1_000_000))
    cancelled = reconstruct(
        phantom_stacks.stack_paths,
        phantom_stacks.mask_paths,
        None,
        TINY,
        Outputs(preview_dir=str(tmp_path / "preview")),
        should_stop=lambda: next(polls) >= 8,
    )
    assert cancelled.cancelled
    preview = cancelled.paths["gaussians"]
    saved = load_gaussians(preview)
    settings = TINY.updated(iterations=1, init_gaussians=preview, **FROZEN)
    again = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, settings)
    assert np.allclose(again.gaussians["means"], saved["means"], atol=1e-3)
    assert np.allclose(again.gaussians["intensities"], saved["intensities"], rtol=1e-4, atol=1e-3)
    centres = np.array([np.add(s["centre"], s["translation"]) for s in again.report["slices"]])
    assert np.allclose(centres, mapped_centres(saved), atol=1e-3)


def test_slices_are_matched_by_content_and_new_ones_are_placed(first_run, phantom_stacks, tmp_path):
    """Stack 0 copied elsewhere (same bytes): matched. Stack 1 saved without its middle slices (a mask
    that grew): those take the stack's median map. Stack 2 rewritten as NRRD with 1.5x intensities (a
    new file): registered to a known stack, with a 1.5x scale."""
    _, npz = first_run
    arrays = load_gaussians(npz)
    copy = tmp_path / "renamed.nii.gz"
    copy.write_bytes(Path(phantom_stacks.stack_paths[0]).read_bytes())
    brighter = tmp_path / "brighter.nrrd"
    sitk.WriteImage(sitk.ReadImage(phantom_stacks.stack_paths[2], sitk.sitkFloat32) * 1.5, str(brighter))
    on_1 = np.nonzero(arrays["slice_stack"] == 1)[0]
    dropped = on_1[len(on_1) // 2 - 2 : len(on_1) // 2 + 2]
    kept = np.setdiff1d(np.arange(len(arrays["slice_stack"])), dropped)
    partial = {key: value[kept] if key.startswith("slice_") else value for key, value in arrays.items()}
    save_gaussians(tmp_path / "partial.npz", **partial)

    stacks = read_stacks([str(copy), phantom_stacks.stack_paths[1], str(brighter)], phantom_stacks.mask_paths)
    slices = extract_slices(stacks)
    rotvec, translation, log_scale = initial_slice_state(
        read_saved(tmp_path / "partial.npz"), stacks, slices, 0, 0
    )
    assert np.array_equal(slices.slice_k, arrays["slice_k"])  # same slices as the saved run
    centres = slices.slice_centre + translation
    expected = mapped_centres(arrays)
    on_0 = slices.slice_stack == 0
    assert np.allclose(rotvec[on_0], arrays["slice_rotation"][on_0], atol=1e-9)
    assert np.allclose(centres[on_0], expected[on_0], atol=1e-6)
    # Simulated motion is within 2 degrees and 1 mm per slice: a stack's median map is that close.
    assert np.all(np.linalg.norm(centres[dropped] - expected[dropped], axis=1) < 2.5)
    assert np.allclose(rotvec[dropped], rotvec[dropped[0]])
    on_2 = slices.slice_stack == 2
    error = np.linalg.norm(centres[on_2] - expected[on_2], axis=1)
    assert np.median(error) < 2.0, error
    turned = rotvec_to_matrix_np(rotvec[on_2]) @ rotvec_to_matrix_np(
        arrays["slice_rotation"][on_2]
    ).transpose(0, 2, 1)
    angles = np.degrees(np.arccos(np.clip((np.trace(turned, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.median(angles) < 4.0, angles
    saved_reference = arrays["slice_stack"] == int(arrays["reference_stack"])
    scale_2 = np.median(arrays["slice_scale"][on_2]) / np.median(arrays["slice_scale"][saved_reference])
    assert np.exp(np.median(log_scale[on_2])) == pytest.approx(1.5 * scale_2, rel=0.15)


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "GaussianSVRLib", "reconstruct", *args, "--iterations", "2"]
    return subprocess.run(
        command, cwd=REPO, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True, timeout=240
    )


def test_the_command_line_refuses_a_foreign_or_broken_file(first_run, phantom_stacks, tmp_path):
    _, npz = first_run
    arrays = load_gaussians(npz)
    foreign = dict(
        arrays, stack_digests=np.array(["0" * 64] * 3), stack_paths=np.array(["/elsewhere/a.nii"] * 3)
    )
    broken = dict(arrays, slice_scale=arrays["slice_scale"][:-1])
    old = {key: arrays[key] for key in ("means", "covariances", "intensities")}
    cases = {"none of its slices": foreign, "inconsistent": broken, "no slice transforms": old}
    runs = []
    for n, (problem, content) in enumerate(cases.items()):
        path = tmp_path / f"case{n}.npz"
        save_gaussians(path, **content)
        out = tmp_path / f"out{n}"
        out.mkdir()
        args = ["--input-stacks", *phantom_stacks.stack_paths, "--stack-masks", *phantom_stacks.mask_paths,
                "--output-volume", str(out / "v.nii.gz"), "--preview-dir", str(out / "preview"),
                "--init-gaussians", str(path)]  # fmt: skip
        runs.append((problem, path, out, args))
    with ThreadPoolExecutor(len(runs)) as pool:
        done = list(pool.map(run_cli, [args for *_, args in runs]))
    for (problem, path, out, _), process in zip(runs, done, strict=True):
        lines = process.stderr.strip().splitlines()
        assert process.returncode == EXIT_INPUT_ERROR, process.stderr
        assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], lines
        assert os.listdir(out) == []
