"""One allocator pass over the queue: `Pass` answers one job at a time, `Walk` decides which
jobs it must visit and gives the others their class's answer in bulk.

Between two changes to the ledger a job's answer is its class's cached one, so only the jobs
that may change something are visited: the first of each class, the first after a change to
its class's GPUs (or RAM), and the first starving job of a class since then (a starving job
may hold GPUs; the next ones of its class hit the hold cache and change nothing). The others
get their class's answer in bulk: with 10,000 waiting jobs of a few classes, a pass visits a
few dozen. tests/test_allocator_walk.py checks the answers equal visiting every job.
"""

from __future__ import annotations

import bisect
import heapq
from itertools import repeat

from app.allocator_ledger import Issue, Ledger
from app.allocator_queue import PreparedQueue
from app.allocator_rules import Need, group, ids, never_fits, ram_problem, wait_reason
from app.models import AllocationResult, Placement, QueuedJob, Requirement

#: (amount, declared vram, declared ram, normalised allowed GPUs): jobs of one class get the same
#: answer (a job's own ramp-up changes what it reserves once placed, not whether it fits).
_Norm = tuple[float, int | None, int | None, tuple[int, ...] | None]
_Known = tuple[_Norm, Need, str | None, tuple[int, ...]]


class Pass:
    """One walk over the sorted queue, with per-class caches so 10,000 jobs stay cheap."""

    def __init__(self, ledger: Ledger, result: AllocationResult) -> None:
        self.ledger = ledger
        self.result = result
        #: (amount, vram, ram, allowed GPUs as written) -> its class, worked out once
        self.classes: dict[
            tuple[float, int | None, int | None, tuple[int, ...] | None],
            tuple[_Norm, Need, str | None, tuple[int, ...]],
        ] = {}
        #: class -> (reason, GPUs to blame (not RAM), version it was worked out at): still true
        #: while none of the class's GPUs (and, for RAM, the reserved RAM) changed since.
        self.waits: dict[_Norm, tuple[str, bool, int]] = {}
        self.blocked_by: int | None = None  # first blocked job, when backfill is off
        self.grouped: dict[tuple[Issue, ...], str] = {}
        self.max_workers = ledger.policy.max_workers
        self.workers_reason = f"max workers ({self.max_workers}) running"

    def run(self, queue: PreparedQueue) -> None:
        """Answer every job as visiting them one by one in order would (`visit`), visiting
        few: see `Walk`."""
        Walk(self, queue).run()

    def visit(self, job: QueuedJob) -> None:
        req, ledger, raw = job.requirement, self.ledger, job.klass
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
    ) -> tuple[_Norm, Need, str | None, tuple[int, ...]]:
        """A job's class: its key, need, why it never fits (None if it may) and its GPUs."""
        ledger = self.ledger
        allowed_key = None if allowed is None else tuple(sorted(set(allowed)))
        key: _Norm = (req.amount, req.vram_mb, req.ram_mb, allowed_key)
        cands = ledger.allowed(allowed_key)
        need = Need.of(req, ledger.mode)
        never = never_fits(need, allowed_key, cands, ledger.gpus, ledger.policy, ledger.host)
        return key, need, never, cands

    def group(self, issues: list[Issue]) -> str:
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


