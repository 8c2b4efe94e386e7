"""The demo: a simulated case from the bundled atlas (with metrics) and the bundled real stacks."""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .export.montage import write_montage
from .export.qc import summary_table
from .io.outputs import write_json
from .io.stacks import read_image
from .pipeline import Outputs, reconstruct
from .qa.metrics import evaluate
from .settings import Settings, preset
from .sim.simulate import naive_average, simulate_stacks

#: The demo data ship inside the package (package data), with their licences and README.md.
DEFAULT_DATA = Path(__file__).resolve().parent / "data"
ATLAS = ("atlas/SB_GA28_operated_T2w.nii.gz", "atlas/SB_GA28_operated_brainmask.nii.gz")
REAL_STACKS = ("sub-01_run-1_T2w", "sub-01_run-2_T2w", "sub-01_run-3_T2w", "sub-01_run-6_T2w")


def reconstruct_case(name: str, stacks: list[str], masks: list[str], out: Path, settings: Settings):
    """Reconstruct one case into out/: volume, Gaussians (.npz, .vtp), report, QC picture and montage."""
    out.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(
        volume=str(out / "volume.nii.gz"),
        gaussians=str(out / "gaussians.vtp"),
        report=str(out / "report.json"),
        qc=str(out / "qc.png"),
    )
    print(f"[{name}] reconstructing {len(stacks)} stacks ...", flush=True)
    result = reconstruct(stacks, masks, None, settings, outputs)
    write_montage(result.volume, out / "montage.png", title=f"GaussianSVR: {name}")
    print(summary_table(result.report))
    print(f"[{name}] {result.report['timings']['total_s']:.0f} s on {result.report['device']}")
    return result


def run(
    output_dir: str, data_dir: str | None, preset_name: str, device: str, iterations: int | None = None
) -> int:
    """Both demo cases into output_dir; iterations overrides the preset's (a quick check of an install)."""
    settings = preset(preset_name).updated(device=device)
    if iterations is not None:
        settings = settings.updated(iterations=iterations)
    data = Path(data_dir) if data_dir else DEFAULT_DATA
    volume_path, mask_path = (data / part for part in ATLAS)
    if not volume_path.exists():
        raise InputError(
            volume_path,
            "bundled demo data not found; pass --data-dir (GaussianSVRLib/data in the repository)",
        )
    out = Path(output_dir)

    simulated = out / "simulated"
    truth, truth_mask = read_image(volume_path, "atlas volume"), read_image(mask_path, "atlas mask")
    print("[simulated] simulating 4 stacks from the atlas (0.8 mm in-plane, 3 mm slices, motion, noise) ...")
    sim = simulate_stacks(truth, truth_mask, simulated / "stacks", seed=0)
    result = reconstruct_case("simulated", sim.stack_paths, sim.mask_paths, simulated, settings)
    truth_float = sitk.Cast(truth, sitk.sitkFloat32)
    metrics = {
        "reconstruction": evaluate(result.volume, truth_float, truth_mask),
        "naive_average": evaluate(naive_average(sim.stack_paths, truth_float), truth_float, truth_mask),
    }
    write_json(metrics, simulated / "metrics.json")
    print("[simulated] against the ground truth (inside the brain mask):")
    for name, values in metrics.items():
        print(
            f"  {name:<15} PSNR {values['psnr']:6.2f} dB  SSIM {values['ssim']:.3f}  NCC {values['ncc']:.3f}"
        )

    real = out / "sub01"
    stacks = [str(data / "sub01" / f"{stem}.nii.gz") for stem in REAL_STACKS]
    masks = [str(data / "sub01" / f"{stem}_desc-brain_mask.nii.gz") for stem in REAL_STACKS]
    reconstruct_case("sub01 (real)", stacks, masks, real, settings)

    print("\nOutputs:")
    for folder in (simulated, real):
        names = ("volume.nii.gz", "gaussians.vtp", "gaussians.npz", "report.json", "qc.png", "montage.png")
        for name in names:
            print(f"  {folder / name}")
    print(f"  {simulated / 'metrics.json'}")
    print(json.dumps({k: round(v["psnr"], 2) for k, v in metrics.items()}))
    return 0
