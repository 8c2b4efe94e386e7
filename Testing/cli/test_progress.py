"""The ``reconstruct`` command as a client sees it: the ``--progress json`` stream, cancelling, and the
default terminal mode; each through a real ``python -m GaussianSVRLib`` process on the phantom stacks.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from GaussianSVRLib.cli import EXIT_CANCELLED
from GaussianSVRLib.io.progress import PROTOCOL_VERSION, decode
from GaussianSVRLib.sim.simulate import SimulationResult

#: Whole processes end to end: left out of the quick loop (make test-quick).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def tiny(iterations: int) -> list[str]:
    """Tiny settings: a few seconds of optimization on two cores. The checkpoint interval is far below
    one iteration's time so that every iteration writes a preview, on any machine."""
    return ["--n-gaussians", "500", "--iterations", str(iterations), "--batch-pixels", "2048",
            "--output-resolution", "1.5", "--checkpoint-interval", "0.001", "--seed", "0"]  # fmt: skip


#: A run that would take far longer than any test: it must be cancelled.
ENDLESS = ["--n-gaussians", "500", "--iterations", "100000", "--batch-pixels", "2048",
           "--output-resolution", "1.5", "--checkpoint-interval", "1000"]  # fmt: skip
CANCEL_WITHIN_S = 60.0
#: Generous bound for one whole tiny run on two busy cores.
RUN_TIMEOUT_S = 300.0
SLICE_KEYS = {"rotation", "translation", "scale", "weight", "residual", "excluded", "reason"}


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def command(stacks: SimulationResult, *args: str) -> list[str]:
    return [sys.executable, "-m", "GaussianSVRLib", "reconstruct", "--input-stacks", *stacks.stack_paths,
            "--stack-masks", *stacks.mask_paths, *args]  # fmt: skip


def protocol(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line as a protocol message; none may be anything else."""
    messages = [decode(line) for line in stdout.splitlines()]
    assert messages and all(message is not None for message in messages), stdout
    return messages  # type: ignore[return-value]


def read_polydata(path: str) -> int:
    """The number of points of a .vtp file (0 when unreadable)."""
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(path)
    reader.Update()
    return reader.GetOutput().GetNumberOfPoints()


def assert_readable(volume: str, gaussians: str, ellipsoids: str) -> None:
    image = sitk.ReadImage(volume)
    assert image.GetDimension() == 3 and np.isfinite(sitk.GetArrayViewFromImage(image)).all()
    with np.load(gaussians) as npz:
        n = len(npz["intensities"])
        assert n > 0 and npz["means"].shape == (n, 3) and npz["covariances"].shape == (n, 3, 3)
    assert read_polydata(ellipsoids) > 0


class Worker:
    """A running reconstruct process whose stdout lines are read by a thread, so reads can time out."""

    def __init__(self, args: list[str], stderr: Path) -> None:
        self.stderr_path = stderr
        self.stderr_file = stderr.open("w")
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env=environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self.pump, daemon=True).start()

    def pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_message(self, timeout: float) -> dict[str, Any] | None:
        """The next protocol message, or None at the end of the output."""
        line = self.lines.get(timeout=timeout)
        if line is None:
            return None
        message = decode(line)
        assert message is not None, f"not a protocol message on stdout: {line!r}"
        self.seen.append(message)
        return message

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next_message(max(0.0, deadline - time.monotonic()))
            assert message is not None, f"output ended before a {kind!r} message: {self.stderr()}"
            if message["type"] == kind:
                return message

    def rest(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while self.next_message(max(0.0, deadline - time.monotonic())) is not None:
            pass
        return self.seen

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def close(self) -> None:
        """Kill the process if it still runs; release its pipes."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr_file):
            if stream is not None:
                stream.close()


def outputs(folder: Path) -> list[str]:
    return ["--output-volume", str(folder / "recon.nii.gz"), "--output-json", str(folder / "report.json")]


@dataclass
class Finished:
    """A completed run: its output folder and what it printed."""

    folder: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, phantom_stacks: SimulationResult
) -> dict[str, Finished]:
    """The json-mode and the terminal-mode run, started together: each spends most of its time in
    single-threaded start-up, so together they take little more than one."""
    logs = tmp_path_factory.mktemp("logs")
    folders = {mode: tmp_path_factory.mktemp(mode) for mode in ("json", "bar")}
    preview, gaussians = folders["json"] / "preview", folders["json"] / "gaussians.vtp"
    arguments = {
        "json": [*tiny(4), "--progress", "json", "--preview-dir", str(preview),
                 "--output-gaussians", str(gaussians)],
        "bar": tiny(2),
    }  # fmt: skip
    processes = {}
    for mode, args in arguments.items():
        argv = command(phantom_stacks, *args, *outputs(folders[mode]))
        with open(logs / f"{mode}.out", "w") as stdout, open(logs / f"{mode}.err", "w") as stderr:
            processes[mode] = subprocess.Popen(
                argv, cwd=REPO, env=environment(), stdout=stdout, stderr=stderr
            )
    runs = {}
    for mode, process in processes.items():
        try:
            process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            process.kill()
        text = [(logs / f"{mode}.{stream}").read_text() for stream in ("out", "err")]
        runs[mode] = Finished(folders[mode], process.returncode, *text)
    return runs


