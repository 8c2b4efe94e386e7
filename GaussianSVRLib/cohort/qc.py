"""The cohort's quality control: a table (cohort_qc.tsv) and a page (cohort_qc.html) with one row per
subject: its status, its stacks, rejected slices, the stacks' verdicts, time, the median agreement of
its stacks with the reconstruction (a measure that needs no ground truth), and its montage."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

from ..io.outputs import write_atomically
from .batch import Result, read_report

COLUMNS = ("participant_id", "session_id", "status", "n_stacks", "n_slices", "n_rejected",
           "median_agreement", "time_s", "verdicts", "message")  # fmt: skip


def row(result: Result) -> dict[str, Any]:
    job = result.job
    report = result.report or (read_report(job) if result.status == "skipped" else None)
    stacks = (report or {}).get("stacks", [])
    agreements = [s["agreement"] for s in stacks if s.get("agreement") is not None]
    return {
        "participant_id": f"sub-{job.subject}",
        "session_id": f"ses-{job.session}" if job.session else "n/a",
        "status": result.status,
        "n_stacks": len(job.stacks),
        "n_slices": sum(s["n_slices"] for s in stacks) if stacks else "n/a",
        "n_rejected": sum(s["n_excluded"] for s in stacks) if stacks else "n/a",
        "median_agreement": f"{median(agreements):.3f}" if agreements else "n/a",
        "time_s": f"{result.seconds:.1f}" if result.status != "skipped" else "n/a",
        "verdicts": "; ".join(s["verdict"] for s in stacks) if stacks else "n/a",
        "message": result.message.replace("\t", " ").replace("\n", " ") or "n/a",
    }


def tsv(results: Sequence[Result]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(row(result) for result in results)
    return buffer.getvalue()


def page(results: Sequence[Result], out_dir: Path) -> str:
    """The HTML page: every subject's montage thumbnail (a relative link, so the folder can move), status
    and verdicts. An image sets ``data-loaded`` once the browser has it."""
    rows = []
    for result in results:
        values = row(result)
        montage = result.job.output("montage")
        picture = (
            f"<img src='{html.escape(montage.relative_to(out_dir).as_posix())}' width='360' "
            "alt='montage' onload=\"this.dataset.loaded='1'\">"
            if montage.is_file()
            else "no volume"
        )
        cells = [f"<td>{picture}</td>"] + [
            f"<td class='{key}'>{html.escape(str(values[key]))}</td>" for key in COLUMNS
        ]
        rows.append(
            f"<tr class='{values['status']}' id='{html.escape(result.job.label)}'>{''.join(cells)}</tr>"
        )
    header = "".join(f"<th>{html.escape(key)}</th>" for key in ("montage", *COLUMNS))
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>GaussianSVR cohort QC</title>"
        "<style>body{font-family:sans-serif} td,th{padding:4px;border-bottom:1px solid #ccc;"
        "vertical-align:top} tr.failed{background:#fdd} tr.done{background:#efe}</style></head><body>"
        f"<h1>GaussianSVR cohort QC</h1><p id='summary'>{len(results)} subjects: {summary}</p>"
        f"<table><tr>{header}</tr>{''.join(rows)}</table></body></html>\n"
    )


def write_cohort_qc(results: Sequence[Result], out_dir: Path) -> tuple[Path, Path]:
    """Write cohort_qc.tsv and cohort_qc.html into out_dir (each whole); returns their paths."""
    table, web = Path(out_dir) / "cohort_qc.tsv", Path(out_dir) / "cohort_qc.html"
    ordered = sorted(results, key=lambda r: r.job.label)
    write_atomically(table, lambda path: path.write_text(tsv(ordered), encoding="utf-8"))
    write_atomically(web, lambda path: path.write_text(page(ordered, Path(out_dir)), encoding="utf-8"))
    return table, web
