"""Quality-control summaries of a reconstruction report, for people."""

from __future__ import annotations

from typing import Any


def summary_table(report: dict[str, Any]) -> str:
    """A short plain-text table: one line per stack with its verdict, then the excluded slices."""
    lines = [f"{'stack':<6}{'slices':>7}{'rejected':>10}{'residual':>10}  verdict"]
    for index, stack in enumerate(report["stacks"]):
        residual = stack["mean_residual"]
        lines.append(
            f"{index + 1:<6}{stack['n_slices']:>7}{stack['n_excluded']:>10}"
            f"{'n/a' if residual is None else f'{residual:.3f}':>10}  {stack['verdict']}"
        )
    for item in report["slices"]:
        if item["excluded"]:
            lines.append(f"  stack {item['stack'] + 1} slice {item['k']}: {item['reason']}")
    return "\n".join(lines)
