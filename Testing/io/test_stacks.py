"""Reading stacks and masks: voxel types, what a mask's values mean, masks for some stacks only, header
geometry that ITK would silently guess, and the checks across stacks (distinct, sharing a field of view).

How each refusal reaches the user (one line, exit code 2) is tested in test_cli_errors.py.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.geometry import LPS_TO_RAS, image_affine
from GaussianSVRLib.io.images import ORTHONORMAL_TOLERANCE
from GaussianSVRLib.io.masks import MAX_MASK_LABELS, PROBABILITY_THRESHOLD
from GaussianSVRLib.io.nifti import QFORM_SFORM_TOLERANCE, qform_affine, read_nifti_header, sform_affine
from GaussianSVRLib.io.stacks import (
    Stack,
    check_fields_of_view,
    normalized_intensities,
    read_stack,
    read_stacks,
    world_box,
)

SPACING = (1.2, 1.1, 2.4)
OBLIQUE = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()


def write(array: np.ndarray, path: Path, origin=(10.0, -20.0, 5.0), direction=OBLIQUE) -> Path:
    """An image [k, j, i] with a fixed oblique geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def intensities(shape=(4, 8, 8)) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 17 + 1).astype(np.float32)


def refusal(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


# Voxel types.


def test_integer_stacks_are_float32_before_any_arithmetic(tmp_path: Path) -> None:
    wide = np.full((4, 8, 8), 1000, dtype=np.uint16)
    wide[1, 2, 3], wide[2, 5, 5] = 65535, 0
    stack = read_stack(write(wide, tmp_path / "uint16.nii.gz"))
    assert stack.data.dtype == np.float32
    assert np.array_equal(stack.data, wide.astype(np.float64))
    assert stack.data.max() - stack.data.min() == 65535  # uint16 arithmetic would wrap around
    assert float(stack.data[1, 2, 3]) + 1 == 65536

    signed = (np.arange(4 * 8 * 8) % 256 - 128).astype(np.int8).reshape(4, 8, 8)
    stack = read_stack(write(signed, tmp_path / "int8.nii.gz"))
    assert stack.data.dtype == np.float32 and np.array_equal(stack.data, signed.astype(np.float64))
    assert stack.data.min() == -128 and stack.data.max() == 127
    assert float(stack.data.max() - stack.data.min()) == 255  # int8 arithmetic would overflow


def test_64_bit_integers_are_kept_to_float32_precision(tmp_path: Path) -> None:
    """Chosen: 64-bit integers are intensities like any other; beyond 2**24 float32 rounds them by
    less than 6e-8 of their value, far below MRI noise."""
    big = np.full((4, 8, 8), 2**40 + 12345, dtype=np.int64)
    stack = read_stack(write(big, tmp_path / "int64.nii.gz"))
    assert stack.data.dtype == np.float32
    assert np.allclose(stack.data * stack.intensity_unit, float(2**40 + 12345), rtol=6e-8, atol=0)


# What a mask's values mean.


def mask_values(tmp_path: Path, values: np.ndarray, name: str = "mask.nii.gz") -> Stack:
    stack = write(intensities(values.shape), tmp_path / "stack.nii.gz")
    return read_stack(stack, write(values, tmp_path / name))


def region(shape=(4, 8, 8)) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[1:3, 2:6, 3:7] = True
    return inside


@pytest.mark.parametrize(
    "kind",
    ["binary uint8", "binary float", "0/255", "label map 0..3", "probability map"],
)
def test_masks_binary_label_maps_and_probability_maps(kind: str, tmp_path: Path) -> None:
    inside = region()
    rng = np.random.default_rng(0)
    if kind == "binary uint8":
        values = inside.astype(np.uint8)
    elif kind == "binary float":
        values = inside.astype(np.float32)
    elif kind == "0/255":
        values = inside.astype(np.uint8) * 255
    elif kind == "label map 0..3":
        values = np.where(inside, rng.integers(1, 4, inside.shape), 0).astype(np.int16)
    else:
        high = rng.uniform(PROBABILITY_THRESHOLD, 1.0, inside.shape)
        low = rng.uniform(0.0, PROBABILITY_THRESHOLD - 1e-3, inside.shape)
        values = np.where(inside, high, low).astype(np.float32)
    stack = mask_values(tmp_path, values)
    assert np.array_equal(stack.mask, inside)
    assert stack.mask_path == str(tmp_path / "mask.nii.gz")


def test_mask_of_values_that_are_no_mask_is_refused(tmp_path: Path) -> None:
    inside = region()
    signed = np.where(inside, 1, -1).astype(np.int16)
    assert "negative values (down to -1)" in refusal(mask_values, tmp_path, signed, "signed.nii.gz").problem
    image = intensities() * 13.7
    assert "values other than 0/1" in refusal(mask_values, tmp_path, image, "image.nii.gz").problem
    labels = np.arange(1, inside.size + 1).reshape(inside.shape).astype(np.int16)
    assert inside.size > MAX_MASK_LABELS
    assert "values other than 0/1" in refusal(mask_values, tmp_path, labels, "labels.nii.gz").problem
    unlikely = np.where(inside, 0.4, 0.0).astype(np.float32)
    assert refusal(mask_values, tmp_path, unlikely, "low.nii.gz").problem == "mask is empty"


def test_mask_with_nan_is_refused_although_itk_reads_it_as_zero(tmp_path: Path) -> None:
    values = region().astype(np.float32)
    values[0, 0, 0] = np.nan
    path = write(values, tmp_path / "nan_mask.nii.gz")
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # why the bytes are read
    error = refusal(read_stack, write(intensities(), tmp_path / "stack.nii.gz"), path)
    assert error.path == str(path) and "NaN" in error.problem


# Masks for some stacks only.


def test_masks_for_some_stacks_only(tmp_path: Path) -> None:
    paths = [str(write(intensities() + s, tmp_path / f"stack{s}.nii.gz")) for s in range(4)]
    mask = str(write(region().astype(np.uint8), tmp_path / "mask0.nii.gz"))
    stacks = read_stacks(paths, [mask, None, "none", " NONE "])
    assert [stack.mask_path for stack in stacks] == [mask, None, None, None]
    assert np.array_equal(stacks[0].mask, region())
    assert all(stack.mask.all() and stack.mask.shape == stack.data.shape for stack in stacks[1:])
    assert all(stack.mask_path is None for stack in read_stacks(paths[:2], ["None", "none"]))
    assert all(stack.mask_path is None for stack in read_stacks(paths[:2]))
    assert read_stack(paths[0], "None").mask_path is None
    error = refusal(read_stacks, paths[:3], [None, "none"])
    assert error.path == "--stack-masks" and error.problem == "2 masks given for 3 stacks"
    error = refusal(read_stacks, paths[:3], ["none", mask])
    assert error.path == mask


def test_stack_built_without_mask_path_has_none() -> None:
    stack = Stack("s.nii.gz", np.ones((2, 3, 3), np.float32), np.ones((2, 3, 3), bool), np.eye(4), 2.0)
    assert stack.mask_path is None


# Header geometry.


def nifti1(tmp_path: Path, name: str = "stack.nii", array: np.ndarray | None = None) -> Path:
    """An uncompressed oblique NIfTI-1 written by SimpleITK (qform_code and sform_code both set)."""
    return write(intensities() if array is None else array, tmp_path / name)


def patch(path: Path, offset: int, fmt: str, *values: float) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(raw))
    return path