def test_json_stream_reports_every_stage_and_the_outputs(
    finished: dict[str, Finished], phantom_stacks: SimulationResult
) -> None:
    done = finished["json"]
    preview, volume = done.folder / "preview", done.folder / "recon.nii.gz"
    gaussians, report_path = done.folder / "gaussians.vtp", done.folder / "report.json"
    assert done.returncode == 0, done.stderr
    messages = protocol(done.stdout)
    assert all(message["v"] == PROTOCOL_VERSION for message in messages)
    kinds = [message["type"] for message in messages]
    assert kinds[0] == "started" and kinds[-1] == "done" and "error" not in kinds, kinds
    assert kinds.count("started") == 1 and kinds.count("done") == 1, kinds

    started = messages[0]
    assert started["n_stacks"] == len(phantom_stacks.stack_paths) and started["total"] == 4
    assert started["n_gaussians"] > 0 and 0 < started["n_slices"] < started["n_pixels"]

    progress = [message for message in messages if message["type"] == "progress"]
    assert [message["iter"] for message in progress] == list(range(1, started["total"] + 1))
    for message in progress:
        assert message["total"] == started["total"]
        assert message["eta_s"] >= 0 and message["elapsed_s"] >= 0 and math.isfinite(message["loss"])
    assert progress[-1]["eta_s"] == 0

    checkpoints = [message for message in messages if message["type"] == "checkpoint"]
    assert checkpoints, kinds
    for message in checkpoints:
        assert all(Path(message[key]).parent == preview for key in ("volume", "gaussians", "ellipsoids"))
    assert_readable(checkpoints[-1]["volume"], checkpoints[-1]["gaussians"], checkpoints[-1]["ellipsoids"])

    final = messages[-1]
    assert final["cancelled"] is False
    assert final["volume"] == str(volume) and final["report"] == str(report_path)
    assert final["gaussians"] == str(gaussians.with_suffix(".npz")) and final["ellipsoids"] == str(gaussians)
    assert_readable(final["volume"], final["gaussians"], final["ellipsoids"])
    assert sitk.ReadImage(final["volume"]).GetSpacing() == pytest.approx((1.5,) * 3)

    report = json.loads(report_path.read_text())
    assert report["cancelled"] is False and report["device"] == started["device"]
    assert report["settings"]["n_gaussians"] == 500 and report["settings"]["iterations"] == 4
    assert len(report["slices"]) == started["n_slices"]
    for item in report["slices"]:
        assert SLICE_KEYS <= set(item), sorted(item)
        assert len(item["rotation"]) == 3 and len(item["translation"]) == 3
        assert item["scale"] > 0 and 0 <= item["weight"] <= 1 and isinstance(item["excluded"], bool)
        assert (item["reason"] is not None) == item["excluded"]
    assert len(report["stacks"]) == started["n_stacks"]
    assert all(isinstance(stack["verdict"], str) and stack["verdict"] for stack in report["stacks"])
    assert sorted(os.listdir(done.folder)) == sorted(
        ["preview", "recon.nii.gz", "gaussians.npz", "gaussians.vtp", "report.json"]
    ), "temporary files left behind"


