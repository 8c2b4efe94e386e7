"""An interrupted ``reconstruct``: SIGINT (Ctrl-C in a terminal) or SIGTERM (a process manager) sent to a
real ``python -m GaussianSVRLib`` process once it has written a preview. The run must end promptly with
exit code 130, write no final output (nor leave a temporary file), and keep the last preview readable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from GaussianSVRLib.cli import EXIT_CANCELLED
from GaussianSVRLib.sim.simulate import SimulationResult

#: Whole processes end to end: left out of the quick loop (make test-quick).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: Far more iterations than a test can wait for, and a preview after every iteration.
ENDLESS = ["--n-gaussians", "300", "--iterations", "100000", "--batch-pixels", "1024", "--seed", "0",
           "--output-resolution", "1.5", "--checkpoint-interval", "0.001", "--no-prealign"]  # fmt: skip
PREVIEWS = {"preview.nii.gz", "preview_gaussians.npz", "preview_gaussians.vtp"}
#: Generous bounds for two busy cores: start-up and the first preview, then stopping.
FIRST_PREVIEW_WITHIN_S = 300.0
STOP_WITHIN_S = 60.0


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def wait_for_previews(process: subprocess.Popen, preview: Path, stderr: Path) -> None:
    """Until every preview file exists (each appears whole: written under a temporary name, then renamed)."""
    deadline = time.monotonic() + FIRST_PREVIEW_WITHIN_S
    while not (preview.is_dir() and PREVIEWS <= set(os.listdir(preview))):
        assert process.poll() is None, f"ended before its first preview:\n{stderr.read_text()}"
        assert time.monotonic() < deadline, f"no preview after {FIRST_PREVIEW_WITHIN_S} s"
        time.sleep(0.2)


def ellipsoid_count(path: Path) -> int:
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput().GetNumberOfPoints()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_run_without_output_and_keeps_the_preview(
    signum: signal.Signals, phantom_stacks: SimulationResult, tmp_path: Path
) -> None:
    out, preview, stderr = tmp_path / "out", tmp_path / "preview", tmp_path / "stderr.txt"
    out.mkdir()
    command = [sys.executable, "-m", "GaussianSVRLib", "reconstruct",
               "--input-stacks", *phantom_stacks.stack_paths, "--stack-masks", *phantom_stacks.mask_paths,
               "--output-volume", str(out / "recon.nii.gz"), "--output-gaussians", str(out / "gaussians.vtp"),
               "--output-json", str(out / "report.json"), "--preview-dir", str(preview),
               *ENDLESS]  # fmt: skip
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            command, cwd=REPO, env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=errors, text=True,
        )  # fmt: skip
        try:
            wait_for_previews(process, preview, stderr)
            process.send_signal(signum)
            sent = time.monotonic()
            stdout, _ = process.communicate(timeout=STOP_WITHIN_S)
            elapsed = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    message = stderr.read_text()
    assert process.returncode == EXIT_CANCELLED, message
    assert elapsed < STOP_WITHIN_S
    assert "Traceback" not in message and message.strip().splitlines()[-1].startswith("cancelled"), message
    assert stdout == "", "a summary was printed for a run that did not finish"
    assert os.listdir(out) == [], "a final output (or a temporary file) was written"
    assert set(os.listdir(preview)) == PREVIEWS, "a temporary preview file was left behind"

    volume = sitk.ReadImage(str(preview / "preview.nii.gz"))
    array = sitk.GetArrayViewFromImage(volume)
    assert volume.GetDimension() == 3 and np.isfinite(array).all() and array.max() > 0
    with np.load(preview / "preview_gaussians.npz") as gaussians:
        n = len(gaussians["intensities"])
        assert n > 0 and gaussians["means"].shape == (n, 3) and np.isfinite(gaussians["means"]).all()
    assert ellipsoid_count(preview / "preview_gaussians.vtp") > 0
