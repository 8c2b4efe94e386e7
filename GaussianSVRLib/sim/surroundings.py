"""A synthetic head and uterus around a skull-stripped brain, so that simulated stacks look like the
scanner's: the brain is never alone on a black background there.

Outward from the brain mask, by distance (mm), with smooth random thickness and texture: a dark skull
(the brain's bright CSF rim meets it in one step, as in fetal T2), soft tissue, bright amniotic fluid,
then the uterine wall and maternal tissue. Levels are relative to the brain's median and follow
fetal T2 HASTE: fluid brightest, skull darkest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@dataclass(frozen=True)
class Layer:
    """One shell: its mean thickness (mm) and how much that varies around the head (a fraction), its
    level (times the brain's median) and its texture (relative standard deviation)."""

    thickness_mm: float
    variation: float
    level: float
    texture: float


#: From the brain outwards; the last layer fills the rest of the volume.
LAYERS = (
    Layer(2.0, 0.3, 0.08, 0.3),  # skull
    Layer(2.5, 0.4, 0.55, 0.15),  # scalp and soft tissue
    Layer(8.0, 0.8, 1.6, 0.05),  # amniotic fluid
    Layer(0.0, 0.0, 0.45, 0.25),  # uterine wall, placenta, maternal tissue
)
#: Spatial scale (mm) of the thickness variation and of the texture.
VARIATION_MM = 12.0
TEXTURE_MM = 2.5
MARGIN_MM = 24.0


def smooth_field(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field of the shape with zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox)
    return (field - field.mean()) / (field.std() + 1e-12)


def surround(
    volume: sitk.Image, mask: sitk.Image, seed: int = 0, margin_mm: float = MARGIN_MM
) -> tuple[sitk.Image, sitk.Image]:
    """The volume grown by margin_mm on every side with the layers of LAYERS outside the brain mask,
    and the mask on the same (grown) grid. Inside the mask the voxels are the volume's own."""
    spacing = float(np.mean(volume.GetSpacing()))
    pad = [int(np.ceil(margin_mm / s)) for s in volume.GetSpacing()]
    volume = sitk.ConstantPad(sitk.Cast(volume, sitk.sitkFloat32), pad, pad, 0.0)
    mask = sitk.ConstantPad(sitk.Cast(mask > 0, sitk.sitkUInt8), pad, pad, 0)
    brain = sitk.GetArrayFromImage(volume)
    inside = sitk.GetArrayFromImage(mask) > 0
    level = float(np.median(brain[inside]))
    rng = np.random.default_rng(seed)
    distance = ndimage.distance_transform_edt(~inside, sampling=volume.GetSpacing()[::-1])
    outside = np.zeros_like(brain)
    edge = np.zeros_like(brain)
    for layer in LAYERS:
        thickness = layer.thickness_mm * (
            1.0 + layer.variation * smooth_field(brain.shape, VARIATION_MM / spacing, rng)
        ).clip(0.2, None)
        shell = (distance > edge) & ((distance <= edge + thickness) | (layer.thickness_mm == 0))
        texture = 1.0 + layer.texture * smooth_field(brain.shape, TEXTURE_MM / spacing, rng)
        outside = np.where(shell & (outside == 0), level * layer.level * texture.clip(0.05, None), outside)
        edge = edge + thickness
    # A little partial volume between the synthetic layers (the brain's own edge stays as it is).
    outside = ndimage.gaussian_filter(outside, 0.4 / spacing)
    result = sitk.GetImageFromArray(np.where(inside, brain, outside).astype(np.float32))
    result.CopyInformation(volume)
    return result, mask
