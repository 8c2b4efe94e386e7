"""Quality control: slice weights and exclusion reasons, the report's per-stack verdicts, the printed
table and the QC picture; and one short reconstruction with a planted signal drop-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.export.qc import (
    BAR_COLOUR,
    FRAME,
    MARGIN,
    MAX_BAR_WIDTH,
    NOT_ALIGNED,
    QC_WIDTH,
    REASON_COLOURS,
    STRIP_BACKGROUND,
    STRIP_HEIGHT,
    THUMBNAIL,
    qc_image,
    stack_block,
    summary_table,
    text_image,
    weight_strip,
    write_qc_png,
)
from GaussianSVRLib.export.report import (
    LOW_AGREEMENT,
    MIN_JUDGED_ITERATIONS,
    build_report,
    run_verdict,
    stack_verdict,
)
from GaussianSVRLib.fit.optimize import MIN_JUDGED_PIXELS, robust_weights
from GaussianSVRLib.io.slices import SliceSet, extract_slices
from GaussianSVRLib.io.stacks import Stack, read_stacks
from GaussianSVRLib.pipeline import Outputs, reconstruct
from GaussianSVRLib.settings import Settings

OUTLIER_Z = 3.5


def residuals(m: int, seed: int = 0) -> np.ndarray:
    """Residuals (m,) of well-fitting slices: 0.02 with a 3% spread."""
    return 0.02 * (1.0 + 0.03 * np.random.default_rng(seed).standard_normal(m))


def test_planted_residual_outliers_are_excluded_for_motion() -> None:
    residual = residuals(60)
    residual[[7, 31, 50]] = [0.05, 0.08, 0.2]
    residual[20] = 0.02 * (1 + 0.1 * 2.75)  # between FULL_WEIGHT_Z and outlier_z: down-weighted, kept
    quality = robust_weights(residual, np.ones(60), np.repeat([0, 1, 2], 20), OUTLIER_Z, np.full(60, 1000))
    assert np.nonzero(quality.excluded)[0].tolist() == [7, 31, 50]
    assert [quality.reason_code[i] for i in (7, 31, 50)] == ["motion"] * 3
    assert all("robust SD" in quality.reason[i] for i in (7, 31, 50))
    assert np.all(quality.weight[[7, 31, 50]] == 0.0)
    assert 0.0 < quality.weight[20] < 1.0 and quality.reason_code[20] is None
    kept = np.setdiff1d(np.arange(60), [7, 20, 31, 50])
    assert np.all(quality.weight[kept] == 1.0)


def test_intensity_outliers_are_dropout_or_too_bright_within_their_stack() -> None:
    scale = np.ones(40)
    scale[20:] = 3.0  # a stack with another intensity scale: not an outlier
    scale[5] = 0.2  # signal drop-out
    scale[12] = 2.5  # too bright for its stack
    scale[33] = 3.0 * 0.3  # drop-out in the bright stack
    quality = robust_weights(residuals(40), scale, np.repeat([0, 1], 20), OUTLIER_Z, np.full(40, 1000))
    assert np.nonzero(quality.excluded)[0].tolist() == [5, 12, 33]
    assert [quality.reason_code[i] for i in (5, 12, 33)] == ["dropout", "intensity", "dropout"]
    assert "signal drop-out" in quality.reason[5] and "x0.20" in quality.reason[5]
    assert np.all(quality.weight[[5, 12, 33]] == 0.0)


def test_small_slices_are_judged_by_their_pixel_count() -> None:
    n_pixels = np.full(40, 2000)
    residual = residuals(40)
    n_pixels[0], residual[0] = 120, 0.03  # an edge slice: few pixels, noisier residual
    n_pixels[1], residual[1] = 120, 0.2  # a small slice that really is wrong
    n_pixels[2], residual[2] = MIN_JUDGED_PIXELS - 1, 1.0  # too few pixels to judge at all
    scale = np.ones(40)
    scale[2] = 0.1
    stack = np.zeros(40, dtype=int)
    unequal = robust_weights(residual, scale, stack, OUTLIER_Z, n_pixels)
    assert np.nonzero(unequal.excluded)[0].tolist() == [1]
    assert unequal.weight[0] == 1.0 and unequal.weight[2] == 1.0 and unequal.reason_code[2] is None
    equal = robust_weights(residual, np.ones(40), stack, OUTLIER_Z, np.full(40, 2000))
    assert {0, 1, 2} <= set(np.nonzero(equal.excluded)[0].tolist())


def test_unknown_residuals_keep_full_weight() -> None:
    quality = robust_weights(np.full(5, np.nan), np.ones(5), np.zeros(5, dtype=int), OUTLIER_Z)
    assert np.all(quality.weight == 1.0) and not quality.excluded.any()
    assert quality.reason_code == [None] * 5 and np.isnan(quality.ncc).all()


# --- reports and pictures on small synthetic stacks -------------------------------------------


def write_stack(
    folder: Path, name: str, n_k: int, spacing: tuple[float, float, float], dim: list[int]
) -> tuple[str, str]:
    """A (n_k, 28, 24) stack of a textured disc and its mask; the first slice holds a few pixels only,
    the slices dim have lost signal (x DROPOUT_SCALE)."""
    k, j, i = np.mgrid[:n_k, :28, :24]
    radius = np.where(k == 0, 2.0, 9.0)
    mask = ((j - 14.0) ** 2 + (i - 12.0) ** 2 <= radius**2).astype(np.uint8)
    data = (100.0 + 40.0 * np.sin(j / 3.0) * np.cos(i / 4.0) + 5.0 * k) * mask
    data[dim] *= DROPOUT_SCALE
    paths = []
    for array, suffix in ((data.astype(np.float32), ".nii.gz"), (mask, "_mask.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        paths.append(str(folder / f"{name}{suffix}"))
        sitk.WriteImage(image, paths[-1])
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Stack], SliceSet]:
    folder = tmp_path_factory.mktemp("qc_stacks")
    pairs = [
        write_stack(folder, "a", 25, (1.0, 1.0, 3.0), DROPOUT),
        write_stack(folder, "b", 21, (1.2, 1.0, 3.0), []),
    ]
    stacks = read_stacks([p for p, _ in pairs], [m for _, m in pairs], None)
    return stacks, extract_slices(stacks)


#: Stack 1 (slices 0..24, slice 0 tiny): 7 motion and 2 drop-out slices; stack 2 (25..45): none.
MOTION = [3, 5, 8, 11, 14, 17, 20]
DROPOUT = [9, 22]
DROPOUT_SCALE = 0.15


def synthetic_run(slices: SliceSet, stack_2_ncc: float) -> tuple[object, np.ndarray]:
    """A SliceQuality with the planted rejections, and predictions (P,) as the volume would give them."""
    m = slices.n_slices
    residual = residuals(m)
    residual[MOTION] = 0.1
    scale = np.ones(m)
    scale[DROPOUT] = DROPOUT_SCALE
    n_pixels = np.bincount(slices.pixel_slice, minlength=m)
    quality = robust_weights(residual, scale, slices.slice_stack, OUTLIER_Z, n_pixels)
    quality.ncc = np.where(slices.slice_stack == 0, 0.97, stack_2_ncc)
    # With its slice scale the model reproduces every slice, drop-outs included.
    return quality, slices.values * 1.01


def report_of(stacks: list[Stack], slices: SliceSet, quality, scale: np.ndarray | None = None) -> dict:
    m = slices.n_slices
    return build_report(
        version="test",
        settings=Settings(),
        device="cpu",
        stacks=stacks,
        slices=slices,
        reference=0,
        n_gaussians=10,
        rotvec=np.zeros((m, 3)),
        translation=np.zeros((m, 3)),
        scale=np.where(np.isin(np.arange(m), DROPOUT), DROPOUT_SCALE, 1.0) if scale is None else scale,
        quality=quality,
        timings={},
        cancelled=False,
    )


def test_report_states_rejections_by_reason_and_agreement(small) -> None:
    stacks, slices = small
    quality, _ = synthetic_run(slices, stack_2_ncc=0.6)
    report = report_of(stacks, slices, quality)
    first, second = report["stacks"]
    assert first["n_excluded"] == 9 and first["rejected_by_reason"] == {
        "motion": 7,
        "dropout": 2,
        "intensity": 0,
    }
    assert first["verdict"].startswith(
        "stack 1: 9 of 25 slices rejected (7 for motion, 2 for signal drop-out)"
    )
    assert "agreement 0.97" in first["verdict"] and first["verdict"].endswith("consider re-acquiring")
    assert first["status"] == "reacquire" and first["agreement"] == pytest.approx(0.97)
    assert second["n_excluded"] == 0 and second["status"] == "warning" and second["agreement"] < LOW_AGREEMENT
    assert second["verdict"].startswith("stack 2: all 21 slices used, agreement 0.60 (low")
    by_index = report["slices"]
    assert [by_index[i]["reason_code"] for i in MOTION + DROPOUT] == ["motion"] * 7 + ["dropout"] * 2
    assert by_index[0]["n_pixels"] < MIN_JUDGED_PIXELS and not by_index[0]["excluded"]
    assert by_index[1]["ncc"] == pytest.approx(0.97)


def test_verdicts_of_good_stacks_are_short(small) -> None:
    stacks, slices = small
    quality = robust_weights(
        residuals(slices.n_slices), np.ones(slices.n_slices), slices.slice_stack, OUTLIER_Z
    )
    quality.ncc = np.full(slices.n_slices, 0.97)
    report = report_of(stacks, slices, quality, scale=np.ones(slices.n_slices))
    assert [s["verdict"] for s in report["stacks"]] == [
        "stack 1: all 25 slices used, agreement 0.97",
        "stack 2: all 21 slices used, agreement 0.97",
    ]
    assert all(s["status"] == "ok" for s in report["stacks"])
    counts = {"motion": 9, "dropout": 0, "intensity": 0}
    assert stack_verdict(2, 24, 9, counts, 0.9) == (
        "stack 3: 9 of 24 slices rejected for motion, agreement 0.90, consider re-acquiring"
    )
    assert stack_verdict(0, 20, 0, None, None) == "stack 1: all 20 slices used"


def test_summary_table_has_an_agreement_column_and_lists_rejections(small) -> None:
    stacks, slices = small
    quality, _ = synthetic_run(slices, stack_2_ncc=0.6)
    report = report_of(stacks, slices, quality)
    report["stacks"][1]["agreement"] = None
    lines = summary_table(report).splitlines()
    assert lines[0].split()[:6] == ["stack", "slices", "rejected", "residual", "agreement", "verdict"]
    assert lines[1].split()[:3] == ["1", "25", "9"] and lines[1].split()[4] == "0.97"
    assert lines[2].split()[:3] == ["2", "21", "0"] and lines[2].split()[4] == "n/a"
    assert report["stacks"][0]["verdict"] in lines[1]
    assert lines[3] == (
        "  stack 1 rejected slices: 3 (motion), 5 (motion), 8 (motion), 9 (signal drop-out), "
        "11 (motion), 14 (motion), 17 (motion), 20 (motion), 22 (signal drop-out)"
    )
    # Of two stacks, one disagreeing: no majority made the volume.
    assert lines[4].startswith("The stacks could not be brought together: 1 of 2 stacks agree poorly")
    assert "stacks 2 (0.60)" in lines[4] and len(lines) == 5
    assert lines[4][1:] == report["verdict"]["text"][1:]  # only the first letter raised


def test_the_run_is_not_aligned_when_half_of_the_stacks_disagree() -> None:
    good, bad = 0.97, LOW_AGREEMENT - 0.01
    assert run_verdict([good, good, good, bad], 400)["status"] == "ok"
    verdict = run_verdict([good, bad, good, bad], 400)
    assert verdict["status"] == "not_aligned" and verdict["stacks"] == [1, 3]
    assert "2 of 4 stacks" in verdict["text"] and "stacks 2 (0.84), 4 (0.84)" in verdict["text"]
    assert run_verdict([bad, bad, None], 400)["stacks"] == [0, 1]
    assert run_verdict([bad, None], 400)["status"] == "ok"  # one judged stack has nothing to agree with
    assert run_verdict([bad], 400)["status"] == "ok"
    short = run_verdict([bad, bad], MIN_JUDGED_ITERATIONS - 1)
    assert short["status"] == "not_judged" and short["stacks"] == []
    assert run_verdict([bad, bad], MIN_JUDGED_ITERATIONS)["status"] == "not_aligned"


def test_the_qc_png_says_in_red_when_the_stacks_were_not_brought_together(small) -> None:
    stacks, slices = small
    quality, predicted = synthetic_run(slices, stack_2_ncc=0.95)
    report = report_of(stacks, slices, quality)
    assert report["verdict"]["status"] == "ok"
    aligned = qc_image(report, stacks, slices, predicted)
    assert not np.all(aligned == NOT_ALIGNED, axis=-1).any()
    quality, predicted = synthetic_run(slices, stack_2_ncc=0.6)
    report = report_of(stacks, slices, quality)
    assert report["verdict"]["status"] == "not_aligned"
    flagged = qc_image(report, stacks, slices, predicted)
    red = np.nonzero(np.all(flagged == NOT_ALIGNED, axis=-1).any(axis=1))[0]
    title = text_image("title", width=QC_WIDTH).shape[0]
    added = flagged.shape[0] - aligned.shape[0]
    assert added > 0 and red.size and title <= red.min() and red.max() < title + added, "under the title"


def frames(image: np.ndarray, colour: tuple[int, int, int]) -> list[tuple[slice, slice]]:
    """Bounding boxes of the thumbnail frames of one colour (components of a frame's height)."""
    labels, _ = ndimage.label(np.all(image == colour, axis=-1))
    boxes = ndimage.find_objects(labels)
    return [box for box in boxes if box[0].stop - box[0].start == THUMBNAIL + 2 * FRAME]


def test_qc_png_shows_the_rejected_slices_of_each_stack(small, tmp_path: Path) -> None:
    stacks, slices = small
    quality, predicted = synthetic_run(slices, stack_2_ncc=0.95)
    report = report_of(stacks, slices, quality)
    path = tmp_path / "qc.png"
    write_qc_png(path, report, stacks, slices, predicted)
    written = sitk.ReadImage(str(path))
    assert written.GetNumberOfComponentsPerPixel() == 3
    array = sitk.GetArrayFromImage(written)
    assert array.shape[1:] == (QC_WIDTH, 3) and array.dtype == np.uint8
    assert np.array_equal(array, qc_image(report, stacks, slices, predicted))
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]

    motion, dropout = frames(array, REASON_COLOURS["motion"]), frames(array, REASON_COLOURS["dropout"])
    assert len(motion) == 7 and len(dropout) == 2
    tops = sorted({box[0].start for box in motion + dropout})
    assert len(tops) >= 2, "nine thumbnails fit on one row of the QC image"
    for rows, columns in dropout:
        inner = array[rows.start + FRAME : rows.stop - FRAME, columns.start + FRAME : columns.stop - FRAME]
        observed, expected = inner[:, :THUMBNAIL].mean(), inner[:, -THUMBNAIL:].mean()
        assert observed < 0.5 * expected, (observed, expected)


