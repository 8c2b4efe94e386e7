"""Cohorts end to end on a tiny BIDS dataset built here (three subjects from the simulated phantom, one
of them in a session, one broken): a real local Dask cluster of two worker processes, a scheduler and
a worker started as processes and reached with --scheduler, a worker killed mid-run, the batch run
again (resume), the QC page in a real headless Chromium; and without Dask, one after the other."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from GaussianSVRLib.cohort import batch
from GaussianSVRLib.cohort.bids import REC, find_jobs
from GaussianSVRLib.cohort.qc import write_cohort_qc
from GaussianSVRLib.errors import InputError
from GaussianSVRLib.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--n-gaussians",
    "300",
    "--iterations",
    "5",
    "--batch-pixels",
    "1024",
    "--output-resolution",
    "2.0",
    "--no-prealign",
    "--bias-correction",
    "none",
    "--no-pose-search",
    "--device",
    "cpu",
]
TINY_SETTINGS = Settings(
    n_gaussians=300,
    iterations=5,
    batch_pixels=1024,
    output_resolution=2.0,
    prealign=False,
    bias_correction="none",
    pose_search=False,
    device="cpu",
)
SUBJECTS = ("sub-01", "sub-02_ses-01", "sub-03")
OUTPUTS = ("volume", "sidecar", "gaussians", "ellipsoids", "report", "qc", "montage")
ENGINE_OUTPUTS = ("volume", "gaussians", "ellipsoids", "report", "qc")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, phantom_stacks) -> tuple[Path, Path]:
    """bids/ with sub-01 (3 runs), sub-02/ses-01 (2 runs), sub-03 (2 runs, the second cut short), and the
    brain masks in masks/ laid out like it."""
    root = tmp_path_factory.mktemp("cohort")
    bids, masks = root / "bids", root / "masks"
    (bids).mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    layout = {("01", None): 3, ("02", "01"): 2, ("03", None): 2}
    for (subject, session), runs in layout.items():
        anat = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
        (bids / anat).mkdir(parents=True)
        (masks / anat).mkdir(parents=True)
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        for run in range(runs):
            stack = bids / anat / f"{prefix}_run-{run + 1}_T2w.nii.gz"
            shutil.copy(phantom_stacks.stack_paths[run], stack)
            shutil.copy(
                phantom_stacks.mask_paths[run],
                masks / anat / f"{prefix}_run-{run + 1}_desc-brain_mask.nii.gz",
            )
    broken = bids / "sub-03" / "anat" / "sub-03_run-2_T2w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:20000])
    return bids, masks


def gaussiansvr(*args: str, **options) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(
        [sys.executable, "-m", "GaussianSVRLib", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        **options,
    )


def output(out: Path, label: str, kind: str) -> Path:
    """Where the batch puts a subject's output of this kind (bids.Job.output, mirrored)."""
    subject, _, session = label.partition("_")
    anat = out / subject / session / "anat" if session else out / subject / "anat"
    suffixes = {
        "volume": "_T2w.nii.gz",
        "sidecar": "_T2w.json",
        "gaussians": "_gaussians.npz",
        "ellipsoids": "_gaussians.vtp",
        "report": "_report.json",
        "qc": "_qc.png",
        "montage": "_montage.png",
    }
    return anat / f"{label}_{REC}{suffixes[kind]}"


def qc_rows(out: Path) -> dict[str, dict[str, str]]:
    lines = (out / "cohort_qc.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    return {
        row["participant_id"] + ("" if row["session_id"] == "n/a" else "_" + row["session_id"]): row
        for row in rows
    }


def leftovers(out: Path) -> list[str]:
    """Temporary or lock files anywhere in the output (a run that did not end cleanly)."""
    return sorted(p.name for p in out.rglob(".*") if p.is_file())


@pytest.fixture(scope="module")
def local_run(dataset) -> tuple[Path, subprocess.CompletedProcess]:
    bids, masks = dataset
    out = bids.parent / "out"
    done = gaussiansvr("-v", "batch", str(bids), str(out), "--masks-dir", str(masks), "--workers", "2", *TINY)
    return out, done


