"""The worker process runner against real subprocesses: the real engine on a tiny phantom (started,
progress, done; cancel mid-run with its last checkpoint; bad input), and small worker scripts written
here for what the engine must never do (crash, print malformed lines, ignore a cancel)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from GaussianSVRSlicer import command, run_state
from GaussianSVRSlicer.run_state import Outcome, RunState, Throttle, format_duration
from GaussianSVRSlicer.runner import EventKind, WorkerProcess, classify_stdout_line
from slicer_helpers import REPO, TINY_ENGINE_ARGS

from GaussianSVRLib.io import progress


def engine_worker(
    stacks: list[Path], masks: list[Path | None], out: Path, iterations: int, grace_s: float = 20.0
) -> WorkerProcess:
    files = command.RunFiles.in_folders(out, out, "recon")
    files.preview_dir.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "GaussianSVRLib", "reconstruct", "--input-stacks", *map(str, stacks),
        "--output-volume", str(files.volume), "--output-gaussians", str(files.gaussians),
        "--output-json", str(files.report), "--preview-dir", str(files.preview_dir),
        "--stop-file", str(files.stop_file), "--progress", "json", "--iterations", str(iterations),
        *TINY_ENGINE_ARGS,
    ]  # fmt: skip
    if any(masks):
        args += ["--stack-masks", *(command.NO_MASK if mask is None else str(mask) for mask in masks)]
    env = command.worker_environment(os.environ, REPO)
    return WorkerProcess(args, env=env, cwd=out, stop_file=files.stop_file, grace_s=grace_s)


def collect(worker: WorkerProcess, timeout_s: float, until=None) -> list:
    """Poll the worker like the GUI timer does until it exits (or ``until(events)`` holds)."""
    events: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events += worker.poll()
        if events and events[-1].kind is EventKind.EXITED:
            return events
        if until is not None and until(events):
            return events
        time.sleep(0.05)
    worker.kill()
    raise AssertionError(f"worker did not finish within {timeout_s} s; last events: {events[-5:]}")


def messages(events: list, kind: str) -> list[dict]:
    return [e.message for e in events if e.kind is EventKind.MESSAGE and e.message["type"] == kind]


def write_script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(script)]


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" in status.read_text()


# -- the real engine --------------------------------------------------------------------------------


def test_engine_run_reports_started_progress_checkpoints_and_done(phantom_files, phantom_masks, tmp_path):
    worker = engine_worker(phantom_files, phantom_masks, tmp_path, iterations=5)
    worker.start()
    events = collect(worker, timeout_s=240)
    state = RunState()
    for event in events:
        state.handle(event)

    assert events[-1].kind is EventKind.EXITED and events[-1].returncode == 0, state.failure_details()
    assert [e for e in events if e.kind is EventKind.PROTOCOL_ERROR] == []
    started = messages(events, "started")
    assert len(started) == 1 and started[0]["device"] == "cpu" and started[0]["total"] == 5
    iterations = [m["iter"] for m in messages(events, "progress")]
    assert iterations and iterations == sorted(iterations) and iterations[-1] == 5
    checkpoints = messages(events, "checkpoint")
    assert checkpoints, "a checkpoint every second was asked for"
    for checkpoint in checkpoints:
        assert Path(checkpoint["volume"]).is_file() and Path(checkpoint["gaussians"]).is_file()
    (done,) = messages(events, "done")
    for key in ("volume", "report"):
        assert Path(done[key]).is_file()
    assert Path(done["gaussians"]).with_suffix(".npz").is_file()
    assert state.outcome is Outcome.DONE and state.fraction == 1.0
    report = json.loads(Path(done["report"]).read_text())
    assert len(report["stacks"]) == 3 and len(report["slices"]) == sum(
        s["n_slices"] for s in report["stacks"]
    )
    assert not worker.running and worker.returncode == 0


def test_engine_cancel_mid_run_writes_a_last_checkpoint_and_exits(phantom_files, phantom_masks, tmp_path):
    worker = engine_worker(phantom_files, phantom_masks, tmp_path, iterations=20000)
    worker.start()
    events = collect(worker, timeout_s=240, until=lambda evs: len(messages(evs, "progress")) >= 2)
    assert worker.running
    worker.cancel()
    cancelled_at = time.monotonic()
    events += collect(worker, timeout_s=60)

    assert not worker.killed, "the engine did not stop within the grace period; it had to be killed"
    assert time.monotonic() - cancelled_at < 20
    assert Path(worker.stop_file).exists()
    checkpoints = messages(events, "checkpoint")
    assert checkpoints, "a cancelled run must leave its last checkpoint"
    assert Path(checkpoints[-1]["volume"]).is_file() and Path(checkpoints[-1]["gaussians"]).is_file()
    assert max(m["iter"] for m in messages(events, "progress")) < 20000
    state = RunState(cancel_requested=True)
    for event in events:
        state.handle(event)
    assert state.outcome is Outcome.CANCELLED
    assert gone(worker.pid)


def test_engine_bad_input_is_exit_code_2_with_an_error_message(tmp_path):
    worker = engine_worker([tmp_path / "missing.nii.gz"], [None], tmp_path, iterations=5)
    worker.start()
    events = collect(worker, timeout_s=120)
    state = RunState()
    for event in events:
        state.handle(event)
    assert events[-1].returncode == run_state.EXIT_BAD_INPUT
    assert state.outcome is Outcome.BAD_INPUT
    assert "missing.nii.gz" in state.failure_summary()
    assert not any("Traceback" in line for line in state.log)
    assert not (tmp_path / "recon.nii.gz").exists()


# -- test doubles for what the engine must never do ----------------------------------------------------


def test_crashing_worker_reports_its_last_log_lines(tmp_path):
    args = write_script(
        tmp_path,
        f"""
        import sys
        print({progress.encode("started", device="cpu", total=10)!r}, flush=True)
        for i in range(30):
            print(f"working {{i}}", file=sys.stderr, flush=True)
        raise MemoryError("out of memory while sampling the volume")
        """,
    )
    worker = WorkerProcess(args)
    worker.start()
    state = RunState()
    for event in collect(worker, timeout_s=30):
        state.handle(event)

    assert state.returncode not in (0, None)
    assert state.outcome is Outcome.FAILED
    details = state.failure_details(lines=5)
    assert "exit code" in details and "MemoryError: out of memory" in details
    assert "working 0" not in details  # only the last lines
    assert state.status_text().startswith("Failed")


def test_malformed_and_non_json_lines_are_log_text_or_protocol_errors(tmp_path):
    good = {
        "v": progress.PROTOCOL_VERSION,
        "type": "progress",
        "iter": 3,
        "total": 9,
        "loss": 0.5,
        "eta_s": 4.0,
    }
    args = write_script(
        tmp_path,
        f"""
        import json
        print("plain log text", flush=True)
        print("{{not json", flush=True)
        print("[1, 2, 3]", flush=True)
        print('{{"v": {progress.PROTOCOL_VERSION}, "type": "no-such-type"}}', flush=True)
        print(json.dumps({good!r}), flush=True)
        print(json.dumps({{"v": 99, "type": "progress", "iter": 4}}), flush=True)
        """,
    )
    worker = WorkerProcess(args)
    worker.start()
    events = collect(worker, timeout_s=30)
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.LOG, EventKind.LOG, EventKind.LOG, EventKind.PROTOCOL_ERROR,
        EventKind.MESSAGE, EventKind.PROTOCOL_ERROR, EventKind.EXITED,
    ]  # fmt: skip
    assert events[0].text == "plain log text"
    assert events[4].message == good
    assert "99" in events[5].text

    state = RunState()
    for event in events:
        state.handle(event)
    assert state.iteration == 3 and state.total == 9
    assert state.outcome is Outcome.FAILED  # exit 0, but a worker of another version cannot be trusted
    assert "reinstall" in state.failure_summary()


def test_cancel_kills_the_whole_tree_of_a_worker_that_ignores_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    args = write_script(
        tmp_path,
        f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(120)
        """,
    )
    worker = WorkerProcess(args, stop_file=tmp_path / "stop", grace_s=0.5)
    worker.start()
    collect(worker, timeout_s=30, until=lambda evs: any(e.text == "ready" for e in evs))
    child_pid = int(pid_file.read_text())
    started = time.monotonic()
    worker.cancel()
    events = collect(worker, timeout_s=30)

    assert events[-1].kind is EventKind.EXITED and worker.killed
    assert time.monotonic() - started < 10
    assert (tmp_path / "stop").exists()
    deadline = time.monotonic() + 5
    while not gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child_pid), "the worker's child survived: the process tree was not killed"


