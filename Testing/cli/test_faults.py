"""Faults during a run, each reproduced as a user or a client could meet it: a cancel at the last moment,
a client that goes away (its end of stdout or of stdin closed), a second run on the same outputs, a
full preview folder, a crash, a diverging loss, a write that fails after all the work.

Whatever happens, the outputs are a whole set or absent, earlier outputs stay as they were, the exit
code says what happened, and the JSON protocol never breaks.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from GaussianSVRLib import cli
from GaussianSVRLib.cli import EXIT_CANCELLED, EXIT_CRASH, EXIT_INPUT_ERROR
from GaussianSVRLib.errors import InputError
from GaussianSVRLib.export import checkpoints
from GaussianSVRLib.fit import optimize as optimize_module
from GaussianSVRLib.io import outputs as outputs_module
from GaussianSVRLib.io.progress import Emitter, decode, encode
from GaussianSVRLib.pipeline import Outputs, reconstruct
from GaussianSVRLib.settings import Settings
from GaussianSVRLib.sim.simulate import SimulationResult

#: Whole processes end to end: left out of the quick loop (make test-quick).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = Settings(n_gaussians=300, iterations=3, batch_pixels=1024, output_resolution=1.5, prealign=False,
                bias_correction="none", device="cpu")  # fmt: skip
#: Flags of a run far longer than any test waits for.
ENDLESS = ["--n-gaussians", "300", "--iterations", "100000", "--batch-pixels", "1024", "--no-prealign",
           "--output-resolution", "1.5", "--bias-correction", "none"]  # fmt: skip
WITHIN_S = 120.0


def engine(stacks: SimulationResult, *args: str) -> list[str]:
    return [sys.executable, "-m", "GaussianSVRLib", "reconstruct", "--input-stacks", *stacks.stack_paths,
            "--stack-masks", *stacks.mask_paths, *args]  # fmt: skip


def start(argv: list[str], stderr: Path) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
    )


def read_until(process: subprocess.Popen, done, timeout: float = WITHIN_S) -> list[dict]:
    """Protocol messages until ``done(message)`` holds."""
    messages, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        message = decode(line)
        assert message is not None, line
        messages.append(message)
        if done(message):
            return messages
        assert time.monotonic() < deadline, "no such message in time"
    raise AssertionError(f"the output ended first: {messages[-3:]}")


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=WITHIN_S)
    finally:
        if process.poll() is None:
            process.kill()


def out_args(folder: Path) -> list[str]:
    return ["--output-volume", str(folder / "v.nii.gz"), "--output-json", str(folder / "report.json"),
            "--output-gaussians", str(folder / "g")]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_last_iteration_still_cancels(phantom_stacks, tmp_path, signum):
    """The last progress message is out, the volume is being rendered and written: a cancel now must
    still mean exit 130 and no final output."""
    out = tmp_path / "out"
    out.mkdir()
    stderr = tmp_path / "stderr"
    process = start(engine(phantom_stacks, *ENDLESS[:2], "--iterations", "3", *ENDLESS[4:], "--progress",
                           "json", "--output-resolution", "0.8", *out_args(out)), stderr)  # fmt: skip
    read_until(process, lambda m: m["type"] == "progress" and m["iter"] == m["total"])
    process.send_signal(signum)
    rest = process.communicate(timeout=WITHIN_S)[0]
    assert finish(process) == EXIT_CANCELLED, stderr.read_text()
    assert "Traceback" not in stderr.read_text()
    assert os.listdir(out) == [], "a final output (or a temporary or lock file) was written"
    done = [decode(line) for line in rest.splitlines()]
    assert done[-1]["type"] == "done" and done[-1]["cancelled"] is True and done[-1]["volume"] is None


def test_a_closed_stdout_ends_the_run_cleanly(phantom_stacks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stderr = tmp_path / "stderr"
    process = start(engine(phantom_stacks, *ENDLESS, "--progress", "json", *out_args(out)), stderr)
    read_until(process, lambda m: m["type"] == "progress")
    process.stdout.close()  # the client is gone
    assert finish(process) == EXIT_CANCELLED, stderr.read_text()
    assert "Traceback" not in stderr.read_text() and "Exception" not in stderr.read_text(), stderr.read_text()
    assert os.listdir(out) == []


def test_the_end_of_a_piped_stdin_means_cancel(phantom_stacks, tmp_path):
    """A worker whose parent (Slicer) has gone must not run on: its stdin pipe reaches its end."""
    out = tmp_path / "out"
    out.mkdir()
    stderr = tmp_path / "stderr"
    process = start(engine(phantom_stacks, *ENDLESS, "--progress", "json", *out_args(out)), stderr)
    read_until(process, lambda m: m["type"] == "progress")
    rest = process.communicate(timeout=WITHIN_S)[0]  # closes its stdin first, then reads to the end
    messages = [decode(line) for line in rest.splitlines()]
    assert finish(process) == EXIT_CANCELLED, stderr.read_text()
    assert messages[-1]["type"] == "done" and messages[-1]["cancelled"] is True
    assert os.listdir(out) == []


def test_a_second_run_on_the_same_outputs_is_refused_and_the_first_goes_on(phantom_stacks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = start(engine(phantom_stacks, *ENDLESS, "--progress", "json", *out_args(out)), tmp_path / "first")
    read_until(first, lambda m: m["type"] == "started")
    second = subprocess.run(
        engine(phantom_stacks, *ENDLESS, *out_args(out)), cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL, timeout=WITHIN_S,
    )  # fmt: skip
    assert second.returncode == EXIT_INPUT_ERROR
    assert f"being written by process {first.pid}" in second.stderr and len(second.stderr.splitlines()) == 1
    assert first.poll() is None, "the first run was disturbed"
    first.communicate("cancel\n", timeout=WITHIN_S)
    assert finish(first) == EXIT_CANCELLED
    assert os.listdir(out) == [], "the locks were not removed"


def test_the_protocol_never_raises():
    assert json.loads(encode("progress", iter=3, loss=float("nan"), eta_s=float("inf")))["loss"] is None
    closed = []

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    emit = Emitter(Gone(), on_closed=lambda: closed.append(True))
    emit("progress", iter=1)
    emit("done", cancelled=False)
    assert closed == [True] and emit.closed


def test_a_crash_ends_with_an_error_message_and_exit_1(monkeypatch, capsys, phantom_stacks, tmp_path):
    from GaussianSVRLib import pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "reconstruct", broken)
    argv = ["reconstruct", "--input-stacks", *phantom_stacks.stack_paths, "--output-volume",
            str(tmp_path / "v.nii.gz"), "--progress", "json"]  # fmt: skip
    assert cli.main(argv) == EXIT_CRASH
    captured = capsys.readouterr()
    messages = [decode(line) for line in captured.out.splitlines()]
    assert messages[-1]["type"] == "error" and "ZeroDivisionError: a bug" in messages[-1]["message"]
    assert "Traceback" in captured.err  # a bug keeps what a bug report needs


def test_a_diverging_loss_stops_the_run_with_a_message(monkeypatch, phantom_stacks, tmp_path):
    real = optimize_module.weighted_l1
    steps = []

    def diverging(prediction, target, weight):
        steps.append(1)
        return real(prediction, target, weight) * (float("nan") if len(steps) >= 2 else 1.0)

    monkeypatch.setattr(optimize_module, "weighted_l1", diverging)
    with pytest.raises(InputError, match="diverged at iteration 2"):
        reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, settings=TINY,
                    outputs=Outputs(volume=str(tmp_path / "v.nii.gz")))  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_a_full_preview_folder_turns_previews_off_and_the_run_goes_on(monkeypatch, phantom_stacks, tmp_path):
    real_save = outputs_module.save_image

    def full(image, path):
        if "preview" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, path)

    monkeypatch.setattr(checkpoints, "save_image", full)
    often = TINY.updated(checkpoint_interval_s=1e-3)
    result = reconstruct(
        phantom_stacks.stack_paths, phantom_stacks.mask_paths, settings=often,
        outputs=Outputs(volume=str(tmp_path / "v.nii.gz"), report=str(tmp_path / "r.json"),
                        preview_dir=str(tmp_path / "preview")),
    )  # fmt: skip
    assert not result.cancelled and sitk.ReadImage(str(tmp_path / "v.nii.gz")).GetDimension() == 3
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert len(warnings) == 1 and "previews stopped" in warnings[0] and "No space left" in warnings[0]
    assert os.listdir(tmp_path / "preview") == []


def test_a_write_that_fails_after_the_work_leaves_the_earlier_set_untouched(
    monkeypatch, phantom_stacks, tmp_path
):
    """The report and Gaussians could be written, the volume could not (ITK's writer truncated it on a full
    disk and said nothing): none of the new set may replace the earlier one."""
    earlier = {name: f"earlier {name}\n".encode() for name in ("v.nii.gz", "r.json", "g.npz", "g.vtp")}
    for name, content in earlier.items():
        (tmp_path / name).write_bytes(content)
    real_write = outputs_module.sitk.WriteImage

    def truncating(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        if str(path).endswith(".nii.gz"):
            Path(path).write_bytes(Path(path).read_bytes()[:100])

    monkeypatch.setattr(outputs_module.sitk, "WriteImage", truncating)
    with pytest.raises(outputs_module.OutputError, match="v.nii.gz: could not be written"):
        reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, settings=TINY,
                    outputs=Outputs(volume=str(tmp_path / "v.nii.gz"), report=str(tmp_path / "r.json"),
                                    gaussians=str(tmp_path / "g")))  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == sorted(earlier)
    assert all((tmp_path / name).read_bytes() == content for name, content in earlier.items())


def test_cancel_from_the_python_api_after_the_optimization_writes_nothing(phantom_stacks, tmp_path):
    finished = []

    def events(kind, **fields):
        if kind == "progress" and fields["iter"] == fields["total"]:
            finished.append(True)

    result = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, settings=TINY,
                         outputs=Outputs(volume=str(tmp_path / "v.nii.gz"), report=str(tmp_path / "r.json")),
                         events=events, should_stop=lambda: bool(finished))  # fmt: skip
    assert result.cancelled and result.volume is None and os.listdir(tmp_path) == []
