"""Decide which queued jobs start on which GPUs, and say why the others wait.

`allocate` is pure (no I/O, no clock) so the daemon, `status` and the simulator all get the same
answer from the same inputs. It walks the queue once in (priority, seq) order against a working
ledger; reasons are computed once per job class and ledger state, so a long queue stays cheap.

How jobs share a GPU depends on `Policy.mode` (the per-GPU rules live in app.allocator_rules):

- `share` (default): the fractional ledger; a GPU takes a job while our shares on it stay <= 1.0.
- `exclusive`: one job per GPU at a time: a fractional requirement counts as one whole GPU
  (share 1.0), N-GPU jobs still take N whole GPUs.
- `memory`: GPUs are shared by declared memory and the fractional share is ignored. A job with
  `vram_mb` fits a GPU if the declared memory of our jobs there (an undeclared job counts as the
  whole GPU) plus its own stays within the GPU's total minus what other processes use. A job
  without a declaration needs a GPU with none of our jobs on it. Placements report vram_mb / total
  of the smallest chosen GPU as their share (1.0 when undeclared), for display.
- `detected`: by free memory as the probe reports it (plus ramp-up reservations). A job needs
  `vram_mb` free if declared, else `min_free_mem_mb` if set, else its share of the GPU's memory.
  No share ledger: jobs stack on a GPU as its memory allows. Jobs placed in this call always
  reserve their memory for the rest of the call (the probe predates them), whatever their ramp-up.
- Multi-GPU jobs need N GPUs with nothing of ours on them, in every mode (share 1.0 each, except
  declared jobs in memory mode, whose declared memory later single-GPU jobs may share around).

Which GPU a one-GPU job gets among those it fits on is `Policy.placement`: `pack` (default, best
fit: the fullest as the mode counts it, keeping empty GPUs free for multi-GPU jobs), `first-fit`
(the lowest-indexed) or `spread` (the emptiest); ties go to the lowest index. Multi-GPU jobs take
the lowest-indexed GPUs that qualify under every placement.

In every mode: paused GPUs, GPUs held for a starving job, `mem_threshold` (memory of other
processes) and `load_threshold` (on GPUs without our jobs) keep a GPU off; so do `min_free_mem_mb`
(free memory = total - used - reservations, below it), a declared `vram_mb` above the free memory,
and `max_vram` (used + reservations + this job's expected memory above that fraction of the
total). A job's expected memory is its `vram_mb`, else its share (as the mode counts it) of the
GPU's total.

Ramp-up: a running job counts as ramping while now - started_at is below its own `ramp_up_s`, or
the policy's when it has none; a job placed in this call ramps if that ramp-up is above 0.
Ramping jobs' expected GPU memory counts as used and, with a `host` snapshot, their declared
`ram_mb` counts as used host RAM (jobs placed in this call always count theirs for the rest of
the call).

Host RAM (only with `host`; jobs without `ram_mb` ignore it): a job with `ram_mb` waits unless it
fits in the available RAM minus those reservations and, with `max_ram`, unless used + reserved +
ram_mb stays within max_ram × total. `max_workers` caps our running jobs (those running plus those
placed in this call). A job waiting for RAM or for a worker slot holds no GPUs.

A job is unschedulable (for good) when no allowed GPU exists, it needs more GPUs than allowed, its
`vram_mb` is above every allowed GPU's total, its expected memory is above `max_vram` of every
allowed GPU, or its `ram_mb` is above the host's total RAM or `max_ram` of it. Policy-wide limits
alone (`min_free_mem_mb`, `max_workers`) only make jobs wait.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter

from app.allocator_ledger import Ledger
from app.allocator_rules import (
    Need,
    group,
    ids,
    never_fits,
    ram_problem,
    wait_reason,
)
from app.models import (
    AllocationResult,
    GpuSnapshot,
    HostSnapshot,
    Placement,
    Policy,
    QueuedJob,
    Requirement,
    RunningJob,
)

#: (amount, declared vram, declared ram, normalised allowed GPUs): jobs of one class get the same
#: answer (a job's own ramp-up changes what it reserves once placed, not whether it fits).
_ClassKey = tuple[float, int | None, int | None, tuple[int, ...] | None]
_Issue = tuple[int, str]
#: The order jobs are considered in: priority, then first come first served.
QUEUE_ORDER = attrgetter("priority", "seq", "id")
#: (amount, declared vram, declared ram, allowed GPUs as written)
_RawKey = tuple[float, int | None, int | None, tuple[int, ...] | None]


def allocate(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuSnapshot] | None,
    running: Sequence[RunningJob],
    paused: frozenset[int] | set[int],
    policy: Policy,
    now: float,
    probe_error: str = "",
    host: HostSnapshot | None = None,
    ordered: bool = False,
) -> AllocationResult:
    """Place what fits now; every other queued job gets a reason or is unschedulable.

    `ordered`: the caller keeps `queue` sorted by (priority, seq, id) already (the daemon's
    pending queue is sorted once when it changes, not on every pass)."""
    result = AllocationResult()
    if gpus is None:
        # Without a probe we cannot tell free from busy, and a wrong guess would oversubscribe.
        reason = f"GPUs unknown: {probe_error}" if probe_error else "GPUs unknown"
        for job in queue:
            result.reasons[job.id] = reason
        return result
    ledger = Ledger(gpus, running, frozenset(paused), policy, now, host)
    _Pass(ledger, result).run(list(queue) if ordered else sorted(queue, key=QUEUE_ORDER))
    return result


class _Pass:
    """One walk over the sorted queue, with per-class caches so 10,000 jobs stay cheap."""

    def __init__(self, ledger: Ledger, result: AllocationResult) -> None:
        self.ledger = ledger
        self.result = result
        #: (amount, vram, ram, allowed GPUs as written) -> its class, worked out once
        self.classes: dict[
            tuple[float, int | None, int | None, tuple[int, ...] | None],
            tuple[_ClassKey, Need, str | None, tuple[int, ...]],
        ] = {}
        #: class -> (reason, GPUs to blame (not RAM), version it was worked out at): still true
        #: while none of the class's GPUs (and, for RAM, the reserved RAM) changed since.
        self.waits: dict[_ClassKey, tuple[str, bool, int]] = {}
        self.blocked_by: int | None = None  # first blocked job, when backfill is off
        self.grouped: dict[tuple[_Issue, ...], str] = {}
        self.max_workers = ledger.policy.max_workers
        self.workers_reason = f"max workers ({self.max_workers}) running"

    def run(self, jobs: list[QueuedJob]) -> None:
        """Answer every job as visiting them one by one in order would, visiting few.

        Between two changes to the ledger a job's answer is its class's cached one, so only
        the jobs that may change something are visited: the first of each class, the first
        after a change to its class's GPUs (or RAM), and starving jobs (they may hold GPUs).
        The jobs in between get their class's answer in bulk: with 10,000 waiting jobs of a
        few classes, a pass visits a few dozen.
        """
        ids = [job.id for job in jobs]
        if len(set(ids)) != len(ids):  # a duplicated id is answered once, at its first place
            first: dict[int, QueuedJob] = {}
            for job in jobs:
                first.setdefault(job.id, job)
            jobs = list(first.values())
            ids = [job.id for job in jobs]
        # (Comprehensions, not one loop: this is the part of a pass that is per job.)
        index: dict[_RawKey, int] = {}
        add = index.setdefault
        classes = [
            add((j.requirement.amount, j.requirement.vram_mb, j.requirement.ram_mb,
                 j.allowed_gpus), len(index))
            for j in jobs
        ]  # fmt: skip
        where: list[list[int]] = [[] for _ in index]  # class -> positions of its jobs
        for pos, c in enumerate(classes):
            where[c].append(pos)
        # Jobs that must be visited: the first of each class, and the starving ones.
        now, starvation_s = self.ledger.now, self.ledger.policy.starvation_s
        events = [(positions[0], c) for c, positions in enumerate(where)]
        events += [
            (pos, classes[pos])
            for pos, job in enumerate(jobs)
            if now - job.waiting_since >= starvation_s
        ]
        _Walk(self, jobs, ids, where).run(index, events)

    def visit(self, job: QueuedJob) -> None:
        req, ledger = job.requirement, self.ledger
        raw = (req.amount, req.vram_mb, req.ram_mb, job.allowed_gpus)
        known = self.classes.get(raw)
        if known is None:
            known = self.classes[raw] = self.classify(req, job.allowed_gpus)
        key, need, never, cands = known
        if never is not None:
            self.result.unschedulable[job.id] = never
            return
        if self.max_workers is not None and ledger.workers >= self.max_workers:
            # Nothing more starts in this call, so order holds without blocking anyone.
            self.result.reasons[job.id] = self.workers_reason
            return
        if self.blocked_by is not None:
            self.result.reasons[job.id] = f"behind job {self.blocked_by}"
            return
        cached = self.waits.get(key)
        if cached is not None:
            reason, gpus, at = cached
            if not ledger.unchanged(cands, at) or (not gpus and ledger.ram_changed > at):
                cached = None
        if cached is None:
            ok, issues = ledger.check(need, cands)
            chosen = ledger.choose(ok, need)
            if chosen is None:
                reason, gpus = wait_reason(need, ledger.policy, len(ok), self.group(issues)), True
            else:
                short = ram_problem(need.ram_mb, ledger.host, ledger.ram_reserved, ledger.policy)
                if short is None:
                    share = need.placement_share([ledger.gpus[g] for g in chosen])
                    ledger.place(chosen, need, share, req.ramp_up_s)
                    self.result.placements.append(Placement(job.id, chosen, share))
                    return
                reason, gpus = short, False
            self.waits[key] = (reason, gpus, ledger.version)
        self.blocked(job, cands, reason, gpus)

    def classify(
        self, req: Requirement, allowed: tuple[int, ...] | None
    ) -> tuple[_ClassKey, Need, str | None, tuple[int, ...]]:
        """A job's class: its key, need, why it never fits (None if it may) and its GPUs."""
        ledger = self.ledger
        allowed_key = None if allowed is None else tuple(sorted(set(allowed)))
        key: _ClassKey = (req.amount, req.vram_mb, req.ram_mb, allowed_key)
        cands = ledger.allowed(allowed_key)
        need = Need.of(req, ledger.mode)
        never = never_fits(need, allowed_key, cands, ledger.gpus, ledger.policy, ledger.host)
        return key, need, never, cands

    def group(self, issues: list[_Issue]) -> str:
        """`group`'s text, worked out once per distinct list of problems."""
        frozen = tuple(issues)
        text = self.grouped.get(frozen)
        if text is None:
            text = self.grouped[frozen] = group(issues)
        return text

    def blocked(self, job: QueuedJob, cands: tuple[int, ...], reason: str, gpus: bool) -> None:
        """Record why job waits; a starving job held up by GPUs (not RAM) gets GPUs held."""
        policy = self.ledger.policy
        if gpus and self.ledger.now - job.waiting_since >= policy.starvation_s:
            held = self.ledger.hold(job, cands)
            if held:
                reason += f"; {ids(held)} held for it"
        if not policy.backfill:
            self.blocked_by = job.id
        self.result.reasons[job.id] = reason