def to_nifti2(nifti1_bytes: bytes) -> bytes:
    """The same image with a NIfTI-2 header (540 bytes, doubles and 64-bit integers), built by hand."""
    h = nifti1_bytes
    fields = {name: struct.unpack_from(fmt, h, offset) for name, (fmt, offset) in {
        "datatype": ("<hh", 70), "dim": ("<8h", 40), "pixdim": ("<8f", 76), "vox_offset": ("<f", 108),
        "codes": ("<hh", 252), "quatern": ("<6f", 256), "srow": ("<12f", 280), "xyzt": ("<B", 123),
    }.items()}  # fmt: skip
    header = bytearray(540)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<hh", header, 12, *fields["datatype"])
    struct.pack_into("<8q", header, 16, *fields["dim"])
    struct.pack_into("<8d", header, 104, *fields["pixdim"])
    struct.pack_into("<q", header, 168, 544)
    struct.pack_into("<dd", header, 176, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<ii", header, 344, *fields["codes"])
    struct.pack_into("<6d", header, 352, *fields["quatern"])
    struct.pack_into("<12d", header, 400, *fields["srow"])
    struct.pack_into("<i", header, 500, fields["xyzt"][0])
    return bytes(header) + bytes(4) + h[int(fields["vox_offset"][0]) :]


def test_header_affines_match_itk_and_nifti2_headers_are_parsed_alike(tmp_path: Path) -> None:
    path = nifti1(tmp_path)
    expected = LPS_TO_RAS @ image_affine(sitk.ReadImage(str(path)))
    header = read_nifti_header(path)
    assert header is not None and header.version == 1 and header.qform_code > 0 and header.sform_code > 0
    assert np.allclose(qform_affine(header), expected, atol=1e-4)
    assert np.allclose(sform_affine(header), expected, atol=1e-4)

    version2 = tmp_path / "stack2.nii.gz"
    version2.write_bytes(gzip.compress(to_nifti2(path.read_bytes())))
    header2 = read_nifti_header(version2)
    assert header2 is not None and header2.version == 2
    for name in ("dim", "pixdim", "quatern", "qoffset", "srow"):
        assert np.allclose(getattr(header2, name), getattr(header, name)), name
    assert (header2.datatype, header2.qform_code, header2.sform_code, header2.vox_offset) == (
        header.datatype, header.qform_code, header.sform_code, 544,
    )  # fmt: skip
    error = refusal(read_stack, version2)  # ITK 5.4 reads NIfTI-1 only
    assert error.path == str(version2) and "NIfTI-2" in error.problem


def test_qform_and_sform_must_agree_within_the_tolerance(tmp_path: Path) -> None:
    smallest = min(SPACING)
    srow_z = 312  # the sform's z row; its 4th value is the z offset
    offset = struct.unpack_from("<f", nifti1(tmp_path).read_bytes(), srow_z + 12)[0]
    close = patch(
        nifti1(tmp_path, "close.nii"), srow_z + 12, "<f", offset + 0.5 * QFORM_SFORM_TOLERANCE * smallest
    )
    assert read_stack(close).data.shape == (4, 8, 8)
    far = patch(nifti1(tmp_path, "far.nii"), srow_z + 12, "<f", offset + 2 * QFORM_SFORM_TOLERANCE * smallest)
    assert "qform and sform disagree" in refusal(read_stack, far).problem
    nifti2 = tmp_path / "far2.nii"
    nifti2.write_bytes(to_nifti2(far.read_bytes()))
    assert "qform and sform disagree" in refusal(read_stack, nifti2).problem
    sform_only = patch(nifti1(tmp_path, "sform_only.nii"), 252, "<hh", 0, 1)
    patch(sform_only, srow_z + 12, "<f", offset + 10.0)
    assert read_stack(sform_only).affine[2, 3] == pytest.approx(offset + 10.0, abs=1e-4)


def test_zero_or_negative_voxel_size_in_the_header(tmp_path: Path) -> None:
    zero = patch(nifti1(tmp_path, "zero.nii"), 80, "<f", 0.0)
    assert "zero voxel size" in refusal(read_stack, zero).problem
    negative = patch(nifti1(tmp_path, "negative.nii"), 84, "<f", -SPACING[1])
    assert "negative voxel size" in refusal(read_stack, negative).problem
    # With the sform alone ITK still takes the voxel size from pixdim (and makes one up for 0).
    sform_only = patch(patch(nifti1(tmp_path, "sform_only.nii"), 80, "<f", 0.0), 252, "<hh", 0, 1)
    assert sitk.ReadImage(str(sform_only)).GetSpacing()[0] == 1.0
    assert "zero voxel size" in refusal(read_stack, sform_only).problem
    rescaled = patch(patch(nifti1(tmp_path, "rescaled.nii"), 80, "<f", 1.5), 252, "<hh", 0, 1)
    assert "sform voxel size (1.2 x 1.1 x 2.4 mm) disagrees with pixdim (1.5 x 1.1 x 2.4 mm)" in (
        refusal(read_stack, rescaled).problem
    )
    no_column = patch(nifti1(tmp_path, "sform_zero_column.nii"), 252, "<hh", 0, 1)
    for row in range(3):
        patch(no_column, 280 + 16 * row + 4, "<f", 0.0)
    assert "zero-length axis" in refusal(read_stack, no_column).problem
    mha = tmp_path / "negative.mha"
    sitk.WriteImage(sitk.ReadImage(str(nifti1(tmp_path))), str(mha))
    text = mha.read_bytes()
    mha.write_bytes(text.replace(b"ElementSpacing = 1.2", b"ElementSpacing = -1.2", 1))
    assert sitk.ReadImage(str(mha)).GetSpacing() == pytest.approx(SPACING)  # ITK drops the sign
    assert "negative spacing" in refusal(read_stack, mha).problem


def nrrd(path: Path, directions: np.ndarray) -> Path:
    """A raw float32 NRRD of intensities() with the given space direction columns (3, 3)."""
    columns = " ".join("(" + ",".join(f"{v:.9g}" for v in column) + ")" for column in directions.T)
    array = intensities()
    header = (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}\nspace directions: {columns}\n"
              "space origin: (0,0,0)\nendian: little\nencoding: raw\n\n")  # fmt: skip
    path.write_bytes(header.encode() + array.astype("<f4").tobytes())
    return path


