"""Where a run's time goes: named sections of the optimization summed over the run (its profile).

One profile per process (``PROFILE``), reset when an optimization starts and reported with the run's
timings: a section is a ``with PROFILE.section(name):`` block; sections may nest (the kernels' time
inside the forward pass). On a GPU the clock only sees the time to queue the work unless
``GAUSSIANSVR_PROFILE_SYNC=1`` makes every section wait for the device (slower, for benchmarks).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Profile:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.synchronize: Callable[[], None] | None = None

    def reset(self, synchronize: Callable[[], None] | None = None) -> None:
        """Start over; ``synchronize`` waits for the device (used when GAUSSIANSVR_PROFILE_SYNC is set)."""
        self.seconds.clear()
        self.calls.clear()
        self.synchronize = synchronize if os.environ.get("GAUSSIANSVR_PROFILE_SYNC") == "1" else None

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def as_dict(self) -> dict[str, float]:
        """Seconds per section, rounded to the millisecond."""
        return {name: round(seconds, 3) for name, seconds in sorted(self.seconds.items())}


PROFILE = Profile()