class _Walk:
    """`_Pass.run`'s bookkeeping: which jobs to visit next, and the answers of the others."""

    def __init__(
        self, walker: _Pass, jobs: list[QueuedJob], ids: list[int], where: list[list[int]]
    ) -> None:
        self.p = walker
        self.jobs = jobs
        self.ids = ids  # position -> job id
        self.where = where  # class -> positions of its jobs, ascending
        self.next = [0] * len(where)  # class -> index of its first job not answered yet
        self.known: list[tuple[_ClassKey, Need, str | None, tuple[int, ...]]] = []
        self.by_gpu: dict[int, list[int]] = {g: [] for g in walker.ledger.ids}
        #: classes whose next job is queued in `events` to be visited: their answer may change
        self.scheduled: set[int] = set()

    def run(self, index: dict[_RawKey, int], events: list[tuple[int, int]]) -> None:
        p, ledger = self.p, self.p.ledger
        for raw, c in index.items():
            known = p.classes.get(raw)
            if known is None:
                req = self.jobs[self.where[c][0]].requirement
                known = p.classes[raw] = p.classify(req, raw[3])
            self.known.append(known)
            never = known[2]
            if never is not None:  # answered for good, in bulk
                p.result.unschedulable.update(
                    zip(map(self.ids.__getitem__, self.where[c]), repeat(never))
                )
                self.next[c] = len(self.where[c])
                continue
            self.scheduled.add(c)
            for g in known[3]:
                self.by_gpu[g].append(c)
        heapq.heapify(events)
        while events:
            pos, c = heapq.heappop(events)
            where, first = self.where[c], self.next[c]
            if first >= len(where) or pos < where[first]:
                continue  # answered already
            at = bisect.bisect_left(where, pos, first)
            self.answer(c, at)  # its jobs before this one: the class's answer still held
            version, ram = ledger.version, ledger.ram_changed
            p.visit(self.jobs[pos])
            self.next[c] = at + 1
            self.scheduled.discard(c)
            workers_full = p.max_workers is not None and ledger.workers >= p.max_workers
            if workers_full or p.blocked_by is not None:
                # Nothing starts after this: every later job gets the same answer.
                self.settle(pos)
                reason = p.workers_reason if workers_full else f"behind job {p.blocked_by}"
                for other in range(len(self.where)):
                    self.answer(other, len(self.where[other]), reason)
                return
            if ledger.version != version:
                self.recheck(pos, version, ledger.ram_changed != ram, events)
        self.settle(len(self.jobs))

    def recheck(self, pos: int, version: int, ram: bool, events: list[tuple[int, int]]) -> None:
        """After the job at `pos` changed the ledger: classes whose answer no longer holds get
        their jobs up to `pos` answered, and their next job visited."""
        changed = self.p.ledger.changed
        if ram:  # a class waiting for RAM may fit now whatever its GPUs: check them all
            affected: set[int] = set(range(len(self.where)))
        else:
            affected = {c for g, v in changed.items() if v > version for c in self.by_gpu[g]}
        for c in sorted(affected):
            where = self.where[c]
            if c in self.scheduled or self.next[c] >= len(where) or self.holds(c):
                continue
            stop = bisect.bisect_right(where, pos, self.next[c])
            self.answer(c, stop)
            if stop < len(where):
                heapq.heappush(events, (where[stop], c))
                self.scheduled.add(c)

    def holds(self, c: int) -> bool:
        """Whether the class's cached answer still holds (the test `_Pass.visit` makes)."""
        key, _, _, cands = self.known[c]
        cached = self.p.waits.get(key)
        if cached is None:
            return False
        _, gpus, at = cached
        ledger = self.p.ledger
        return ledger.unchanged(cands, at) and (gpus or ledger.ram_changed <= at)

    def settle(self, pos: int) -> None:
        """Classes not waiting to be visited: their jobs before `pos` get the cached answer."""
        for c, where in enumerate(self.where):
            if c not in self.scheduled and self.next[c] < len(where):
                self.answer(c, bisect.bisect_left(where, pos, self.next[c]))

    def answer(self, c: int, stop: int, reason: str | None = None) -> None:
        """The class's jobs from its next up to `stop` get `reason` (default: its cached one)."""
        start = self.next[c]
        if stop <= start:
            return
        if reason is None:
            reason = self.p.waits[self.known[c][0]][0]
        job_ids = map(self.ids.__getitem__, self.where[c][start:stop])
        self.p.result.reasons.update(zip(job_ids, repeat(reason)))
        self.next[c] = stop