def test_direction_matrix_must_be_orthonormal_within_the_tolerance(tmp_path: Path) -> None:
    def skewed(amount: float) -> np.ndarray:
        directions = np.diag(SPACING).astype(np.float64)
        directions[0, 1] = amount * SPACING[1]  # the j axis leans towards i
        return directions

    almost = read_stack(nrrd(tmp_path / "almost.nrrd", skewed(0.2 * ORTHONORMAL_TOLERANCE)))
    assert almost.spacing == pytest.approx(SPACING, rel=1e-6)
    error = refusal(read_stack, nrrd(tmp_path / "skewed.nrrd", skewed(0.1)))
    assert "not orthonormal (axes at 84.3, 90.0, 90.0 degrees" in error.problem


# Across stacks.


def test_a_stack_given_twice_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write(intensities(), tmp_path / "a.nii.gz")
    second = write(intensities() + 1, tmp_path / "b.nii.gz")
    (tmp_path / "sub").mkdir()
    spelled = str(tmp_path / "sub" / ".." / "a.nii.gz")
    error = refusal(read_stacks, [str(first), str(second), spelled])
    assert error.path == spelled and error.problem == "stack is given twice (as stacks 1 and 3)"
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(first, copy)
    with caplog.at_level(logging.WARNING, logger="GaussianSVRLib.io.stacks"):
        assert len(read_stacks([str(first), str(second), str(copy)])) == 3  # a copy: only a warning
    assert [record.getMessage() for record in caplog.records] == [
        f"{copy}: stack is identical to {first}; its slices count twice"
    ]
    assert len(read_stacks([str(first), str(second)])) == 2  # same grid, other voxels: fine


