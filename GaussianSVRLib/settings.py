"""Reconstruction settings, their defaults and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Settings:
    """Everything that steers a reconstruction. Defaults are the "standard" preset, sized for a CPU.

    n_gaussians = 0 means automatic: gaussians_per_ml times the brain volume of the reference
    stack's mask (about 6,000 for a 28-week brain).

    mask_dilation_mm: every mask is dilated by this margin (masks that cut a little brain).
    bias_correction: "n4" (SimpleITK N4 on each stack inside its mask, once the masks are ready) or
    "none"; n4 is the default because it was measured to help (docs/benchmarks.md).
    init_gaussians: an .npz of an earlier run (--output-gaussians) to continue from (warm start);
    a continued run has no coarse stage.
    pose_search: re-try the pose of badly fitting slices at a grid of rotations a few times during
    the schedule (pose_search.py), for slices that gradient descent leaves far off.
    """

    n_gaussians: int = 0
    gaussians_per_ml: float = 35.0
    k_neighbours: int = 16
    iterations: int = 400
    batch_pixels: int = 32768
    output_resolution: float = 0.8
    psf_mode: str = "exact"
    in_plane_fwhm: float = 1.2
    coarse_to_fine: bool = True
    coarse_fraction: float = 0.4
    edge_fraction: float = 0.7
    scale_target: float = 1.6
    scale_regularization: float = 2.5e-3
    lr_means: float = 2.5e-2
    lr_scales: float = 2.5e-2
    lr_quaternions: float = 1e-2
    lr_intensities: float = 1e-2
    lr_rotation: float = 5e-3
    lr_translation: float = 1e-1
    lr_slice_scale: float = 5e-3
    motion_start: float = 0.1
    refresh_every: int = 20
    outlier_z: float = 3.5
    seed: int = 0
    device: str = "auto"
    neighbour_backend: str = "auto"
    checkpoint_interval_s: float = 15.0
    reference_stack: int | None = None
    prealign: bool = True
    mask_dilation_mm: float = 0.0
    bias_correction: str = "n4"
    init_gaussians: str | None = None
    pose_search: bool = True

    def updated(self, **changes: object) -> Settings:
        """A copy with the given fields changed; unknown names raise TypeError."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


PRESETS: dict[str, dict[str, object]] = {
    "preview": {"k_neighbours": 12, "iterations": 150},
    "standard": {},
    "high": {"k_neighbours": 24, "iterations": 800, "gaussians_per_ml": 50.0},
}


def preset(name: str) -> Settings:
    """The named preset ("preview", "standard", "high")."""
    return Settings().updated(**PRESETS[name])


def setting_names() -> list[str]:
    return [f.name for f in fields(Settings)]
