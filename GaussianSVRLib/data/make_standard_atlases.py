"""Derive the bundled standard-space atlases (GaussianSVRLib/data/standard) from the shared data folder.

    python GaussianSVRLib/data/make_standard_atlases.py PATH/TO/shared/data [--out GaussianSVRLib/data]

One atlas volume per week of gestation (21-34): the non-operated spina bifida atlas up to week 25,
the operated one after (the dataset has no other weeks). The two cohorts' frames differ by about 6
degrees, so the non-operated weeks are first moved into the operated frame by one rigid registration
(non-operated week 25 onto operated week 25): every week then shares one standard orientation. Each
is smoothed against aliasing, resampled
onto a 1.6 mm grid in the atlas's own frame, cropped to its brain mask + 8 mm and stored as uint8
(T2 scaled so that its 99.9th percentile inside the brain is 250), with its brain mask resampled on
the same grid. A registration at this scale recovers orientations to well under a degree; the
reconstruction keeps its own resolution, only the frame comes from here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from make_demo_data import ATLAS_DIR, ATLAS_NOTICES, copy_notices, crop, grow_box, mask_box, write_nifti

SPACING_MM = 1.6
MARGIN_MM = 8.0
#: The operated atlas starts at week 25, the non-operated one ends there.
LAST_NOT_OPERATED = 25
WEEKS = range(21, 35)
#: The T2 value the brain's 99.9th percentile is stored as (uint8, headroom above it).
TOP_VALUE = 250.0


def source_name(week: int) -> str:
    return f"SB_GA{week}_{'notoperated' if week <= LAST_NOT_OPERATED else 'operated'}"


def downsampled(image: sitk.Image, spacing: float, interpolator: int) -> sitk.Image:
    """The image on a grid of the given isotropic spacing, same origin corner and direction."""
    size = [int(np.ceil(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing((spacing,) * 3)
    half = np.asarray(image.GetDirection()).reshape(3, 3) @ ((spacing - np.asarray(image.GetSpacing())) / 2)
    grid.SetOrigin(tuple(float(v) for v in np.asarray(image.GetOrigin()) + half))
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def read_pair(source_dir: Path, name: str) -> tuple[sitk.Image, sitk.Image]:
    t2 = sitk.ReadImage(str(source_dir / f"{name}_T2w.nii.gz"), sitk.sitkFloat32)
    return t2, sitk.ReadImage(str(source_dir / f"{name}_brainmask.nii.gz"), sitk.sitkFloat32)


def cohort_alignment(source_dir: Path) -> sitk.Euler3DTransform:
    """The rigid map from the operated atlas frame to the non-operated one (week 25 of both, where the
    two cohorts meet): a similarity registration of the brains, its scale dropped."""
    fixed, fixed_mask = read_pair(source_dir, f"SB_GA{LAST_NOT_OPERATED}_operated")
    moving, _ = read_pair(source_dir, source_name(LAST_NOT_OPERATED))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricFixedMask(sitk.BinaryDilate(fixed_mask > 0.5, [5] * 3))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    similarity = sitk.Similarity3DTransform(
        sitk.CenteredTransformInitializer(fixed_mask, moving, sitk.Similarity3DTransform())
    )
    method.SetInitialTransform(similarity, inPlace=True)
    method.Execute(fixed, moving)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(similarity.GetCenter())
    rigid.SetMatrix(tuple(v / similarity.GetScale() for v in similarity.GetMatrix()))
    rigid.SetTranslation(similarity.GetTranslation())
    return rigid


def make_one(source_dir: Path, out_dir: Path, week: int, alignment: sitk.Transform) -> str:
    name = source_name(week)
    t2, mask = read_pair(source_dir, name)
    if week <= LAST_NOT_OPERATED:
        t2 = sitk.Resample(t2, t2, alignment, sitk.sitkLinear, 0.0)
        mask = sitk.Resample(mask, mask, alignment, sitk.sitkLinear, 0.0)
    sigma = 0.5 * np.sqrt(SPACING_MM**2 - t2.GetSpacing()[0] ** 2)
    small_t2 = downsampled(sitk.SmoothingRecursiveGaussian(t2, float(sigma)), SPACING_MM, sitk.sitkLinear)
    small_mask = downsampled(mask, SPACING_MM, sitk.sitkLinear) > 0.5
    box = grow_box(mask_box(small_mask), small_mask, MARGIN_MM, axes=(0, 1, 2))
    values = sitk.GetArrayFromImage(small_t2)
    top = np.percentile(values[sitk.GetArrayFromImage(small_mask) > 0], 99.9)
    scaled = sitk.GetImageFromArray(np.clip(np.round(values * (TOP_VALUE / top)), 0, 255).astype(np.uint8))
    scaled.CopyInformation(small_t2)
    write_nifti(crop(scaled, box), out_dir / f"GA{week}_T2w.nii.gz")
    write_nifti(crop(sitk.Cast(small_mask, sitk.sitkUInt8), box), out_dir / f"GA{week}_brainmask.nii.gz")
    ml = float(sitk.GetArrayFromImage(mask).sum() * np.prod(mask.GetSpacing()) / 1000)
    return f"| {week} | `{name}` | {ml:.0f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_data", type=Path, help="the shared data folder (holds the atlas dataset)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="default: this folder"
    )
    args = parser.parse_args(argv)
    source_dir, out_dir = args.shared_data / ATLAS_DIR, args.out / "standard"
    if not source_dir.is_dir():
        print(f"{source_dir}: folder not found", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    alignment = cohort_alignment(source_dir)
    angle = np.degrees(
        np.arccos(np.clip((np.trace(np.reshape(alignment.GetMatrix(), (3, 3))) - 1) / 2, -1, 1))
    )
    print(f"non-operated weeks turned by {angle:.1f} degrees into the operated frame")
    print("| week | source | brain mask (ml, 0.8 mm source) |\n|---|---|---|")
    for week in WEEKS:
        print(make_one(source_dir, out_dir, week, alignment))
    copy_notices(source_dir, ATLAS_NOTICES, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
