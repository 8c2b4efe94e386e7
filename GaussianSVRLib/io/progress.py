"""The JSON-lines progress protocol between the engine (worker) and its clients (the Slicer module).

With ``--progress json`` the engine prints exactly one JSON object per line on stdout; anything
else it has to say goes to stderr. Every message carries ``"v": PROTOCOL_VERSION`` and a ``"type"``:

- ``started``:    ``device``, ``n_stacks``, ``n_slices``, ``n_pixels``, ``n_gaussians``, ``total``
- ``progress``:   ``iter``, ``total``, ``loss``, ``eta_s``, ``elapsed_s``, ``stage``
- ``checkpoint``: ``iter``, ``volume`` (path), ``gaussians`` (path of the .npz), ``ellipsoids`` (.vtp)
- ``done``:       ``cancelled``, ``volume``, ``gaussians``, ``ellipsoids``, ``report``, ``qc`` (paths or
  null), ``elapsed_s``
- ``error``:      ``message``

Numbers that are not finite (a diverging loss) are sent as null. A client must reject messages whose
``v`` differs from its own PROTOCOL_VERSION, and treat lines that are not JSON objects as log text.
The worker stops between iterations when a line ``cancel`` arrives on its stdin, when its stdin (a
pipe) is closed, when the file named by ``--stop-file`` appears, or when its stdout is closed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import IO, Any

PROTOCOL_VERSION = 1
MESSAGE_TYPES = ("started", "progress", "checkpoint", "done", "error")


class ProtocolError(ValueError):
    """A line that claims to be a protocol message but is not a valid one."""


def finite(value: Any) -> Any:
    """The value with every non-finite float (NaN, infinities) replaced by None, in lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def encode(kind: str, **fields: Any) -> str:
    """One protocol message as a single line of JSON (no trailing newline); non-finite numbers are null."""
    if kind not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {kind!r}")
    message = finite({"v": PROTOCOL_VERSION, "type": kind, **fields})
    return json.dumps(message, allow_nan=False, default=str)


def decode(line: str) -> dict[str, Any] | None:
    """Parse one line of worker output.

    Returns the message dict, or None when the line is plain log text (not a JSON object).
    Raises ProtocolError for a JSON object with a missing or different version or an unknown type.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} from the worker, expected {PROTOCOL_VERSION}")
    if message.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {message.get('type')!r}")
    return message


class Emitter:
    """Writes protocol messages to a stream (stdout by default), flushing each line. Never raises: once
    the reader has gone (a closed pipe) it stops writing and calls ``on_closed`` once."""

    def __init__(self, stream: IO[str] | None = None, on_closed: Callable[[], None] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.on_closed = on_closed
        self.closed = False

    def __call__(self, kind: str, **fields: Any) -> None:
        if self.closed:
            return
        try:
            self.stream.write(encode(kind, **fields) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # BrokenPipeError, or a stream closed under us
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()
