"""Tests of GaussianSVRLib.export.montage: three planes in the patient frame, windowed, titled."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import OBLIQUE, PERMUTED, listing, phantom

from GaussianSVRLib.export import montage

# ---------------------------------------------------------------- montage


def read_png(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    assert image.GetDimension() == 2 and image.GetPixelID() == sitk.sitkUInt8
    return sitk.GetArrayFromImage(image)


def png_panels(png: np.ndarray, planes) -> list[np.ndarray]:
    """The panels of a montage PNG, each reduced back to its plane's pixels (one per enlarged block)."""
    factor = montage.display_factor(planes)
    panels, column = [], 0
    for plane in planes:
        rows, columns = plane.shape[0] * factor, plane.shape[1] * factor
        block = png[:rows, column : column + columns]
        assert np.array_equal(block, np.kron(block[::factor, ::factor], np.ones((factor, factor), np.uint8)))
        panels.append(block[::factor, ::factor])
        column += columns + montage.MONTAGE_GAP
    assert column - montage.MONTAGE_GAP == png.shape[1]
    return panels


def bright_side(panel: np.ndarray) -> tuple[str, str]:
    """('top' or 'bottom', 'left' or 'right'): where the bright pixels' centroid is."""
    rows, columns = np.nonzero(panel > 128)
    assert rows.size > 0.1 * panel.size
    vertical = "top" if rows.mean() < (panel.shape[0] - 1) / 2 else "bottom"
    horizontal = "left" if columns.mean() < (panel.shape[1] - 1) / 2 else "right"
    return vertical, horizontal


def left_anterior_superior(world: np.ndarray) -> np.ndarray:
    # LPS: patient left is +x, anterior is -y, superior is +z. The 5 mm margin crosses the centre planes.
    return (world[..., 0] > -5.0) & (world[..., 1] < 5.0) & (world[..., 2] > -5.0)


@pytest.mark.parametrize("direction", [np.eye(3), PERMUTED, OBLIQUE], ids=["identity", "permuted", "oblique"])
def test_montage_orientation_follows_the_patient(tmp_path, direction):
    image = phantom(left_anterior_superior, (36, 32, 12), (1.2, 1.2, 3.5), direction)
    montage.write_montage(image, tmp_path / "m.png")
    assert listing(tmp_path) == ["m.png"]
    png = read_png(tmp_path / "m.png")
    axial, coronal, sagittal = png_panels(png, montage.montage_planes(image))
    assert bright_side(axial) == ("top", "right")  # anterior up, patient left on the right
    assert bright_side(coronal) == ("top", "right")  # superior up, patient left on the right
    assert bright_side(sagittal) == ("top", "left")  # superior up, anterior on the left


def test_montage_pixels_are_square_for_thick_slices(tmp_path):
    image = phantom(left_anterior_superior, (40, 40, 10), (1.0, 1.0, 4.0), np.eye(3))
    axial, coronal, sagittal = montage.montage_planes(image)
    assert axial.shape == (40, 40) and coronal.shape == (40, 40) and sagittal.shape == (40, 40)
    montage.write_montage(image, tmp_path / "m.png")
    side = 40 * montage.display_factor((axial, coronal, sagittal))
    assert side >= montage.MIN_DISPLAY_PIXELS  # small panels are enlarged to be readable
    assert read_png(tmp_path / "m.png").shape == (side, 3 * side + 2 * montage.MONTAGE_GAP)


def test_montage_is_capped_in_size():
    image = phantom(left_anterior_superior, (20, 20, 20), (40.0, 40.0, 40.0), np.eye(3))
    image.SetSpacing((0.5, 0.5, 0.5))  # 10 mm field of view with 0.5 mm pixels: 20 x 20
    assert montage.montage_planes(image)[0].shape == (20, 20)
    big = sitk.Image([2000, 10, 10], sitk.sitkUInt8)
    assert max(montage.montage_planes(big)[0].shape) == montage.MAX_PANEL_PIXELS