def box_stack(origin: tuple[float, float, float], masked: bool = True, name: str = "s") -> Stack:
    """A 10 x 10 x 5 stack of 2 mm voxels with an identity direction; masked: only its central block."""
    mask = np.zeros((5, 10, 10), dtype=bool)
    if masked:
        mask[1:4, 3:7, 3:7] = True
    else:
        mask[:] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = origin
    return Stack(name, np.ones(mask.shape, np.float32), mask, affine, 2.0, "m" if masked else None)


def test_world_box_covers_whole_masked_voxels() -> None:
    low, high = world_box(box_stack((0.0, 0.0, 0.0)))
    assert low == pytest.approx([5.0, 5.0, 1.0]) and high == pytest.approx([13.0, 13.0, 7.0])
    rotated = box_stack((0.0, 0.0, 0.0))
    rotated.affine[:3, :3] = np.array([[0.0, -2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    low, high = world_box(rotated)
    assert low == pytest.approx([-13.0, 5.0, 1.0]) and high == pytest.approx([-5.0, 13.0, 7.0])


def test_stacks_must_share_a_field_of_view() -> None:
    near = [box_stack((0.0, 0.0, 0.0), name="a"), box_stack((3.0, -2.0, 1.0), name="b")]
    check_fields_of_view(near)
    far = box_stack((0.0, 300.0, 0.0), name="far")
    error = refusal(check_fields_of_view, [near[0], far, near[1]])
    assert (
        error.path == "far"
        and "outside the field of view of a (masked regions 292 mm apart)" in error.problem
    )
    # The whole images overlap (20 mm wide) but the brains do not: the masked regions count.
    apart = box_stack((9.0, 0.0, 0.0), name="apart")
    assert "outside the field of view of a" in refusal(check_fields_of_view, [near[0], apart]).problem
    check_fields_of_view([near[0], box_stack((9.0, 0.0, 0.0), masked=False)])
    # Two stacks apart: the first is the reference unless another one is given.
    assert refusal(check_fields_of_view, [near[0], far]).path == "far"
    assert refusal(check_fields_of_view, [near[0], far], reference=1).path == "a"


# Data that is not all there, and where its header cannot place it.


def cut(path: Path, fraction: float = 0.5) -> Path:
    """The file cut short, as an interrupted copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
@pytest.mark.parametrize(
    "name, problem", [("s.nii", "truncated"), ("s.nii.gz", "damaged"), ("s.nrrd", "truncated")]
)
def test_a_file_shorter_than_its_header_says_is_refused_for_every_voxel_type(tmp_path, dtype, name, problem):
    path = write(intensities((6, 40, 40)).astype(dtype), tmp_path / name)
    assert read_stack(path).data.shape == (6, 40, 40)
    error = refusal(read_stack, cut(path))
    assert error.path == str(path) and problem in error.problem


def test_a_damaged_gzip_stream_is_refused(tmp_path):
    path = write(intensities((6, 40, 40)), tmp_path / "s.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert "damaged" in refusal(read_stack, path).problem


def test_a_file_is_decompressed_by_what_it_holds_not_by_its_name(tmp_path):
    plain = write(intensities(), tmp_path / "plain.nii")
    misnamed = tmp_path / "misnamed.nii.gz"
    shutil.copy(plain, misnamed)
    assert np.array_equal(read_stack(misnamed).data, read_stack(plain).data)


def test_a_nifti_without_qform_and_sform_is_refused(tmp_path):
    path = write(intensities(), tmp_path / "s.nii")
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", 0, 0)
    path.write_bytes(bytes(raw))
    assert "neither a qform nor an sform" in refusal(read_stack, path).problem


# Intensities at the ends of the float range, and slice thicknesses.


@pytest.mark.parametrize("scale", [1e-30, 1e30, 3e34])
def test_extreme_intensities_are_read_exactly_and_kept_near_one(tmp_path, scale):
    values = intensities().astype(np.float64) * scale
    stack = read_stack(write(values.astype(np.float32), tmp_path / "s.nii.gz"))
    assert 1e-3 < float(np.median(stack.data)) < 1e3
    assert np.log2(stack.intensity_unit) == np.round(np.log2(stack.intensity_unit))  # a power of two: exact
    np.testing.assert_allclose(stack.data * stack.intensity_unit, values.astype(np.float32), rtol=1e-6)


def test_normalized_stacks_start_at_one_and_keep_their_units(tmp_path):
    values = intensities() * 250.0
    stack = read_stack(write(values, tmp_path / "s.nii.gz"))
    normalized = normalized_intensities(stack)
    assert np.median(normalized.data[normalized.data != 0]) == pytest.approx(1.0)
    np.testing.assert_allclose(normalized.data * normalized.intensity_unit, values, rtol=1e-6)
    np.testing.assert_array_equal(stack.data, values)  # the input is not modified


@pytest.mark.parametrize("thickness", [0.0, -2.0, 31.0, 1e6, float("nan")])
def test_thicknesses_that_cannot_be_reconstructed_are_refused(tmp_path, thickness):
    path = write(intensities(), tmp_path / "s.nii.gz")
    error = refusal(read_stack, path, thickness=thickness)
    assert error.path == str(path) and "--thicknesses" in error.problem


def test_a_sidecar_thickness_is_checked_and_a_bad_one_ignored(tmp_path, caplog):
    path = write(intensities(), tmp_path / "sub-01_T2w.nii.gz")
    sidecar = tmp_path / "sub-01_T2w.json"
    sidecar.write_text('{"SliceThickness": 3.5}')
    assert read_stack(path).thickness == 3.5
    sidecar.write_text('{"SliceThickness": 500}')
    assert "sidecar sub-01_T2w.json" in refusal(read_stack, path).problem
    for bad in ('"thick"', "-1", "true"):
        sidecar.write_text(f'{{"SliceThickness": {bad}}}')
        with caplog.at_level(logging.WARNING, logger="GaussianSVRLib.io.stacks"):
            assert read_stack(path).thickness == pytest.approx(SPACING[2], abs=1e-6)
        assert "ignored" in caplog.text
    with caplog.at_level(logging.WARNING, logger="GaussianSVRLib.io.stacks"):
        read_stack(path, thickness=12.0)
    assert "unusual" in caplog.text
