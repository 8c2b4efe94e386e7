"""A BIDS dataset as reconstruction jobs: its subjects (and sessions), their T2w stacks and brain masks,
and where each job's BIDS-derivative outputs go. Pure Python on the file system.

Stacks are ``sub-*/[ses-*/]anat/*_T2w.nii.gz`` (all runs of a subject, or of a session, together);
a mask comes from a derivatives folder laid out like the dataset: ``sub-01_run-1_desc-brain_mask.nii.gz``
for ``sub-01_run-1_T2w.nii.gz``. Outputs are ``OUT/sub-01/[ses-*/]anat/sub-01[_ses-*]_rec-gaussiansvr_*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

STACK_SUFFIX = "_T2w.nii.gz"
MASK_SUFFIX = "_desc-brain_mask.nii.gz"
#: The reconstruction entity of every output (BIDS derivatives: rec-<label>).
REC = "rec-gaussiansvr"
#: Output files of one job, by kind, as name suffixes after ``<prefix>_rec-gaussiansvr``.
OUTPUT_SUFFIXES = {
    "volume": "_T2w.nii.gz",
    "sidecar": "_T2w.json",
    "gaussians": "_gaussians.npz",
    "ellipsoids": "_gaussians.vtp",
    "report": "_report.json",
    "qc": "_qc.png",
    "montage": "_montage.png",
}


@dataclass(frozen=True)
class Job:
    """One subject (and session) to reconstruct: its stacks, their masks (None: none found), its outputs."""

    subject: str
    session: str | None
    stacks: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    out_dir: Path

    @property
    def label(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    def output(self, kind: str) -> Path:
        return self.out_dir / f"{self.label}_{REC}{OUTPUT_SUFFIXES[kind]}"


def relative_anat(subject: str, session: str | None) -> Path:
    return Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"


def mask_for(stack: Path, bids_dir: Path, masks_dir: Path | None) -> Path | None:
    """The brain mask of a stack in the masks folder (same layout as the dataset), if there is one."""
    if masks_dir is None:
        return None
    relative = stack.relative_to(bids_dir)
    mask = masks_dir / relative.parent / (stack.name[: -len(STACK_SUFFIX)] + MASK_SUFFIX)
    return mask if mask.is_file() else None


def labels(values: Sequence[str] | None, prefix: str) -> set[str] | None:
    """Labels given on the command line, with or without their prefix ("01" or "sub-01")."""
    return None if not values else {value.removeprefix(prefix) for value in values}


def find_jobs(
    bids_dir: Path,
    out_dir: Path,
    masks_dir: Path | None = None,
    participants: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
) -> list[Job]:
    """Every subject (and session) of the dataset with T2w stacks, in sorted order.

    InputError when the folder is no BIDS dataset, when a requested participant is not in it, or
    when nothing is left to reconstruct.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "the BIDS dataset folder does not exist")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(bids_dir, "is not a BIDS dataset: it has no dataset_description.json")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise InputError(masks_dir, "the masks folder does not exist")
    wanted, wanted_sessions = labels(participants, "sub-"), labels(sessions, "ses-")
    jobs = []
    for subject_dir in sorted(p for p in bids_dir.glob("sub-*") if p.is_dir()):
        subject = subject_dir.name.removeprefix("sub-")
        if wanted is not None and subject not in wanted:
            continue
        session_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [None]
        for session_dir in session_dirs:
            session = None if session_dir is None else session_dir.name.removeprefix("ses-")
            if wanted_sessions is not None and session not in wanted_sessions:
                continue
            stacks = tuple(sorted((bids_dir / relative_anat(subject, session)).glob(f"*{STACK_SUFFIX}")))
            if not stacks:
                continue
            masks = tuple(mask_for(stack, bids_dir, masks_dir and Path(masks_dir)) for stack in stacks)
            jobs.append(Job(subject, session, stacks, masks, Path(out_dir) / relative_anat(subject, session)))
    missing = sorted((wanted or set()) - {job.subject for job in jobs})
    if missing:
        raise InputError(bids_dir, f"has no T2w stacks for participant {', '.join(missing)}")
    if not jobs:
        raise InputError(bids_dir, f"has no stacks to reconstruct (sub-*/[ses-*/]anat/*{STACK_SUFFIX})")
    return jobs
