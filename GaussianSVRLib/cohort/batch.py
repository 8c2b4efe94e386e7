"""Reconstruct a cohort: every job of a BIDS dataset (bids.py) as a task, on a Dask cluster (a local one
on this machine by default, or the one at ``scheduler``), or one after the other without Dask.

Each subject runs the command line in a process of its own (``gaussiansvr reconstruct``): its threads
are pinned to its worker's share of the CPUs, a crash or a bad input stays with that subject, and a
worker that dies takes its reconstruction with it (the process's stdin closes, and it cancels). A
subject's outputs appear as one set (the engine's guarantee), its JSON sidecar last: a subject whose
sidecar holds the same settings is done, and is skipped when the batch runs again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import SimpleITK as sitk

from .. import __version__
from ..devices import cpu_threads
from ..errors import EXIT_INPUT_ERROR, EXIT_NOT_ALIGNED
from ..export.montage import write_montage
from ..io.outputs import write_json
from ..io.progress import ProtocolError, decode
from ..settings import Settings
from .bids import Job

log = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed"]
#: How long a subject waits for the outputs of an earlier try of it (on a worker that died) to be released.
LOCK_WAIT_S = 60.0
#: Memory one reconstruction needs with room to spare (GiB): the local cluster has no more workers.
MEMORY_PER_RUN_GIB = 3.0
HOMEPAGE = "https://github.com/gaussiansvr/SlicerGaussianSVR"


@dataclass
class Result:
    """What became of one job: its status, its time, the engine's message when it failed, its report."""

    job: Job
    status: Status
    seconds: float = 0.0
    message: str = ""
    report: dict[str, Any] | None = field(default=None, repr=False)


def settings_path(out_dir: Path) -> Path:
    """Where the batch keeps the settings every subject runs with (passed as --settings)."""
    return Path(out_dir) / "code" / "gaussiansvr_settings.json"


def is_done(job: Job, settings: Settings) -> bool:
    """Whether the job's outputs are complete and were made with these settings (its sidecar, written
    last, says so)."""
    try:
        sidecar = json.loads(job.output("sidecar").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(settings.as_dict()))
    return sidecar.get("settings") == wanted and all(job.output(k).is_file() for k in ("volume", "report"))


def engine_command(job: Job, settings_file: Path) -> list[str]:
    masks = ["none" if mask is None else str(mask) for mask in job.masks]
    command = [sys.executable, "-m", "GaussianSVRLib", "reconstruct", "--input-stacks", *map(str, job.stacks)]
    if any(mask is not None for mask in job.masks):
        command += ["--stack-masks", *masks]
    return command + [
        "--output-volume", str(job.output("volume")),
        "--output-gaussians", str(job.output("gaussians")),
        "--output-json", str(job.output("report")),
        "--output-qc", str(job.output("qc")),
        "--settings", str(settings_file),
        "--progress", "json",
    ]  # fmt: skip


def pinned(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that keeps the child on these CPUs (the engine uses as many threads as it may run on)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, set(cpus))