class Walk:
    """`Pass.run`'s bookkeeping: which jobs to visit next, and the answers of the others.

    A class is *scheduled* when its cached answer may be stale: its next job is visited. A
    class that is not scheduled has a valid answer; its next event is its first starving job,
    unless one was visited since the answer was made (`starved`): then nothing until a change.
    """

    def __init__(self, walker: Pass, queue: PreparedQueue) -> None:
        self.p = walker
        self.q = queue
        self.where = queue.where  # class -> positions of its jobs, ascending
        count = len(self.where)
        self.next = [0] * count  # class -> index (in where[c]) of its first job not answered
        self.known: list[_Known] = []
        self.by_gpu: dict[int, list[int]] = {g: [] for g in walker.ledger.ids}
        self.scheduled: set[int] = set()
        self.starved = [False] * count
        self.starving: list[list[int]] = [[] for _ in range(count)]  # positions, ascending
        self.event_at: list[int | None] = [None] * count  # the one live event of each class
        self.events: list[tuple[int, int]] = []  # (position, class), a heap

    def run(self) -> None:
        p, ledger, q = self.p, self.p.ledger, self.q
        now, starvation_s = ledger.now, ledger.policy.starvation_s
        for raw, c in q.index.items():
            known = p.classes.get(raw)
            if known is None:
                known = p.classes[raw] = p.classify(q.jobs[self.where[c][0]].requirement, raw[3])
            self.known.append(known)
            never = known[2]
            if never is not None:  # answered for good, in bulk
                p.result.unschedulable.update(
                    zip(map(q.ids.__getitem__, self.where[c]), repeat(never))
                )
                self.next[c] = len(self.where[c])
                continue
            for g in known[3]:
                self.by_gpu[g].append(c)
            if now - q.oldest[c] >= starvation_s:  # else none of its jobs is starving
                self.starving[c] = [
                    pos for pos, since in zip(self.where[c], q.waiting[c], strict=True)
                    if now - since >= starvation_s
                ]  # fmt: skip
            self.schedule(c, self.where[c][0])
        events = self.events
        while events:
            pos, c = heapq.heappop(events)
            if self.event_at[c] != pos:
                continue  # replaced by a later event of its class
            self.event_at[c] = None
            where, first = self.where[c], self.next[c]
            at = bisect.bisect_left(where, pos, first)
            self.answer(c, at)  # its jobs before this one: the class's answer still held
            version, ram = ledger.version, ledger.ram_changed
            job = q.jobs[pos]
            p.visit(job)
            self.next[c] = at + 1
            was_scheduled = c in self.scheduled
            self.scheduled.discard(c)
            starving = now - job.waiting_since >= starvation_s
            self.starved[c] = starving or (self.starved[c] and not was_scheduled)
            workers_full = p.max_workers is not None and ledger.workers >= p.max_workers
            if workers_full or p.blocked_by is not None:
                # Nothing starts after this: every later job gets the same answer.
                self.settle(pos)
                reason = p.workers_reason if workers_full else f"behind job {p.blocked_by}"
                for other in range(len(self.where)):
                    self.answer(other, len(self.where[other]), reason)
                return
            if ledger.version != version:
                self.recheck(pos, version, ledger.ram_changed != ram)
            if c not in self.scheduled:
                self.watch_starving(c)
        self.settle(len(q.jobs))

    def schedule(self, c: int, pos: int) -> None:
        """Visit class c's job at `pos` next: the class's answer may have changed."""
        self.scheduled.add(c)
        self.starved[c] = False
        self.event_at[c] = pos
        heapq.heappush(self.events, (pos, c))

    def watch_starving(self, c: int) -> None:
        """A class with a valid answer: its next starving job is visited, if none was yet."""
        self.event_at[c] = None
        where, first = self.where[c], self.next[c]
        if self.starved[c] or first >= len(where):
            return
        starving = self.starving[c]
        at = bisect.bisect_left(starving, where[first])
        if at < len(starving):
            self.event_at[c] = starving[at]
            heapq.heappush(self.events, (starving[at], c))

    def recheck(self, pos: int, version: int, ram: bool) -> None:
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
                self.schedule(c, where[stop])
            else:
                self.event_at[c] = None

    def holds(self, c: int) -> bool:
        """Whether the class's cached answer still holds (the test `Pass.visit` makes)."""
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
        job_ids = map(self.q.ids.__getitem__, self.where[c][start:stop])
        self.p.result.reasons.update(zip(job_ids, repeat(reason)))
        self.next[c] = stop
