"""Writing outputs whole or not at all, and never over an input.

A file is written under a hidden temporary name in its destination folder (keeping the extension, so
that writers choosing the format by extension pick the right one), read back to prove that it is
whole (ITK's NIfTI writer reports a full disk on stderr only, and returns as if it had succeeded),
flushed to disk, and only then renamed over the destination. On any failure the temporary file is
removed and the destination is left as it was. The outputs of one run are staged together and renamed
together (``OutputSet``); ``OutputLock`` keeps a second run off the same outputs; ``check_target``
and ``check_not_inputs`` refuse destinations that must not be replaced.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .images import native_stderr, read_image

#: Image formats written in one file (a rename moves all of it).
WRITABLE_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Formats that keep the voxels in a second file named inside the header: a rename cannot move both.
TWO_FILE_EXTENSIONS = (".nhdr", ".mhd", ".hdr", ".img")
_COMPOUND_EXTENSIONS = (".nii.gz",)

#: A function that writes one file at the given path and raises if it could not (see OutputSet.add).
Writer = Callable[[Path], None]


class OutputError(InputError):
    """An output that could not be written (disk full, quota, permissions): reported like bad input."""


def extension(path: str | Path) -> str:
    """The file's extension, ".nii.gz" counted as one."""
    name = Path(path).name
    for compound in _COMPOUND_EXTENSIONS:
        if name.lower().endswith(compound):
            return name[-len(compound) :]
    return Path(name).suffix


def temporary_name(target: Path) -> Path:
    """A hidden, unique name beside the target with the target's extension."""
    suffix = extension(target)
    stem = target.name[: len(target.name) - len(suffix)]
    return target.with_name(f".{stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # folders cannot be flushed everywhere
            raise
    finally:
        os.close(descriptor)


def remove(path: Path) -> None:
    """Delete a file if it is there (a temporary whose folder may be gone or not a folder)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def problem_of(error: BaseException) -> str:
    """The words of a write error: the system's reason when there is one."""
    if isinstance(error, InputError):
        return error.problem
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # ITK's messages end with the line that says what went wrong; they start with a source location.
    return lines[-1][:200] if lines else type(error).__name__


class OutputSet:
    """Files staged under temporary names and renamed into place together by ``commit``.

    Used as a context manager: whatever was staged and not committed is removed on exit. ``add``
    raises OutputError naming the destination when its file cannot be written whole.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def add(self, target: str | Path, write: Writer) -> Path:
        target = Path(target)
        temporary = temporary_name(target)
        try:
            write(temporary)
            if not temporary.is_file():
                raise OSError(errno.EIO, "the writer produced no file")
            fsync_path(temporary)
        except (OSError, RuntimeError, ValueError, InputError) as error:
            remove(temporary)
            raise OutputError(
                target, f"could not be written ({problem_of(error)}); the file there is unchanged"
            ) from None
        except BaseException:
            remove(temporary)
            raise
        self.staged.append((temporary, target))
        return target

    def commit(self) -> None:
        """Rename every staged file over its destination, then flush the folders."""
        try:
            for temporary, target in self.staged:
                os.replace(temporary, target)
        except OSError as error:
            raise OutputError(target, f"could not be put in place ({problem_of(error)})") from None
        for folder in {target.parent for _, target in self.staged}:
            fsync_path(folder)
        self.staged = []

    def discard(self) -> None:
        for temporary, _ in self.staged:
            remove(temporary)
        self.staged = []


def write_atomically(target: str | Path, write: Writer) -> None:
    """One file through an OutputSet: whole at ``target`` or not written."""
    with OutputSet() as staged:
        staged.add(target, write)
        staged.commit()


# ------------------------------------------------------------------ formats (each writes and reads back)


def check_image_extension(path: str | Path, what: str = "output volume") -> None:
    lower = str(path).lower()
    if lower.endswith(TWO_FILE_EXTENSIONS):
        raise InputError(
            path, f"{what}: two-file image formats cannot be written atomically; use .nii.gz or .nrrd"
        )
    if not lower.endswith(WRITABLE_IMAGE_EXTENSIONS):
        raise InputError(path, f"{what} must end with one of {', '.join(WRITABLE_IMAGE_EXTENSIONS)}")


def save_image(image: sitk.Image, path: Path) -> None:
    """Write an image in the format of its extension and read it back (voxels included)."""
    check_image_extension(path)
    with native_stderr() as said:
        sitk.WriteImage(image, str(path), useCompression=True)
    try:
        back = read_image(path, "written volume")
    except InputError as error:
        # ITK's NIfTI writer says why (a full disk: "wrote only 0 of N bytes") on stderr, and returns.
        raise OSError(errno.EIO, "; ".join(said[-1:]) or error.problem) from None
    if back.GetSize() != image.GetSize() or back.GetPixelID() != image.GetPixelID():
        raise OSError(errno.EIO, "the file read back differs from what was written")


def _json_safe(value: object) -> object:
    """Plain JSON types: numpy scalars and arrays become Python ones, NaN and infinities become None."""
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def save_json(data: Mapping, path: Path) -> None:
    """Write indented strict JSON (NaN and infinities as null) and read it back."""
    text = json.dumps(_json_safe(dict(data)), indent=2, allow_nan=False) + "\n"
    path.write_text(text, encoding="utf-8")
    if path.read_text(encoding="utf-8") != text:
        raise OSError(errno.EIO, "the file read back differs from what was written")


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 picture (rows, cols) or (rows, cols, 3) as PNG and read it back."""
    with native_stderr():
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))
        back = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    if back.shape != array.shape:
        raise OSError(errno.EIO, "the file read back differs from what was written")