def test_stop_blocks_until_the_worker_is_gone(tmp_path):
    args = write_script(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    worker = WorkerProcess(args, grace_s=0.3)
    worker.start()
    collect(worker, timeout_s=30, until=lambda evs: len(evs) > 0)
    returncode = worker.stop(timeout=0.3)
    assert returncode is not None and returncode != 0
    assert not worker.running and gone(worker.pid)


# -- pure parts ----------------------------------------------------------------------------------------


def test_classify_stdout_line():
    line = progress.encode("checkpoint", iter=5, volume="v.nii.gz", gaussians="g.npz", ellipsoids="e.vtp")
    assert classify_stdout_line(line + "\n").message["volume"] == "v.nii.gz"
    assert classify_stdout_line("Loading stacks...\n").kind is EventKind.LOG
    assert classify_stdout_line('{"v": 0, "type": "done"}').kind is EventKind.PROTOCOL_ERROR


def test_run_state_progress_and_status_texts():
    state = RunState()
    for line in (
        progress.encode("started", device="cuda", total=400),
        progress.encode("progress", iter=100, total=400, loss=0.1, eta_s=125.0, elapsed_s=40.0, stage="fine"),
    ):
        state.handle(classify_stdout_line(line))
    assert state.fraction == pytest.approx(0.25)
    assert state.progress_text() == "iteration 100 / 400, about 2 min 05 s left"
    assert state.status_text() == "Running on cuda, fine, 40 s elapsed"
    state.cancel_requested = True
    assert state.status_text().startswith("Cancelling")


def test_format_duration():
    assert [format_duration(s) for s in (None, float("nan"), 0, 42.4, 185, 3720)] == [
        "?", "?", "0 s", "42 s", "3 min 05 s", "1 h 02 min",
    ]  # fmt: skip


def test_throttle_allows_one_action_per_interval():
    now = [100.0]
    throttle = Throttle(interval_s=2.0, clock=lambda: now[0])
    assert throttle.ready()
    throttle.mark()
    now[0] += 1.9
    assert not throttle.ready()
    now[0] += 0.1
    assert throttle.ready()