@pytest.mark.parametrize("how", ["stdin", "stop-file"])
def test_cancel_stops_promptly_and_keeps_the_last_preview(
    how: str, phantom_stacks: SimulationResult, tmp_path: Path
) -> None:
    out, preview, stop_file = tmp_path / "out", tmp_path / "preview", tmp_path / "stop"
    out.mkdir()
    args = [*ENDLESS, "--progress", "json", "--output-volume", str(out / "recon.nii.gz"),
            "--output-gaussians", str(out / "gaussians.vtp"), "--output-json", str(out / "report.json"),
            "--preview-dir", str(preview)]  # fmt: skip
    if how == "stop-file":
        args += ["--stop-file", str(stop_file)]
    worker = Worker(command(phantom_stacks, *args), tmp_path / "stderr.txt")
    try:
        worker.wait_for("progress", RUN_TIMEOUT_S)
        cancelled_at = time.monotonic()
        if how == "stdin":
            assert worker.process.stdin is not None
            worker.process.stdin.write("cancel\n")
            worker.process.stdin.flush()
        else:
            stop_file.touch()
        returncode = worker.process.wait(timeout=CANCEL_WITHIN_S)
        elapsed = time.monotonic() - cancelled_at
        messages = worker.rest(timeout=10)
    finally:
        worker.close()
    assert returncode == EXIT_CANCELLED, worker.stderr()
    assert elapsed < CANCEL_WITHIN_S
    kinds = [message["type"] for message in messages]
    assert kinds[-1] == "done" and "checkpoint" in kinds and "error" not in kinds, kinds
    assert messages[-1]["cancelled"] is True
    assert messages[-1]["report"] is None
    assert os.listdir(out) == [], "a final output (or a temporary file) was written"
    assert {"preview.nii.gz", "preview_gaussians.npz", "preview_gaussians.vtp"} <= set(os.listdir(preview))
    assert messages[-1]["volume"] == str(preview / "preview.nii.gz")
    assert_readable(messages[-1]["volume"], messages[-1]["gaussians"], messages[-1]["ellipsoids"])
    assert all(message["iter"] < 100000 for message in messages if message["type"] == "progress")


def test_terminal_mode_prints_the_quality_table_and_the_outputs(
    finished: dict[str, Finished], phantom_stacks: SimulationResult
) -> None:
    done = finished["bar"]
    volume, report_path = done.folder / "recon.nii.gz", done.folder / "report.json"
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr, "a progress bar was drawn although stderr is not a terminal"
    lines = done.stdout.splitlines()
    assert all(decode(line) is None for line in lines), "protocol messages outside --progress json"
    report = json.loads(report_path.read_text())
    n_stacks = len(phantom_stacks.stack_paths)
    assert lines[0].split()[:4] == ["stack", "slices", "rejected", "residual"], lines[0]
    for index, (line, stack) in enumerate(zip(lines[1 : 1 + n_stacks], report["stacks"], strict=True)):
        assert line.split()[:3] == [str(index + 1), str(stack["n_slices"]), str(stack["n_excluded"])], line
        assert stack["verdict"] in line
    printed = dict(line.split(": ", 1) for line in lines if line.startswith(("volume: ", "report: ")))
    assert printed == {"volume": str(volume), "report": str(report_path)}, lines
    assert sitk.ReadImage(printed["volume"]).GetDimension() == 3