def test_qc_block_without_rejections_has_strip_but_no_thumbnails(small) -> None:
    stacks, slices = small
    quality, predicted = synthetic_run(slices, stack_2_ncc=0.95)
    report = report_of(stacks, slices, quality)
    with_rejections = stack_block(0, stacks[0], report, slices, predicted)
    without = stack_block(1, stacks[1], report, slices, predicted)
    assert without.shape[0] < with_rejections.shape[0] - THUMBNAIL
    assert not any(np.all(without == colour, axis=-1).any() for colour in REASON_COLOURS.values())
    assert np.all(without == BAR_COLOUR, axis=-1).any()


def test_weight_strip_bars_follow_weights_and_reasons() -> None:
    """Slices k = 0, 1, 2 of four: weight 1, weight 0.5, rejected for drop-out; k = 3 has no pixels."""
    strip = weight_strip(4, np.array([0, 1, 2]), np.array([1.0, 0.5, 0.0]), [None, None, "dropout"])
    assert strip.shape == (STRIP_HEIGHT, QC_WIDTH, 3)
    centres = [MARGIN + k * MAX_BAR_WIDTH + MAX_BAR_WIDTH // 2 for k in range(4)]

    def rows_of(colour: tuple[int, int, int]) -> list[int]:
        return [int(np.all(strip[:, c] == colour, axis=-1).sum()) for c in centres]

    assert rows_of(BAR_COLOUR) == [STRIP_HEIGHT, STRIP_HEIGHT // 2, 0, 0]
    assert rows_of(REASON_COLOURS["dropout"]) == [0, 0, STRIP_HEIGHT, 0]
    assert rows_of(STRIP_BACKGROUND) == [0, STRIP_HEIGHT // 2, 0, STRIP_HEIGHT]


def test_qc_output_must_be_png(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="png"):
        reconstruct(["missing.nii.gz"], outputs=Outputs(qc=str(tmp_path / "qc.jpg")))


# --- end to end -------------------------------------------------------------------------------

#: bias_correction "none": the NCC check below compares with the stack's own (uncorrected) voxels.
QUICK = Settings(
    n_gaussians=500,
    iterations=20,
    batch_pixels=4096,
    output_resolution=3.0,
    checkpoint_interval_s=1e9,
    bias_correction="none",
)
DROPOUT_FACTOR = 0.15


def test_reconstruction_flags_a_planted_dropout(phantom_stacks, tmp_path: Path) -> None:
    image = sitk.ReadImage(phantom_stacks.stack_paths[0])
    array = sitk.GetArrayFromImage(image)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(phantom_stacks.mask_paths[0])) > 0
    planted = int(np.argmax(mask.sum(axis=(1, 2))))
    array[planted] *= DROPOUT_FACTOR
    corrupted = sitk.GetImageFromArray(array)
    corrupted.CopyInformation(image)
    path = str(tmp_path / "stack0_dropout.nii.gz")
    sitk.WriteImage(corrupted, path)
    stack_paths = [path, *phantom_stacks.stack_paths[1:]]
    outputs = Outputs(report=str(tmp_path / "report.json"), qc=str(tmp_path / "qc.png"))
    result = reconstruct(stack_paths, phantom_stacks.mask_paths, None, QUICK, outputs)

    entry = next(s for s in result.report["slices"] if s["stack"] == 0 and s["k"] == planted)
    assert entry["excluded"] and entry["reason_code"] == "dropout", entry
    assert "signal drop-out" in result.report["stacks"][0]["verdict"]
    assert result.report["stacks"][0]["rejected_by_reason"]["dropout"] >= 1
    assert result.paths["qc"] == outputs.qc
    qc = sitk.ReadImage(outputs.qc)
    assert qc.GetNumberOfComponentsPerPixel() == 3 and qc.GetWidth() == QC_WIDTH
    assert frames(sitk.GetArrayFromImage(qc), REASON_COLOURS["dropout"])

    # The per-slice NCC is that of the observed and the returned predicted pixels.
    slices = extract_slices(read_stacks(stack_paths, phantom_stacks.mask_paths, None))
    quality = result.quality
    for i in np.nonzero(quality.n_pixels >= MIN_JUDGED_PIXELS)[0][::7]:
        on = slices.pixel_slice == i
        expected = np.corrcoef(slices.values[on], quality.predicted[on])[0, 1]
        assert quality.ncc[i] == pytest.approx(expected, abs=1e-4)