def run_engine(job: Job, settings_file: Path, cpus: Sequence[int] | None) -> tuple[int, str]:
    """Run the engine on one job; returns its exit code and its error (the protocol's "error" message,
    else the end of its log). Its stdin stays open while this process lives: if the process dies, the
    engine's stdin ends and it cancels."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    threads = str(len(cpus)) if cpus else str(os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            engine_command(job, settings_file), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log_file, text=True, env=env, preexec_fn=pinned(cpus),
        )  # fmt: skip
        message = ""
        for line in process.stdout:  # stdin stays open meanwhile: it only says this process lives
            try:
                decoded = decode(line)
            except ProtocolError:
                continue
            if decoded is not None and decoded["type"] == "error":
                message = decoded["message"]
        process.wait()
        process.stdin.close()
        log_file.seek(0)
        if not message and process.returncode:
            tail = " ".join(log_file.read().strip().splitlines()[-3:])[-500:]
            message = tail or f"exit code {process.returncode}"
    return process.returncode, message


def sidecar(job: Job, report: dict[str, Any], bids_dir: Path) -> dict[str, Any]:
    """The JSON sidecar of the reconstructed volume: what made it, from what, with which settings, and the
    QC verdicts."""
    return {
        "Description": "Slice-to-volume reconstruction of the subject's T2w stacks with 3-D Gaussians",
        "GeneratedBy": [{"Name": "GaussianSVR", "Version": __version__, "CodeURL": HOMEPAGE}],
        "Sources": [f"bids:raw:{stack.relative_to(bids_dir).as_posix()}" for stack in job.stacks],
        "gaussiansvr_version": __version__,
        "settings": report["settings"],
        "stacks": [
            {
                key: stack.get(key)
                for key in ("path", "n_slices", "n_excluded", "agreement", "status", "verdict")
            }
            for stack in report["stacks"]
        ],
        "timings": {key: value for key, value in report["timings"].items() if not isinstance(value, dict)},
    }


def reconstruct_job(
    job: Job, bids_dir: Path, settings_file: Path, cpus: Sequence[int] | None = None
) -> Result:
    """One job end to end: the engine, then the montage and the sidecar (last). Never raises for the
    job's own problems: they are its Result."""
    started, started_at = time.monotonic(), now()
    code, message = run_engine(job, settings_file, cpus)
    waited = 0.0
    while code == EXIT_INPUT_ERROR and "is being written by" in message and waited < LOCK_WAIT_S:
        time.sleep(2.0)  # an earlier try of this job, on a worker that died, is still cancelling
        waited += 2.0
        code, message = run_engine(job, settings_file, cpus)
    if code == EXIT_NOT_ALIGNED and (written := read_report(job)) is not None:
        message = written["verdict"]["text"]  # the whole sentence, not the end of the log
    if code != 0:
        return Result(job, "failed", time.monotonic() - started, message)
    report = json.loads(job.output("report").read_text(encoding="utf-8"))
    write_montage(sitk.ReadImage(str(job.output("volume"))), job.output("montage"), title=job.label)
    stated = sidecar(job, report, bids_dir) | {"started": started_at, "finished": now()}
    write_json(stated, job.output("sidecar"))
    return Result(job, "done", time.monotonic() - started, report=report)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_report(job: Job) -> dict[str, Any] | None:
    try:
        return json.loads(job.output("report").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ where the jobs run


def local_cluster_size(cpus: int, memory_bytes: int) -> tuple[int, int]:
    """(workers, threads per worker) for a machine: runs of one thread up to 7 CPUs (two cores do more
    as two runs than as one), of two threads beyond; no more runs than the memory holds."""
    threads = 1 if cpus < 8 else 2
    by_memory = int(memory_bytes / (MEMORY_PER_RUN_GIB * 2**30))
    return max(1, min(cpus // threads, by_memory)), threads


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def worker_cpus() -> list[int] | None:
    """The CPUs of the Dask worker running this task: its share of this machine in a local cluster
    (workers are named 0, 1, ...), None elsewhere (the worker's own machine decides)."""
    from distributed import get_worker

    worker = get_worker()
    if not isinstance(worker.name, int) or not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    threads = worker.state.nthreads
    share = available[worker.name * threads : (worker.name + 1) * threads]
    return share or None


def task(job: Job, bids_dir: Path, settings_file: Path) -> Result:
    """A job as a Dask task."""
    return reconstruct_job(job, bids_dir, settings_file, worker_cpus())


def dask_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def on_dask(
    jobs: Sequence[Job], bids_dir: Path, settings_file: Path, scheduler: str | None, workers: int | None
) -> Iterable[Result]:
    """The jobs' results as they finish, from the cluster at ``scheduler`` or a local one."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        n, threads = local_cluster_size(cpu_threads(), physical_memory())
        n = workers or n
        log.info("a local Dask cluster: %d workers of %d thread(s)", n, threads)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=None
        )
    client = Client(cluster if cluster is not None else scheduler)
    try:
        futures = {
            client.submit(task, job, bids_dir, settings_file, pure=False, retries=1): job for job in jobs
        }
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as error:  # a worker that died too often, or a task that could not run
                yield Result(futures[future], "failed", 0.0, f"{type(error).__name__}: {error}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def one_after_the_other(jobs: Sequence[Job], bids_dir: Path, settings_file: Path) -> Iterable[Result]:
    for job in jobs:
        yield reconstruct_job(job, bids_dir, settings_file)


# ------------------------------------------------------------------ the batch


def dataset_description(bids_dir: Path) -> dict[str, Any]:
    """The derivatives dataset's description (BIDS: DatasetType derivative, GeneratedBy)."""
    try:
        name = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8")).get("Name")
    except (OSError, ValueError, AttributeError):
        name = None
    return {
        "Name": f"GaussianSVR reconstructions of {name or bids_dir.name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "GaussianSVR", "Version": __version__, "CodeURL": HOMEPAGE}],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
    }


def run_cohort(
    jobs: Sequence[Job],
    bids_dir: Path,
    out_dir: Path,
    settings: Settings,
    scheduler: str | None = None,
    workers: int | None = None,
    sequential: bool = False,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Reconstruct the jobs not done yet (with these settings); returns every job's Result (the done ones
    "skipped"). The derivatives' dataset_description.json and the settings file are written first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(dataset_description(bids_dir), out_dir / "dataset_description.json")
    settings_file = settings_path(out_dir)
    settings_file.parent.mkdir(exist_ok=True)
    write_json({"settings": settings.as_dict()}, settings_file)
    results = [Result(job, "skipped") for job in jobs if is_done(job, settings)]
    if results:
        log.warning("skipped, done earlier with these settings: %s", ", ".join(r.job.label for r in results))
    todo = [job for job in jobs if not is_done(job, settings)]
    if sequential or not dask_available():
        if not sequential:
            log.warning(
                "Dask is not installed (pip install 'GaussianSVRLib[cohort]'): the subjects run one after "
                "the other"
            )
        finished = one_after_the_other(todo, bids_dir, settings_file)
    else:
        finished = on_dask(todo, bids_dir, settings_file, scheduler, workers)
    for result in finished:
        results.append(result)
        if progress is not None:
            progress(result)
    return results
