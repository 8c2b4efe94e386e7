"""N4 bias field correction of a stack (bias.py) on a synthetic thick-slice stack of known anatomy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.fit.bias import correct_bias
from GaussianSVRLib.geometry import apply_affine, rotvec_to_matrix_np
from GaussianSVRLib.io.stacks import Stack

TISSUES = {"background": 0.0, "white matter": 100.0, "cortex": 160.0, "ventricles": 260.0}


def stack_geometry() -> tuple[np.ndarray, np.ndarray]:
    """An oblique 256 x 256 x 30 stack, 1 mm in-plane, 3 mm slices.

    Returns its affine (4, 4) and the world position of every voxel [k, j, i, 3].
    """
    direction = rotvec_to_matrix_np(np.array([0.2, -0.1, 0.3]))
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag([1.0, 1.0, 3.0])
    affine[:3, 3] = -affine[:3, :3] @ np.array([127.5, 127.5, 14.5]) + np.array([5.0, -3.0, 2.0])
    kk, jj, ii = np.meshgrid(np.arange(30), np.arange(256), np.arange(256), indexing="ij")
    return affine, apply_affine(affine, np.stack([ii, jj, kk], -1).astype(np.float64))


def brain(world: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Nested ellipsoids (mask: the brain, 45 x 38 x 32 mm semi-axes) with 2 % noise: data, mask."""
    centre = np.array([5.0, -3.0, 2.0])

    def inside(radii: tuple[float, ...], shift: tuple[float, ...] = (0.0, 0.0, 0.0)) -> np.ndarray:
        return (((world - centre - np.asarray(shift)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0

    mask = inside((45.0, 38.0, 32.0))
    data = np.where(mask, TISSUES["cortex"], TISSUES["background"])
    data = np.where(inside((40.0, 33.0, 27.0)), TISSUES["white matter"], data)
    for side in (-1.0, 1.0):
        data = np.where(inside((6.0, 18.0, 8.0), (side * 9.0, 0.0, 0.0)), TISSUES["ventricles"], data)
    noisy = data + rng.normal(0.0, 0.02 * TISSUES["white matter"], data.shape) + 1.0
    return noisy.astype(np.float32), mask


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    affine, world = stack_geometry()
    data, mask = brain(world, rng)
    x = (world - world[mask].mean(0)) / 40.0
    # A smooth field of +/-30 % over the brain, oblique to the stack axes, varying through the slices too.
    log_field = 0.25 * x[..., 0] - 0.2 * x[..., 1] + 0.15 * x[..., 2] + 0.1 * x[..., 0] ** 2
    log_field -= log_field[mask].mean()
    wm = np.abs(data - TISSUES["white matter"]) < 10.0
    return {"affine": affine, "data": data, "mask": mask, "log_field": log_field, "wm": wm & mask}


def make_stack(scene: dict[str, np.ndarray], data: np.ndarray) -> Stack:
    return Stack("synthetic.nii.gz", data, scene["mask"].copy(), scene["affine"].copy(), 3.0, "mask.nii.gz")


def cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.fixture(scope="module")
def biased(scene) -> dict[str, object]:
    """The scene under its bias field, a snapshot of that input, and its correction."""
    stack = make_stack(scene, (scene["data"] * np.exp(scene["log_field"])).astype(np.float32))
    snapshot = (stack.data.copy(), stack.mask.copy(), stack.affine.copy(), stack.thickness)
    return {"stack": stack, "snapshot": snapshot, "corrected": correct_bias(stack)}


def test_known_field_is_flattened(scene, biased):
    clean, mask, wm = scene["data"], scene["mask"], scene["wm"]
    stack, corrected = biased["stack"], biased["corrected"]
    # Within one tissue the field is the only large source of variation.
    assert cv(corrected.data[wm]) < 0.5 * cv(stack.data[wm])
    assert cv(corrected.data[mask]) < cv(stack.data[mask])
    # The estimated field is the true one up to a constant factor, everywhere inside the brain.
    before = np.log(stack.data[mask] / clean[mask])
    after = np.log(corrected.data[mask] / clean[mask])
    assert after.std() < 0.25 * before.std()
    # The level of the stack is kept (geometric-mean-one field).
    assert abs(np.median(after)) < 0.05


def test_flat_stack_stays_unchanged(scene):
    stack = make_stack(scene, scene["data"].copy())
    corrected = correct_bias(stack)
    ratio = corrected.data[scene["mask"]] / stack.data[scene["mask"]]
    assert np.abs(ratio - 1.0).max() < 0.03
    assert np.all(np.isfinite(corrected.data))


def test_input_untouched_and_output_complete(scene, biased):
    stack, corrected = biased["stack"], biased["corrected"]
    data, mask, affine, thickness = biased["snapshot"]
    assert np.array_equal(stack.data, data) and np.array_equal(stack.mask, mask)
    assert np.array_equal(stack.affine, affine) and stack.thickness == thickness
    assert corrected is not stack and not np.shares_memory(corrected.data, stack.data)
    assert corrected.data.shape == stack.data.shape and corrected.data.dtype == np.float32
    assert np.array_equal(corrected.mask, stack.mask) and np.array_equal(corrected.affine, stack.affine)
    assert (corrected.path, corrected.thickness, corrected.mask_path) == (stack.path, 3.0, "mask.nii.gz")
    # Every voxel is corrected (outside the fitting crop too), by a positive finite factor.
    factor = corrected.data / stack.data
    assert np.all(np.isfinite(factor)) and np.all(factor > 0)
    assert not np.allclose(factor[~scene["mask"]], 1.0)


class Stop(Exception):
    """Raised where the test has seen what it needs, before any optimization."""


@pytest.mark.parametrize("mode", ["none", "n4"])
def test_pipeline_corrects_stacks_when_asked(phantom_stacks, monkeypatch, mode):
    """--bias-correction reaches the settings, and reconstruct() hands N4-corrected stacks on."""
    from GaussianSVRLib import pipeline
    from GaussianSVRLib.cli import parser, settings_from

    args = parser().parse_args(
        [
            "reconstruct",
            "--input-stacks",
            "s.nii.gz",
            "--output-volume",
            "v.nii.gz",
            "--bias-correction",
            mode,
        ]
    )
    settings = settings_from(args)
    assert settings.bias_correction == mode
    corrected, seen = [], []

    def fake_correction(stack: Stack) -> Stack:
        corrected.append(stack.path)
        return replace(stack, data=stack.data * 2.0)

    def stop(stacks, *_):
        seen.extend(stacks)
        raise Stop

    monkeypatch.setattr(pipeline, "correct_bias", fake_correction)
    monkeypatch.setattr(pipeline, "prepare", stop)
    with pytest.raises(Stop):
        pipeline.reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, settings=settings)
    originals = [
        np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(path))) for path in phantom_stacks.stack_paths
    ]
    factor = 2.0 if mode == "n4" else 1.0
    assert corrected == (phantom_stacks.stack_paths if mode == "n4" else [])
    pairs = zip(seen, originals, strict=True)
    assert all(np.allclose(s.data * s.intensity_unit, factor * o) for s, o in pairs)
