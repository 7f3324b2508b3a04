"""Keeps Python's garbage collector off the UI thread's critical path.

A full (generation 2) collection walks every object the process tracks: Textual's widgets,
Rich's caches and thousands of job rows. In bench/dashboard.py that took 70-90 ms on the UI
thread every few seconds and made the slow keys of the p95. Almost all of those objects are
long-lived and freed by reference counting, so after each poll the heap is frozen
(`gc.freeze`, which is O(1)): automatic collections then only walk what was created since.

Freezing keeps cyclic garbage from being collected, so the young generations are collected
just before each freeze (about a millisecond), and every `full_every` seconds the heap is
unfrozen and collected in full once, which bounds what can pile up to what a dashboard
leaves behind in that time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


class HeapKeeper:
    def __init__(
        self, full_every: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.full_every = full_every
        self.clock = clock
        self.last_full: float | None = None
        self.full_collections = 0

    def after_poll(self) -> None:
        """Call on the UI thread after a poll's rows are shown."""
        now = self.clock()
        if self.last_full is None or now - self.last_full >= self.full_every:
            gc.unfreeze()
            gc.collect()
            self.last_full = now
            self.full_collections += 1
        else:
            gc.collect(1)
        gc.freeze()
