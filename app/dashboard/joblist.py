"""The dashboard's in-memory copy of the jobs, and the rows each tab shows.

Lives in the polling worker, not the UI thread: it merges the rows that changed since the
last poll, and recomputes a tab's ordered, filtered, capped list only when something changed.
Cells that depend only on the job are cached per revision; only the time column is redone.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text

from app.dashboard.format import Cells, Row, job_cells, job_time, search_text
from app.models import Job, JobState

#: The tabs: id → (label, states shown; None = all).
VIEWS: dict[str, tuple[str, frozenset[JobState] | None]] = {
    "queue": ("Queue", frozenset({JobState.PENDING, JobState.UNSCHEDULABLE})),
    "running": ("Running", frozenset({JobState.RUNNING})),
    "done": ("Done", frozenset({JobState.COMPLETED})),
    "failed": ("Failed", frozenset({JobState.FAILED, JobState.KILLED, JobState.LOST})),
    "all": ("All", None),
}
#: Rows a tab shows at most; the rest are reached with `/` (the filter applies before the cap).
#: Rows a tab shows at most: bounds the sorting and diffing a tab switch does.
ROW_CAP = 500
#: Tab and filter selections kept for the current generation of the jobs.
SELECTIONS_KEPT = 16
TIME_COLUMN = 8


def view_count(view: str, counts: dict[str, int]) -> int:
    states = VIEWS[view][1]
    if states is None:
        return sum(counts.values())
    return sum(counts.get(s.value, 0) for s in states)


def _order(view: str, job: Job) -> tuple[float, ...]:
    if view == "queue":  # the order the allocator walks the queue in
        return (job.status != JobState.PENDING, job.priority, job.seq, job.id)
    if view == "running":
        return (job.started_at or 0.0, job.id)
    if view in ("done", "failed"):  # most recent first
        return (-(job.ended_at or 0.0), -job.id)
    return (-job.id,)


def _placement(job: Job) -> tuple[object, ...]:
    """What decides whether and where a job appears in a tab (ordering and filter)."""
    return (job.status, job.priority, job.seq, job.queued_at, job.started_at, job.ended_at,
            job.args, job.reason, job.session)  # fmt: skip


@dataclass(frozen=True)
class Page:
    rows: tuple[Row, ...]
    matching: int
    """Jobs in this tab that match the filter; more than len(rows) when capped."""


class JobList:
    def __init__(self, cap: int = ROW_CAP) -> None:
        self.cap = cap
        self.jobs: dict[int, Job] = {}
        self._cells: dict[int, tuple[int, Cells]] = {}
        self._search: dict[int, tuple[int, str]] = {}
        #: (tab, filter text) -> its first `cap` jobs in order and how many match, for the
        #: current generation (a few tabs and filters, so switching back costs nothing).
        self._selections: dict[tuple[str, str], tuple[list[Job], int]] = {}
        self._selected_at = 0
        self._generation = 0
        self._lock = threading.Lock()

    def merge(self, changed: Iterable[Job]) -> None:
        with self._lock:
            for job in changed:
                old = self.jobs.get(job.id)
                self.jobs[job.id] = job
                # Re-select a tab only when a job may enter, leave or move in it; other
                # changes (a new pid, a reason) reach the rows through page() below.
                if old is None or _placement(old) != _placement(job):
                    self._generation += 1

    def page(self, view: str, text: str, now: float) -> Page:
        with self._lock:
            visible, matching = self._selection(view, text)
            rows = tuple(self._row(self.jobs[job.id], now) for job in visible)
            return Page(rows, matching)

    def warm(self, now: float) -> None:
        """Select every tab's first page and render the cells of its jobs, ahead of a switch.

        Runs in the polling worker after each poll, so a tab switch in the UI thread finds its
        rows selected and rendered (only the time column is then redone). Cheap when nothing
        changed: selections are kept per generation and cells per revision."""
        for view in VIEWS:
            with self._lock:  # one tab at a time: page() in the UI thread never waits long
                visible, _ = self._selection(view, "")
                for job in visible:
                    current = self.jobs[job.id]
                    cached = self._cells.get(job.id)
                    if cached is None or cached[0] != current.rev:
                        self._cells[job.id] = (current.rev, job_cells(current, now))

    def _selection(self, view: str, text: str) -> tuple[list[Job], int]:
        if self._selected_at != self._generation:
            self._selections.clear()
            self._selected_at = self._generation
        key = (view, text.strip().lower())
        found = self._selections.get(key)
        if found is None:
            if len(self._selections) >= SELECTIONS_KEPT:
                self._selections.pop(next(iter(self._selections)))  # the oldest
            found = self._selections[key] = self._select(*key)
        return found

    def _select(self, view: str, text: str) -> tuple[list[Job], int]:
        states = VIEWS[view][1]
        jobs = [j for j in self.jobs.values() if states is None or j.status in states]
        if text:
            jobs = [j for j in jobs if text in self._text(j)]
        # The first `cap` in order without sorting them all (10,000 pending: ~3x faster).
        first = heapq.nsmallest(self.cap, jobs, key=lambda j: _order(view, j))
        return first, len(jobs)

    def _text(self, job: Job) -> str:
        cached = self._search.get(job.id)
        if cached is None or cached[0] != job.rev:
            cached = (job.rev, search_text(job))
            self._search[job.id] = cached
        return cached[1]

    def _row(self, job: Job, now: float) -> Row:
        cached = self._cells.get(job.id)
        if cached is None or cached[0] != job.rev:
            cached = (job.rev, job_cells(job, now))
            self._cells[job.id] = cached
        cells = cached[1]
        when = job_time(job, now)
        if cells[TIME_COLUMN].plain != when:
            cells = (*cells[:TIME_COLUMN], Text(when), *cells[TIME_COLUMN + 1 :])
            self._cells[job.id] = (job.rev, cells)
        return str(job.id), cells