#: What ITK writes a transform as, by extension (Slicer reads all three).
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5")


def save_transform(transform: sitk.Transform, path: Path) -> None:
    """Write an ITK transform file and read it back (same parameters)."""
    with native_stderr():
        sitk.WriteTransform(transform, str(path))
        back = sitk.ReadTransform(str(path))
    if not np.allclose(back.GetParameters(), transform.GetParameters(), atol=1e-6):
        raise OSError(errno.EIO, "the file read back differs from what was written")


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write a SimpleITK image atomically, in the format named by the extension (.nii.gz, .nrrd, ...)."""
    check_image_extension(path)
    write_atomically(path, lambda temporary: save_image(image, temporary))


def write_json(data: Mapping, path: str | Path) -> None:
    """Write ``data`` as indented JSON atomically; NaN and infinities are written as null (strict JSON)."""
    write_atomically(path, lambda temporary: save_json(data, temporary))


def write_png(array: np.ndarray, path: str | Path) -> None:
    write_atomically(path, lambda temporary: save_png(array, temporary))


# ------------------------------------------------------------------ where outputs may go


def writable(folder: Path) -> bool:
    """Whether a file can be created in the folder: tried, since os.access is wrong for root, read-only
    file systems and ACLs."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_target(path: str | Path, what: str) -> None:
    """Refuse a destination that cannot be replaced by a new file: a symbolic link, an existing folder,
    device or pipe, or a place in a missing or read-only folder."""
    target = Path(path)
    if target.is_symlink():
        raise InputError(path, f"{what} is a symbolic link; give the path of a regular file")
    if target.exists() and not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file (a device or a pipe)"
        raise InputError(path, f"{what} exists and is {kind}: it cannot be replaced by the {what}")
    folder = target.parent
    if not folder.is_dir():
        missing = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(path, f"the {what}'s folder {missing}")
    if not writable(folder):
        raise InputError(path, f"the {what}'s folder is not writable")


def check_folder_target(path: str | Path, what: str) -> None:
    """Refuse a folder destination (previews) that is a file, a link, or cannot be created or written."""
    folder = Path(path)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(path, f"{what} exists and is not a folder")
    if folder.exists() and not writable(folder):
        raise InputError(path, f"{what} is not a writable folder")
    if not folder.exists() and not (folder.parent.is_dir() and writable(folder.parent)):
        raise InputError(path, f"{what} cannot be created (its parent folder is missing or read-only)")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file: through symbolic links (realpath) and hard links (inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inputs(targets: Mapping[Path, str], inputs: Mapping[Path, str]) -> None:
    """Refuse any destination that is an input (or another destination) under any name."""
    seen: list[tuple[Path, str]] = []
    for target, what in targets.items():
        for source, kind in inputs.items():
            if same_file(target, source):
                raise InputError(
                    target, f"the {what} would overwrite the {kind} {source}; choose another path"
                )
        for other, other_what in seen:
            if same_file(target, other):
                raise InputError(target, f"is given both as the {other_what} and as the {what}")
        seen.append((target, what))


# ------------------------------------------------------------------ one run per set of outputs


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.gaussiansvr-lock"


class OutputLock:
    """Lock files beside the destinations of a run, so that a second run cannot write the same ones.

    A lock names its process and host; one left by a process that no longer runs on this host is
    stale and taken over. Used as a context manager; the locks are removed on exit.
    """

    def __init__(self, targets: Iterable[Path]) -> None:
        self.targets = sorted({Path(os.path.abspath(t)) for t in targets})
        self.held: list[Path] = []

    def __enter__(self) -> OutputLock:
        try:
            for target in self.targets:
                self._take(target)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take(self, target: Path) -> None:
        lock = lock_path(target)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale(lock):
                    lock.unlink(missing_ok=True)
                    continue
                holder = lock.read_text(errors="replace").split() if lock.exists() else []
                who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another run"
                raise InputError(
                    target,
                    f"is being written by {who}; wait for that run to end or choose other outputs "
                    f"(if no run is left, remove {lock.name})",
                ) from None
            with os.fdopen(descriptor, "w") as file:
                file.write(me)
            self.held.append(lock)
            return
        raise InputError(target, f"its lock file {lock.name} cannot be taken over")

    @staticmethod
    def _stale(lock: Path) -> bool:
        try:
            pid, host = lock.read_text(errors="replace").split()
            return host == socket.gethostname() and not _process_alive(int(pid))
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        for lock in self.held:
            lock.unlink(missing_ok=True)
        self.held = []
