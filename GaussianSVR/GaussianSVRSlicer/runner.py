"""The engine's worker process: start it, read its output, cancel it, end its whole process tree.

Pure Python (subprocess, threading, queue): nothing here touches Qt or MRML. Two reader threads
turn the worker's stdout (JSON-lines protocol messages, GaussianSVRLib.io.progress) and stderr (log
text) into ``WorkerEvent``s on one queue; the GUI drains it with ``poll()`` from a timer on the main
thread. The last event is always ``EXITED``, queued after every line the worker wrote.

The worker runs in a new process group (a new session on POSIX) because Slicer's ``PythonSlicer``
is a launcher that runs the real interpreter as a child: killing the launcher alone would leave the
computation running. Cancel is polite first (a ``cancel`` line on stdin and the stop file; the worker
stops between iterations and writes a last checkpoint), then, after a grace period, the tree is killed.
"""

from __future__ import annotations

import enum
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from GaussianSVRLib.io import progress

#: Seconds a cancelled worker gets to write its last checkpoint and exit before its tree is killed.
DEFAULT_GRACE_S = 10.0


class EventKind(enum.Enum):
    MESSAGE = "message"  # a protocol message (``message`` holds the decoded dict)
    LOG = "log"  # a line of log text (``text``), from stderr or a non-JSON stdout line
    PROTOCOL_ERROR = "protocol-error"  # a JSON line with the wrong protocol version or type (``text``)
    EXITED = "exited"  # the process ended (``returncode``); always the last event


@dataclass(frozen=True)
class WorkerEvent:
    kind: EventKind
    message: dict[str, Any] | None = None
    text: str = ""
    returncode: int | None = None


def classify_stdout_line(line: str) -> WorkerEvent:
    """One stdout line of the worker as an event: a protocol message, log text or a protocol error."""
    try:
        message = progress.decode(line)
    except progress.ProtocolError as error:
        return WorkerEvent(EventKind.PROTOCOL_ERROR, text=str(error))
    if message is None:
        return WorkerEvent(EventKind.LOG, text=line.rstrip("\r\n"))
    return WorkerEvent(EventKind.MESSAGE, message=message)


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill the worker and everything it started (it leads its own process group)."""
    if os.name == "nt":
        # taskkill /T follows the parent links that a launcher's child keeps.
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(process.pid)],
            capture_output=True,
            check=False,
            creationflags=subprocess.CREATE_NO_WINDOW,
        )
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group has already exited
    if process.poll() is None:
        process.kill()


@dataclass
class WorkerProcess:
    """One run of a worker command. Not restartable: make a new one per run.

    args: the full command (executable first); env/cwd: for the child; stop_file: the path the worker
    watches (``--stop-file``), created on cancel; grace_s: seconds between the polite cancel and the kill.
    """

    args: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | Path | None = None
    stop_file: Path | None = None
    grace_s: float = DEFAULT_GRACE_S
    cancel_requested: bool = field(default=False, init=False)
    killed: bool = field(default=False, init=False)
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _events: queue.Queue = field(default_factory=queue.Queue, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _watchdog: threading.Timer | None = field(default=None, init=False, repr=False)
    _exited: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def start(self) -> None:
        """Start the worker and its reader threads. Raises OSError if the executable cannot run."""
        if self._process is not None:
            raise RuntimeError("a WorkerProcess runs once; make a new one")
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        self._process = subprocess.Popen(
            list(self.args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if self.env is None else dict(self.env),
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        readers = [
            threading.Thread(
                target=self._read, args=(self._process.stdout, classify_stdout_line), daemon=True
            ),
            threading.Thread(target=self._read, args=(self._process.stderr, _log_event), daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._wait, args=(readers,), daemon=True).start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """True until the process has exited and every line it wrote has been queued."""
        return self._process is not None and not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    def poll(self, max_events: int = 10000) -> list[WorkerEvent]:
        """The events queued since the last call (non-blocking; call it from the GUI's timer)."""
        events: list[WorkerEvent] = []
        while len(events) < max_events:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def cancel(self) -> None:
        """Ask the worker to stop (stdin line and stop file); kill its tree if it is still running after
        the grace period. Returns at once."""
        with self._lock:
            if self._process is None or self.cancel_requested:
                return
            self.cancel_requested = True
        if self.stop_file is not None:
            try:
                Path(self.stop_file).touch()
            except OSError:
                pass  # the stdin line and the kill still stop it
        try:
            self._process.stdin.write("cancel\n")
            self._process.stdin.flush()
        except (OSError, ValueError):
            pass  # the worker has closed its stdin or already exited
        self._watchdog = threading.Timer(self.grace_s, self._kill_if_running)
        self._watchdog.daemon = True
        self._watchdog.start()

    def kill(self) -> None:
        """End the worker's whole process tree now."""
        if self._process is None or self._process.poll() is not None:
            return
        self.killed = True
        kill_process_tree(self._process)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process has exited and its output is queued.

        Returns the return code, or None on timeout."""
        if self._process is None:
            return None
        if not self._exited.wait(timeout):
            return None
        return self._process.returncode

    def stop(self, timeout: float | None = None) -> int | None:
        """Cancel and block until the worker is gone (killed after ``timeout``, default the grace period)."""
        if self._process is None:
            return None
        self.cancel()
        if self.wait(self.grace_s if timeout is None else timeout) is None:
            self.kill()
        return self.wait(self.grace_s)

    def _kill_if_running(self) -> None:
        if not self._exited.is_set():
            self.kill()

    def _read(self, stream, to_event) -> None:
        for line in stream:
            if line.strip():
                self._events.put(to_event(line))
        stream.close()

    def _wait(self, readers: list[threading.Thread]) -> None:
        for reader in readers:
            reader.join()
        returncode = self._process.wait()
        try:
            self._process.stdin.close()
        except OSError:
            pass
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._events.put(WorkerEvent(EventKind.EXITED, returncode=returncode))
        self._exited.set()


def _log_event(line: str) -> WorkerEvent:
    return WorkerEvent(EventKind.LOG, text=line.rstrip("\r\n"))
