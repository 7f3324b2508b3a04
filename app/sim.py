"""Replay a trace on a virtual clock through the daemon's own allocator (`app.allocator.allocate`).

Events are arrivals (in submission order) and finishes (a heap). At each event time every finish
and arrival due is applied, then `allocate` makes one pass, as the daemon's next tick would: the
pending queue as `QueuedJob`s (`waiting_since` = submit time, `seq` = submission order), running
jobs as `RunningJob`s, and one synthetic `GpuSnapshot` per GPU whose used memory is what our
running jobs take (declared memory, else their share of the GPU) and whose utilisation is our
share, so thresholds never mistake our own jobs for someone else's. `ramp_up_s` is 0: the
synthetic probe sees a job's memory from its start, so a reservation would count it twice.

Why passes at event times only give the daemon's schedule: between events nothing frees up, and
waiting longer only adds starvation holds, which only block. A second pass right after one that
started jobs starts nothing either: every job it sees waited in the first pass against a ledger
that was no fuller, and each starving job holds the same GPUs again (its least-filled GPUs were
held, so nothing landed on them, and the others only filled up). So without a finish, only a new
arrival with no older job of its class ahead of it could start, and the pass is skipped
otherwise; it is also skipped when no class has room anywhere.

A long queue is not passed whole (that would make the run O(jobs²)): per job class, only its first
jobs in queue order (as many as could possibly start from the free capacity, one more without
backfill) and its first starving job after them. Placement conditions only tighten during a pass,
so the rest would only be told to wait, and a later starving job of a class holds nothing its
first one did not. `simulate(..., prune=False)` passes the whole queue at every event, repeating
until a pass starts nothing, and gives the same schedule (tests/test_sim.py checks it).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from app.allocator import allocate
from app.models import (
    PLACEMENTS,
    AllocationResult,
    GpuSnapshot,
    Policy,
    QueuedJob,
    Requirement,
    RunningJob,
)
from app.sim_trace import TraceJob

#: The standard set `--compare` runs: each placement, and exclusive mode, with and without backfill.
POLICY_NAMES = (
    "pack",
    "pack-nobackfill",
    "first-fit",
    "first-fit-nobackfill",
    "spread",
    "spread-nobackfill",
    "exclusive",
    "exclusive-nobackfill",
)
DEFAULT_GPU_MEM_GB = 80.0

#: A job class as the allocator groups them: jobs of one class get the same answer.
_Key = tuple[Requirement, tuple[int, ...] | None]


def make_policy(name: str, mode: str = "share", starvation_s: float = 300.0) -> Policy:
    """`pack`, `first-fit`, `spread` (in `mode`) or `exclusive`, each optionally `-nobackfill`."""
    base = name.removesuffix("-nobackfill")
    backfill = base == name
    if base == "exclusive":
        return Policy(ramp_up_s=0.0, starvation_s=starvation_s, backfill=backfill, mode=base)
    if base not in PLACEMENTS:
        raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICY_NAMES)})")
    return Policy(
        ramp_up_s=0.0, starvation_s=starvation_s, backfill=backfill, placement=base, mode=mode
    )


class SimulationStuckError(RuntimeError):
    """Jobs wait, nothing runs, nothing starts and nothing more arrives."""


@dataclass(frozen=True)
class Run:
    job_id: int
    start: float
    end: float
    gpus: tuple[int, ...]


@dataclass
class SimResult:
    policy: str
    gpus: int
    runs: dict[int, Run] = field(default_factory=dict)
    #: job id -> why it can never run here (left out of every metric)
    unschedulable: dict[int, str] = field(default_factory=dict)
    makespan: float = 0.0
    lower_bound: float = 0.0
    ratio: float = 1.0
    utilization: float = 0.0
    mean_wait: float = 0.0
    p95_wait: float = 0.0
    max_wait: float = 0.0
    allocate_calls: int = 0

    def summary(self) -> dict[str, object]:
        """The `--json` object."""
        return {
            "policy": self.policy,
            "makespan": round(self.makespan, 3),
            "lower_bound": round(self.lower_bound, 3),
            "ratio": round(self.ratio, 6),
            "utilization": round(self.utilization, 6),
            "mean_wait": round(self.mean_wait, 3),
            "p95_wait": round(self.p95_wait, 3),
            "max_wait": round(self.max_wait, 3),
            "gpus": self.gpus,
            "jobs": len(self.runs),
            "unschedulable": len(self.unschedulable),
        }


def lower_bound(jobs: Sequence[TraceJob], gpus: int) -> float:
    """No schedule ends before all work is spread over every GPU, nor before any job's earliest
    possible end: max(total GPU-seconds / GPUs, max(submit_at + duration))."""
    if not jobs:
        return 0.0
    work = sum(job.work for job in jobs) / gpus
    return max(work, *(job.submit_at + job.duration for job in jobs))


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def simulate(
    jobs: Sequence[TraceJob],
    gpus: int,
    policy: Policy,
    *,
    name: str = "",
    gpu_mem_gb: float = DEFAULT_GPU_MEM_GB,
    prune: bool = True,
) -> SimResult:
    """Run the trace on `gpus` identical GPUs of `gpu_mem_gb` under `policy`; raises
    SimulationStuckError rather than loop when waiting jobs can never start."""
    if gpus < 1:
        raise ValueError("a simulation needs at least 1 GPU")
    sim = _Sim(jobs, gpus, dataclasses.replace(policy, ramp_up_s=0.0), gpu_mem_gb, prune)
    result = SimResult(policy=name or policy.placement, gpus=gpus)
    sim.run(result)
    done = [j for j in jobs if j.id in result.runs]
    result.makespan = max((r.end for r in result.runs.values()), default=0.0)
    result.lower_bound = lower_bound(done, gpus)
    if result.lower_bound > 0:
        result.ratio = result.makespan / result.lower_bound
        result.utilization = sum(j.work for j in done) / (gpus * result.makespan)
    waits = [result.runs[j.id].start - j.submit_at for j in done]
    if waits:
        result.mean_wait = sum(waits) / len(waits)
        result.p95_wait, result.max_wait = p95(waits), max(waits)
    return result


class _Sim:
    def __init__(
        self, jobs: Sequence[TraceJob], gpus: int, policy: Policy, mem_gb: float, prune: bool
    ) -> None:
        self.order = sorted(jobs, key=attrgetter("submit_at", "id"))
        self.gpus, self.policy, self.prune = gpus, policy, prune
        self.total = max(1, int(mem_gb * 1024))
        self.share = [0.0] * gpus  # our shares per GPU
        self.used = [0.0] * gpus  # memory our jobs take per GPU (MB)
        self.count = [0] * gpus  # our jobs per GPU
        self.running: dict[int, RunningJob] = {}
        self.finishes: list[tuple[float, int]] = []
        self.levels: dict[_Key, dict[int, list[QueuedJob]]] = {}  # class -> priority -> jobs
        self.never: dict[_Key, str | None] = {}  # class -> why it never runs (None: it may)
        self.rooms: dict[tuple[object, ...], int] = {}  # this pass's capacities
        self.by_id = {job.id: job for job in jobs}

    def run(self, result: SimResult) -> None:
        order, heap, i, now = self.order, self.finishes, 0, 0.0
        while True:
            if not heap and i >= len(order):
                break  # no more events
            now = min(
                order[i].submit_at if i < len(order) else math.inf, heap[0][0] if heap else math.inf
            )
            freed = bool(heap) and heap[0][0] <= now
            while heap and heap[0][0] <= now:
                self._finish(heapq.heappop(heap)[1])
            fresh = False  # an arrival with no older job of its class ahead of it
            while i < len(order) and order[i].submit_at <= now:
                fresh |= self._arrive(order[i], i, result)
                i += 1
            # Without a finish, only such an arrival can start: an older job of its class waits.
            if freed or fresh or not self.prune:
                self._schedule(now, result)
        if self.levels:  # nothing runs, nothing more arrives, and jobs still wait
            queue = sorted(
                (j for lv in self.levels.values() for js in lv.values() for j in js),
                key=attrgetter("priority", "seq", "id"),
            )
            got = allocate(queue, self._snapshots(), [], frozenset(), self.policy, now)
            waiting = sorted(j.id for j in queue)
            reason = got.reasons.get(waiting[0], "waiting")
            raise SimulationStuckError(
                f"stuck at t={now:g}s: {len(waiting)} jobs wait, nothing runs and nothing "
                f"more arrives; job {waiting[0]}: {reason}"
            )

    def _schedule(self, now: float, result: SimResult) -> None:
        """One pass; without pruning, passes until one starts nothing, as the daemon's next ticks
        would (a second pass never starts anything: see the module's docstring)."""
        while self.levels:
            self.rooms.clear()
            if self.prune and not any(map(self._room, self.levels)):
                return  # nothing fits anywhere: no pass could start anything
            got = self._allocate(now, result)
            for job_id, why in got.unschedulable.items():  # a whole class never runs here
                key = self._key(self.by_id[job_id])
                self.never[key] = why
                for queued in self.levels.pop(key, {}).values():
                    result.unschedulable.update((j.id, why) for j in queued)
            for p in got.placements:
                job = self.by_id[p.job_id]
                self._start(job, p.gpus, p.share, now)
                result.runs[job.id] = Run(job.id, now, now + job.duration, p.gpus)
            if self.prune or not got.placements:
                return

    @staticmethod
    def _key(job: TraceJob | QueuedJob) -> _Key:
        allowed = job.allowed_gpus
        return (job.requirement, None if allowed is None else tuple(sorted(set(allowed))))

    def _arrive(self, job: TraceJob, seq: int, result: SimResult) -> bool:
        """Queue job; whether no older job of its class is ahead of it in queue order."""
        key = self._key(job)
        queued = QueuedJob(
            job.id, job.priority, seq, job.requirement, job.allowed_gpus, job.submit_at
        )
        if key not in self.never:  # ask the allocator once per class, on an empty machine
            got = allocate([queued], self._snapshots(empty=True), [], frozenset(), self.policy, 0.0)
            self.never[key] = got.unschedulable.get(job.id)
        why = self.never[key]
        if why is not None:
            result.unschedulable[job.id] = why
            return False
        levels = self.levels.setdefault(key, {})
        fresh = not any(p <= job.priority for p in levels)
        # Arrivals come in seq order, so each priority level stays sorted by seq.
        levels.setdefault(job.priority, []).append(queued)
        return fresh

    def _start(self, job: TraceJob, gpus: tuple[int, ...], share: float, now: float) -> None:
        key = self._key(job)
        levels = self.levels[key]
        jobs = levels[job.priority]
        del jobs[_index(jobs, job.id)]
        if not jobs:
            del levels[job.priority]
            if not levels:
                del self.levels[key]
        vram = job.requirement.vram_mb
        self.running[job.id] = RunningJob(job.id, gpus, share, vram, now)
        mem = float(vram) if vram is not None else share * self.total
        for g in gpus:
            self.share[g] += share
            self.used[g] += mem
            self.count[g] += 1
        heapq.heappush(self.finishes, (now + job.duration, job.id))

    def _finish(self, job_id: int) -> None:
        job = self.running.pop(job_id)
        mem = float(job.vram_mb) if job.vram_mb is not None else job.share * self.total
        for g in job.gpus:
            self.count[g] -= 1
            empty = self.count[g] == 0  # start again from exact zeros
            self.share[g] = 0.0 if empty else max(0.0, self.share[g] - job.share)
            self.used[g] = 0.0 if empty else max(0.0, self.used[g] - mem)

    def _snapshots(self, empty: bool = False) -> list[GpuSnapshot]:
        if empty:
            return [GpuSnapshot(g, "sim", self.total, 0, 0.0) for g in range(self.gpus)]
        return [
            GpuSnapshot(g, "sim", self.total, int(self.used[g] + 1e-6), min(1.0, self.share[g]))
            for g in range(self.gpus)
        ]

    def _allocate(self, now: float, result: SimResult) -> AllocationResult:
        """`allocate` on the pending queue, or on the part of it that decides the answer."""
        if self.prune:
            queue = self._queue(now)
        else:
            queue = [j for lv in self.levels.values() for js in lv.values() for j in js]
            queue.sort(key=attrgetter("priority", "seq", "id"))
        result.allocate_calls += 1
        running = list(self.running.values())
        return allocate(queue, self._snapshots(), running, frozenset(), self.policy, now)

    def _queue(self, now: float) -> list[QueuedJob]:
        """Per class: its first `room` jobs in queue order (one more without backfill, where the
        first job that waits blocks the rest) and its first starving job after them."""
        starvation, extra = self.policy.starvation_s, 0 if self.policy.backfill else 1
        out: list[QueuedJob] = []
        for key, levels in self.levels.items():
            take = self._room(key) + extra
            for priority in sorted(levels):
                jobs = levels[priority]
                out.extend(jobs[:take])
                rest = jobs[take:]
                take = max(0, take - len(jobs))
                # Within a priority the first job is the oldest: if it does not starve, none does.
                if rest and now - rest[0].waiting_since >= starvation:
                    out.append(rest[0])
                    break
        out.sort(key=attrgetter("priority", "seq", "id"))
        return out

    def _room(self, key: _Key) -> int:
        """At most how many jobs of this class one allocate call could start from here."""
        req, allowed = key
        cands = range(self.gpus) if allowed is None else [g for g in allowed if g < self.gpus]
        mode, n = self.policy.mode, req.gpu_count
        sig = (mode, req.amount, req.vram_mb, allowed)
        found = self.rooms.get(sig)
        if found is not None:
            return found
        if n > 1:
            room = sum(1 for g in cands if self.count[g] == 0) // n
        elif mode in {"share", "exclusive"}:
            share = 1.0 if mode == "exclusive" else req.share
            room = sum(math.floor((1.0 + 1e-6 - self.share[g]) / share) for g in cands)
        elif mode == "memory" and req.vram_mb is None:
            room = sum(1 for g in cands if self.count[g] == 0)
        else:  # declared memory mode, detected mode: each start takes `reserve` of the memory
            # left, and a GPU takes a job while `want` is left (app.allocator_rules.gpu_problem).
            floor_mb = float(self.policy.min_free_mem_mb)
            reserve = float(req.vram_mb) if req.vram_mb is not None else req.share * self.total
            if req.vram_mb is None and floor_mb > 0:
                want = floor_mb
            else:
                want = max(reserve, floor_mb) if mode == "detected" else reserve
            room = 0
            for g in cands:
                free = self.total - self.used[g] + 1e-3
                if free >= want:
                    room += math.floor((free - want) / reserve) + 1 if reserve > 0 else 1 << 30
        if self.policy.max_workers is not None:
            room = min(room, max(0, self.policy.max_workers - len(self.running)))
        self.rooms[sig] = room = max(0, room)
        return room


def _index(jobs: list[QueuedJob], job_id: int) -> int:
    for at, job in enumerate(jobs):  # a placed job is among the first few of its level
        if job.id == job_id:
            return at
    raise KeyError(job_id)
