"""The QC summary the module shows after a run, from the engine's JSON report (pure Python)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from .run_state import format_duration

#: Width (pixels) at which the QC picture is shown in the module panel.
QC_PICTURE_WIDTH = 420


def excluded_slices(report: Mapping[str, Any]) -> list[tuple[int, int, str]]:
    """(stack index, slice index k, reason) of every excluded slice, in report order."""
    return [
        (int(entry["stack"]), int(entry["k"]), entry.get("reason") or "outlier")
        for entry in report.get("slices", [])
        if entry.get("excluded")
    ]


def total_seconds(report: Mapping[str, Any]) -> float | None:
    """The run's wall time: the engine's ``total_s`` timing, else the sum of its parts."""
    timings = report.get("timings") or {}
    if "total_s" in timings:
        return float(timings["total_s"])
    values = [float(v) for v in timings.values() if isinstance(v, (int, float))]
    return sum(values) if values else None


def summary_html(
    report: Mapping[str, Any],
    stack_names: Sequence[str] = (),
    max_listed: int = 40,
    qc_picture: Path | None = None,
) -> str:
    """A short HTML summary: device and time, one row per stack, the excluded slices and why, then
    the engine's QC picture (slice weights and the rejected slices) if its path is given.

    ``stack_names`` (e.g. the volume nodes' names) replace the file names of the exported stacks.
    """
    stacks = report.get("stacks", [])
    excluded = excluded_slices(report)
    n_slices = sum(int(s.get("n_slices", 0)) for s in stacks)
    verdict = report.get("verdict", {})
    parts = [
        f"<p><b><font color='#d03030'>{html.escape(verdict['text'].capitalize())}.</font></b></p>"
        if verdict.get("status") == "not_aligned"
        else "",
        f"<p><b>{len(excluded)} of {n_slices} slices excluded</b> "
        f"(device {html.escape(str(report.get('device', '?')))}, "
        f"{format_duration(total_seconds(report))}).</p>",
        "<table border='0' cellspacing='4'><tr><th align='left'>Stack</th><th>Slices</th>"
        "<th>Excluded</th><th align='left'>Verdict</th></tr>",
    ]
    for index, stack in enumerate(stacks):
        name = stack_names[index] if index < len(stack_names) else PurePath(str(stack.get("path", ""))).name
        parts.append(
            f"<tr><td>{index + 1}: {html.escape(name)}</td>"
            f"<td align='right'>{int(stack.get('n_slices', 0))}</td>"
            f"<td align='right'>{int(stack.get('n_excluded', 0))}</td>"
            f"<td>{html.escape(str(stack.get('verdict', '')))}</td></tr>"
        )
    parts.append("</table>")
    if excluded:
        items = [
            f"<li>stack {stack + 1}, slice {k}: {html.escape(reason)}</li>"
            for stack, k, reason in excluded[:max_listed]
        ]
        if len(excluded) > max_listed:
            items.append(f"<li>... and {len(excluded) - max_listed} more (see the JSON report)</li>")
        parts.append("<p>Excluded slices:</p><ul>" + "".join(items) + "</ul>")
    if qc_picture is not None:
        source = html.escape(Path(qc_picture).resolve().as_uri(), quote=True)
        parts.append(
            "<p>Slice weights per stack, and each rejected slice as observed | predicted:<br>"
            f"<img src='{source}' width='{QC_PICTURE_WIDTH}'></p>"
        )
    return "".join(parts)
