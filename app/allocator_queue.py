"""The allocator's queue, prepared once per change of the pending jobs.

Sorting 10,000 jobs and grouping them by class cost more than the rest of a pass, and the
daemon's queue is the same from one pass to the next until a job is added, started or removed
(app/pending.py), so that work is done here, once, and every pass reuses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import attrgetter

from app.models import QueuedJob

#: The order jobs are considered in: priority, then first come first served.
QUEUE_ORDER = attrgetter("priority", "seq", "id")
#: `QueuedJob.klass`: (amount, declared vram, declared ram, allowed GPUs as written)
ClassKey = tuple[float, int | None, int | None, tuple[int, ...] | None]


class PreparedQueue:
    """Jobs in queue order (the first of each id only), grouped by class."""

    def __init__(self, queue: Iterable[QueuedJob], ordered: bool = False) -> None:
        jobs = list(queue) if ordered else sorted(queue, key=QUEUE_ORDER)
        ids = [job.id for job in jobs]
        if len(set(ids)) != len(ids):  # a duplicated id is answered once, at its first place
            first: dict[int, QueuedJob] = {}
            for job in jobs:
                first.setdefault(job.id, job)
            jobs = list(first.values())
            ids = [job.id for job in jobs]
        self.jobs = jobs
        self.ids = ids  # position -> job id
        #: class -> its number; numbered in order of first appearance in the queue
        self.index: dict[ClassKey, int] = {}
        add = self.index.setdefault
        classes = [add(job.klass, len(self.index)) for job in jobs]
        #: class -> the positions of its jobs, ascending
        self.where: list[list[int]] = [[] for _ in self.index]
        for pos, c in enumerate(classes):
            self.where[c].append(pos)
        #: class -> when each of its jobs started waiting (as `where`), and the earliest
        self.waiting: list[list[float]] = [
            [jobs[pos].waiting_since for pos in where] for where in self.where
        ]
        self.oldest = [min(waiting) for waiting in self.waiting]
        self.needs_ram = any(key[2] is not None for key in self.index)

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[QueuedJob]:
        return iter(self.jobs)
