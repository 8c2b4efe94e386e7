"""Where a run's outputs and previews go. Plain Python: the checks before a run read it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io.outputs import extension

OUTPUT_KINDS = ("volume", "gaussians", "ellipsoids", "report", "qc", "transform")
MASK_SUFFIX = "_mask.nii.gz"
#: The preview files, by the name the protocol's "checkpoint" message gives them.
PREVIEW_FILES = {
    "volume": "preview.nii.gz",
    "gaussians": "preview_gaussians.npz",
    "ellipsoids": "preview_gaussians.vtp",
}


def beside(path: str | Path, suffix: str) -> Path:
    """A file next to ``path``, named after it without its extension: beside("a/v.nii.gz", "_t.tfm") is
    a/v_t.tfm."""
    path = Path(path)
    return path.with_name(path.name[: len(path.name) - len(extension(path))] + suffix)


def preview_paths(folder: str | Path) -> dict[str, Path]:
    return {kind: Path(folder) / name for kind, name in PREVIEW_FILES.items()}


@dataclass
class Outputs:
    """Where results go; None skips an output. gaussians: the .npz and .vtp share its stem."""

    volume: str | None = None
    gaussians: str | None = None
    report: str | None = None
    preview_dir: str | None = None
    qc: str | None = None
    #: The atlas-to-scanner transform (.tfm) of an atlas-space volume.
    transform: str | None = None
    #: A folder for the brain mask each stack was reconstructed with, on its grid (see mask_files).
    masks_dir: str | None = None

    def gaussian_paths(self) -> tuple[str, str] | None:
        if self.gaussians is None:
            return None
        stem = Path(self.gaussians)
        stem = stem.with_suffix("") if stem.suffix in (".npz", ".vtp") else stem
        return str(stem.with_suffix(".npz")), str(stem.with_suffix(".vtp"))

    def files(self) -> dict[str, Path]:
        """Every final output file by kind (OUTPUT_KINDS), those asked for."""
        gaussians = self.gaussian_paths() or (None, None)
        paths = {
            "volume": self.volume,
            "gaussians": gaussians[0],
            "ellipsoids": gaussians[1],
            "report": self.report,
            "qc": self.qc,
            "transform": self.transform,
        }
        return {kind: Path(path) for kind, path in paths.items() if path is not None}

    def mask_files(self, stack_paths: list[str]) -> list[Path]:
        """Where each stack's mask goes: masks_dir/<stack name>_mask.nii.gz ([] without masks_dir)."""
        if self.masks_dir is None:
            return []
        return [Path(self.masks_dir) / beside(Path(path).name, MASK_SUFFIX).name for path in stack_paths]

    def previews(self) -> dict[str, Path]:
        return preview_paths(self.preview_dir) if self.preview_dir is not None else {}