def test_montage_passes_through_the_mask_centre(tmp_path):
    def blob(world):
        return np.linalg.norm(world - np.array([12.0, -10.0, 9.0]), axis=-1) < 4.0

    image = phantom(blob, (60, 60, 60), (1.0, 1.0, 1.0), np.eye(3))
    mask = phantom(blob, (20, 20, 20), (2.0, 2.0, 2.0), PERMUTED, background=0, bright=1)  # another grid
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    assert all(np.nanmax(plane) < 1000.0 for plane in montage.montage_planes(image))
    with_mask = montage.montage_planes(image, mask)
    assert all(np.nanmax(plane) > 500.0 for plane in with_mask)
    # Cropped to the mask (8 mm across) plus the margin on both sides, give or take the mask's voxels.
    assert all(26 <= side <= 32 for plane in with_mask for side in plane.shape)
    montage.write_montage(image, tmp_path / "m.png", mask=mask)
    for panel in png_panels(read_png(tmp_path / "m.png"), with_mask):
        assert panel.max() == 255


def test_montage_window_is_1st_to_99th_percentile(tmp_path):
    ramp = np.broadcast_to(np.arange(101, dtype=np.float32), (9, 9, 101)).copy()  # along x, 0..100
    ramp[4, 4, 50] = 1e6  # one outlier must not wash out the picture
    image = sitk.GetImageFromArray(ramp)
    montage.write_montage(image, tmp_path / "m.png")
    axial = png_panels(read_png(tmp_path / "m.png"), montage.montage_planes(image))[0]
    row = axial[0].astype(float)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    np.testing.assert_allclose(row[50], 127.5, atol=4)


def test_montage_window_ignores_zero_padding(tmp_path):
    # A small object (0.4 % of the voxels) in zeros: the window must come from the object alone.
    volume = np.zeros((40, 40, 40), dtype=np.float32)
    volume[17:23, 17:23, 17:23] = np.linspace(100.0, 200.0, 6, dtype=np.float32)
    image = sitk.GetImageFromArray(volume)
    montage.write_montage(image, tmp_path / "m.png")
    axial = png_panels(read_png(tmp_path / "m.png"), montage.montage_planes(image))[0]
    # The view is cropped to the non-zero voxels plus the margin: 6 + 2 * 10 pixels.
    assert axial.shape == (26, 26)
    row = axial[13, 10:16].astype(float)
    assert row[0] == 0 and row[-1] == 255 and 60 < row[2] < 160


def test_montage_title_is_drawn_above(tmp_path):
    image = phantom(left_anterior_superior, (30, 30, 10), (1.0, 1.0, 3.0), np.eye(3))
    montage.write_montage(image, tmp_path / "plain.png")
    montage.write_montage(image, tmp_path / "titled.png", title="GaussianSVR iteration 100")
    plain, titled = read_png(tmp_path / "plain.png"), read_png(tmp_path / "titled.png")
    banner = titled.shape[0] - plain.shape[0]
    assert titled.shape[1] == plain.shape[1] and 10 <= banner <= 40
    np.testing.assert_array_equal(titled[banner:], plain)
    ink = titled[:banner] > 128
    assert 50 < ink.sum() < 0.6 * ink.size


def test_montage_title_is_upright(tmp_path):
    image = phantom(left_anterior_superior, (30, 30, 10), (1.0, 1.0, 3.0), np.eye(3))
    montage.write_montage(image, tmp_path / "plain.png")
    montage.write_montage(image, tmp_path / "titled.png", title="T")
    banner = read_png(tmp_path / "titled.png")[: -read_png(tmp_path / "plain.png").shape[0]]
    ink_per_row = (banner > 128).sum(axis=1)
    inked = np.nonzero(ink_per_row)[0]
    assert ink_per_row[inked[0]] == ink_per_row.max() > 2 * ink_per_row[inked[-1]]  # the bar of the T on top