@pytest.mark.slow
def test_a_local_cluster_reconstructs_every_subject_and_reports_the_broken_one(local_run):
    out, done = local_run
    assert done.returncode == 4, done.stderr[-2000:]
    assert "a local Dask cluster: 2 workers of 1 thread(s)" in done.stderr
    assert "sub-03: failed" in done.stderr and "damaged" in done.stderr
    for label in ("sub-01", "sub-02_ses-01"):
        for kind in OUTPUTS:
            assert output(out, label, kind).is_file(), (label, kind)
        assert f"{label}_{REC}_T2w.nii.gz" == output(out, label, "volume").name
    assert not output(out, "sub-03", "volume").exists() and leftovers(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert (
        description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "GaussianSVR"
    )
    sidecars = {
        label: json.loads(output(out, label, "sidecar").read_text()) for label in ("sub-01", "sub-02_ses-01")
    }
    assert sidecars["sub-01"]["settings"]["iterations"] == 5 and len(sidecars["sub-01"]["stacks"]) == 3
    assert (
        sidecars["sub-02_ses-01"]["Sources"][0]
        == "bids:raw:sub-02/ses-01/anat/sub-02_ses-01_run-1_T2w.nii.gz"
    )
    # two workers, each run pinned to its one CPU, the two subjects at the same time
    reports = [json.loads(output(out, label, "report").read_text()) for label in sidecars]
    assert [report["cpu_threads"] for report in reports] == [1, 1]
    spans = [[datetime.fromisoformat(s[k]) for k in ("started", "finished")] for s in sidecars.values()]
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], "the subjects did not run side by side"
    rows = qc_rows(out)
    assert [rows[label]["status"] for label in SUBJECTS] == ["done", "done", "failed"]
    assert rows["sub-01"]["n_stacks"] == "3" and float(rows["sub-01"]["median_agreement"]) > 0
    assert rows["sub-01"]["verdicts"].startswith("stack 1:") and "damaged" in rows["sub-03"]["message"]


@pytest.mark.slow
def test_a_second_run_skips_the_finished_subjects(local_run, dataset):
    out, _ = local_run
    bids, masks = dataset
    before = {label: output(out, label, "volume").stat().st_mtime_ns for label in ("sub-01", "sub-02_ses-01")}
    again = gaussiansvr("batch", str(bids), str(out), "--masks-dir", str(masks), "--sequential", *TINY)
    assert again.returncode == 4
    assert "skipped, done earlier with these settings: sub-01, sub-02_ses-01" in again.stderr
    assert {label: output(out, label, "volume").stat().st_mtime_ns for label in before} == before
    assert [qc_rows(out)[label]["status"] for label in SUBJECTS] == ["skipped", "skipped", "failed"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_the_qc_page_shows_every_subject_in_a_browser(local_run):
    out, _ = local_run
    page = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={out.parent / 'chromium'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (out / "cohort_qc.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for label in SUBJECTS:
        assert f'id="{label}"' in page, label
    assert page.count('data-loaded="1"') == 2, "the two montages did not load"
    # (the last batch on this output wrote it: the first, or the second that skipped two subjects)
    assert 'class="failed" id="sub-03"' in page and re.search(
        r"3 subjects: [02] done, [02] skipped, 1 failed", page
    )


@pytest.fixture
def scheduler(tmp_path):
    """A Dask scheduler started as a process; yields (its address, a function starting workers)."""
    dask = Path(sys.executable).with_name("dask")
    file = tmp_path / "scheduler.json"
    processes = [
        subprocess.Popen(
            [str(dask), "scheduler", "--scheduler-file", str(file), "--port", "0", "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    deadline = time.monotonic() + 60
    while not file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(file.read_text())["address"]

    def worker(name: str) -> subprocess.Popen:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        process = subprocess.Popen(
            [
                str(dask),
                "worker",
                address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--name",
                name,
                "--no-dashboard",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return process

    yield address, worker
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def batch_on(address: str, bids: Path, out: Path, masks: Path, settings: list[str]) -> list[str]:
    """The batch command line for subject 01 on the scheduler at ``address``."""
    return ["batch", str(bids), str(out), "--masks-dir", str(masks), "--scheduler", address,
            "--participant-label", "01", *settings]  # fmt: skip


def test_an_external_scheduler_is_reached_with_scheduler(dataset, scheduler, tmp_path):
    bids, masks = dataset
    address, worker = scheduler
    worker("one")
    out = tmp_path / "out"
    done = gaussiansvr(*batch_on(address, bids, out, masks, TINY))
    assert done.returncode == 0, done.stderr[-2000:]
    assert qc_rows(out)["sub-01"]["status"] == "done" and len(qc_rows(out)) == 1
    assert "1 of 1 subjects reconstructed" in done.stdout


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/stat").is_file()
        and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    )


@pytest.mark.slow
def test_a_worker_killed_mid_run_leaves_nothing_half_written(dataset, scheduler, tmp_path):
    bids, masks = dataset
    address, worker = scheduler
    worker("a")
    worker("b")
    out = tmp_path / "out"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    slow = [*TINY[:3], "150", *TINY[4:]]  # long enough to be caught running
    runner = subprocess.Popen(
        [sys.executable, "-m", "GaussianSVRLib", *batch_on(address, bids, out, masks, slow)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = out / "sub-01" / "anat" / f".sub-01_{REC}_T2w.nii.gz.gaussiansvr-lock"
    deadline = time.monotonic() + 300
    while not lock.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lock.is_file(), "the subject never started"
    engine = int(lock.read_text().split()[0])
    os.kill(parent_of(engine), signal.SIGKILL)  # the Dask worker process running the subject
    stdout, stderr = runner.communicate(timeout=TIMEOUT_S)
    deadline = time.monotonic() + 60
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(engine), "the killed worker's reconstruction outlived it"
    status = qc_rows(out)["sub-01"]["status"]
    assert status in ("done", "failed"), stderr
    written = {kind: output(out, "sub-01", kind).is_file() for kind in OUTPUTS}
    if status == "done":
        assert all(written.values()), written
    elif (
        written["report"]
        and json.loads(output(out, "sub-01", "report").read_text())["verdict"]["status"] == "not_aligned"
    ):
        # the retry finished, not aligned: the engine's whole set for a look, no sidecar (so not done)
        assert all(written[k] for k in ENGINE_OUTPUTS) and not written["sidecar"], written
    else:
        assert not any(written.values()), written
    assert leftovers(out) == []


# -- without Dask, and the pieces -----------------------------------------------------------------


def test_without_dask_the_subjects_run_one_after_the_other(dataset, tmp_path, monkeypatch, caplog):
    bids, masks = dataset
    monkeypatch.setattr(batch, "dask_available", lambda: False)
    jobs = find_jobs(bids, tmp_path / "out", masks, participants=["sub-02"])
    with caplog.at_level("WARNING", logger="GaussianSVRLib.cohort.batch"):
        results = batch.run_cohort(jobs, bids, tmp_path / "out", TINY_SETTINGS)
    assert "the subjects run one after the other" in caplog.text
    assert [r.status for r in results] == ["done"] and batch.is_done(jobs[0], TINY_SETTINGS)
    assert not batch.is_done(jobs[0], TINY_SETTINGS.updated(iterations=6))  # other settings: not done
    table, web = write_cohort_qc(results, tmp_path / "out")
    assert table.read_text().splitlines()[1].startswith("sub-02\tses-01\tdone\t2\t")


@pytest.mark.slow
def test_a_subject_whose_stacks_cannot_be_brought_together_fails_saying_why(
    phantom_stacks, tmp_path, monkeypatch
):
    import numpy as np
    import SimpleITK as sitk

    bids, masks = tmp_path / "bids", tmp_path / "masks"
    for root in (bids / "sub-09" / "anat", masks / "sub-09" / "anat"):
        root.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "turned", "BIDSVersion": "1.9.0"}')
    anat = ("sub-09", "anat")
    for run, (stack, mask) in enumerate(
        zip(phantom_stacks.stack_paths, phantom_stacks.mask_paths, strict=True)
    ):
        name = f"sub-09_run-{run + 1}"
        for source, target in ((stack, bids.joinpath(*anat, f"{name}_T2w.nii.gz")),
                               (mask, masks.joinpath(*anat, f"{name}_desc-brain_mask.nii.gz"))):  # fmt: skip
            image = sitk.ReadImage(source)
            array = sitk.GetArrayFromImage(image)
            # The second and third stacks turned by half a turn in their plane behind the same header.
            turned = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1, ::-1] if run else array))
            turned.CopyInformation(image)
            sitk.WriteImage(turned, str(target))
    monkeypatch.setattr(batch, "dask_available", lambda: False)
    jobs = find_jobs(bids, tmp_path / "out", masks)
    settings = TINY_SETTINGS.updated(iterations=150, n_gaussians=1500, batch_pixels=2048)
    [result] = batch.run_cohort(jobs, bids, tmp_path / "out", settings)
    assert result.status == "failed"
    assert result.message.startswith("the stacks could not be brought together: ")
    assert result.message.endswith("re-acquire them"), "the whole sentence, not the end of a log"
    assert jobs[0].output("volume").exists() and not jobs[0].output("sidecar").exists()
    assert not batch.is_done(jobs[0], settings)


def test_jobs_follow_the_bids_layout_and_the_labels_asked_for(dataset, tmp_path):
    bids, masks = dataset
    jobs = find_jobs(bids, tmp_path, masks)
    assert [job.label for job in jobs] == list(SUBJECTS)
    assert [len(job.stacks) for job in jobs] == [3, 2, 2] and all(all(job.masks) for job in jobs)
    assert (
        jobs[1].output("volume")
        == tmp_path / "sub-02" / "ses-01" / "anat" / f"sub-02_ses-01_{REC}_T2w.nii.gz"
    )
    assert [job.label for job in find_jobs(bids, tmp_path, participants=["03", "sub-01"])] == [
        "sub-01",
        "sub-03",
    ]
    assert find_jobs(bids, tmp_path)[0].masks == (None, None, None)
    assert [job.label for job in find_jobs(bids, tmp_path, sessions=["ses-01"])] == ["sub-02_ses-01"]
    with pytest.raises(InputError, match="no T2w stacks for participant 99"):
        find_jobs(bids, tmp_path, participants=["99"])
    with pytest.raises(InputError, match="no dataset_description.json"):
        find_jobs(bids / "sub-01", tmp_path)


def test_the_local_cluster_fits_the_cores_and_the_memory():
    gib = 2**30
    assert batch.local_cluster_size(2, 24 * gib) == (2, 1)
    assert batch.local_cluster_size(16, 128 * gib) == (8, 2)
    assert batch.local_cluster_size(16, 8 * gib) == (2, 2)  # memory for two runs only
    assert batch.local_cluster_size(1, 1 * gib) == (1, 1)
