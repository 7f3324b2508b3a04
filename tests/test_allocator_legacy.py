"""Default policies must give exactly today's answers: the allocator before modes, as an oracle.

`legacy_allocate` below is a frozen copy of app/allocator.py as it was before allocation modes, host
RAM, max_workers and the limits arrived (share mode only). The property tests check that the new
allocator with a default `Policy()` (and with the new knobs set to values that change nothing) gives
the same AllocationResult on random machines and queues, down to every reason's text, and that
exclusive mode is share mode with every fractional job counted as a whole GPU.
If share mode is changed on purpose, change or drop this file with it: holds were (one hold at a
time on any GPU, the GPUs whose jobs have run the shortest first), and the copy's `hold` with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.allocator import allocate
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
from tests.test_allocator import NOW, machines, queues
from tests.test_allocator import policies as all_policies

#: The frozen copy knows best fit (`pack`) and `spread`; `first-fit` came later.
policies = all_policies.filter(lambda p: p.placement != "first-fit")

# --- frozen copy of the pre-modes allocator ------------------------------------------------------

_EPS = 1e-9
_MB_EPS = 1e-6

#: (amount, declared vram, normalised allowed GPUs): jobs of one class get the same answer.
_ClassKey = tuple[float, int | None, tuple[int, ...] | None]


def legacy_allocate(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuSnapshot] | None,
    running: Sequence[RunningJob],
    paused: frozenset[int] | set[int],
    policy: Policy,
    now: float,
    probe_error: str = "",
) -> AllocationResult:
    """Place what fits now; every other queued job gets a reason or is unschedulable."""
    result = AllocationResult()
    if gpus is None:
        # Without a probe we cannot tell free from busy, and a wrong guess would oversubscribe.
        reason = f"GPUs unknown: {probe_error}" if probe_error else "GPUs unknown"
        for job in queue:
            result.reasons[job.id] = reason
        return result
    ledger = _Ledger(gpus, running, frozenset(paused), policy, now)
    _Pass(ledger, result).run(sorted(queue, key=lambda j: (j.priority, j.seq, j.id)))
    return result


@dataclass
class _Gpu:
    """One GPU's working state during a call: the snapshot plus what we hold on it."""

    snap: GpuSnapshot
    share: float = 0.0  # ledger: sum of our shares on this GPU
    ours_mb: float = 0.0  # expected memory of our jobs
    ramping_mb: float = 0.0  # expected memory of our jobs still inside their ramp-up

    @property
    def total(self) -> int:
        return self.snap.memory_total_mb

    @property
    def effective_used(self) -> float:
        # A just-launched job has not allocated its memory yet: count it as used meanwhile.
        return self.snap.memory_used_mb + self.ramping_mb

    @property
    def others_mb(self) -> float:
        return max(0.0, self.effective_used - self.ours_mb)

    def expected_mb(self, share: float, vram_mb: int | None) -> float:
        return float(vram_mb) if vram_mb is not None else share * self.total


class _Ledger:
    """GPUs, pauses and holds, updated as the call places jobs."""

    def __init__(
        self,
        gpus: Sequence[GpuSnapshot],
        running: Sequence[RunningJob],
        paused: frozenset[int],
        policy: Policy,
        now: float,
    ) -> None:
        self.gpus = {g.index: _Gpu(g) for g in sorted(gpus, key=lambda g: g.index)}
        self.ids = tuple(self.gpus)
        self.paused = paused
        self.policy = policy
        self.now = now
        self.held: dict[int, str] = {}  # GPU -> "job N (waiting Ns)"
        self.version = 0  # bumped on every change, so cached answers know when they are stale
        self._allowed: dict[tuple[int, ...] | None, tuple[int, ...]] = {}
        self.oldest_start: dict[int, float] = {}
        for job in running:
            for g in set(job.gpus):
                if g in self.gpus:
                    self._add(g, job.share, job.vram_mb, now - job.started_at < policy.ramp_up_s)
                    self.oldest_start[g] = min(self.oldest_start.get(g, now), job.started_at)

    def _add(self, g: int, share: float, vram_mb: int | None, ramping: bool) -> None:
        gpu = self.gpus[g]
        mem = gpu.expected_mb(share, vram_mb)
        gpu.share += share
        gpu.ours_mb += mem
        if ramping:
            gpu.ramping_mb += mem

    def place(self, gpus: tuple[int, ...], req: Requirement) -> None:
        # Placed now, so it counts as ramping unless the policy has no ramp-up at all.
        for g in gpus:
            self._add(g, req.share, req.vram_mb, self.policy.ramp_up_s > 0)
        self.version += 1

    def allowed(self, allowed_key: tuple[int, ...] | None) -> tuple[int, ...]:
        """Existing GPUs a job may use, ascending."""
        found = self._allowed.get(allowed_key)
        if found is None:
            keep = set(self.ids) if allowed_key is None else set(allowed_key)
            found = self._allowed[allowed_key] = tuple(g for g in self.ids if g in keep)
        return found

    def problem(self, g: int, req: Requirement) -> str | None:
        """Why GPU g cannot take (one GPU's worth of) req now, or None if it can."""
        if g in self.paused:
            return "paused"
        if g in self.held:
            return f"held for {self.held[g]}"
        gpu, pol = self.gpus[g], self.policy
        if req.gpu_count > 1 and gpu.share > _EPS:
            return f"share {gpu.share:g}/1.0 used"
        if gpu.share + req.share > 1.0 + _EPS:
            return f"share {gpu.share:g}/1.0 used"
        if gpu.others_mb >= pol.mem_threshold * gpu.total:
            return (
                f"memory {_pct(gpu.others_mb, gpu.total)} used by other processes "
                f"(threshold {pol.mem_threshold * 100:.0f}%)"
            )
        # Load on a GPU we already run on is our own, so it only guards GPUs free of our jobs.
        if gpu.share <= _EPS and gpu.snap.utilization >= pol.load_threshold:
            return (
                f"load {gpu.snap.utilization * 100:.0f}% "
                f"(threshold {pol.load_threshold * 100:.0f}%)"
            )
        free = gpu.total - gpu.effective_used
        if req.vram_mb is not None and req.vram_mb > free + _MB_EPS:
            return f"has {max(0.0, free):.0f} MB free"
        return None

    def check(self, req: Requirement, cands: tuple[int, ...]) -> tuple[list[int], list[_Issue]]:
        ok: list[int] = []
        issues: list[_Issue] = []
        for g in cands:
            why = self.problem(g, req)
            if why is None:
                ok.append(g)
            else:
                issues.append((g, why))
        return ok, issues

    def choose(self, ok: list[int], req: Requirement) -> tuple[int, ...] | None:
        n = req.gpu_count
        if n > 1:
            return tuple(ok[:n]) if len(ok) >= n else None
        if not ok:
            return None
        # Best fit keeps empty GPUs free for multi-GPU jobs; spread balances load instead.
        sign = -1.0 if self.policy.placement == "pack" else 1.0
        return (min(ok, key=lambda g: (sign * round(self.gpus[g].share, 9), g)),)

    def hold(self, job: QueuedJob, cands: tuple[int, ...]) -> tuple[int, ...]:
        """Hold the GPUs a starving job will use once they free up; returns the newly held ones."""
        if any(g in self.held for g in cands):
            return ()  # one hold at a time on any GPU
        free = [g for g in cands if g not in self.paused]
        n = job.requirement.gpu_count
        if len(free) < n:
            return ()  # it needs a paused GPU back first: holding the rest would only idle them
        # The GPUs whose jobs have run the shortest first (idle ones first), then the least used.
        chosen = sorted(
            free,
            key=lambda g: (
                -self.oldest_start.get(g, self.now),
                round(self.gpus[g].share, 9),
                g,
            ),
        )[:n]
        label = f"job {job.id} (waiting {self.now - job.waiting_since:.0f}s)"
        new = tuple(sorted(chosen))
        for g in new:
            self.held[g] = label
        if new:
            self.version += 1
        return new


_Issue = tuple[int, str]


class _Pass:
    """One walk over the sorted queue, with per-class caches so 10,000 jobs stay cheap."""

    def __init__(self, ledger: _Ledger, result: AllocationResult) -> None:
        self.ledger = ledger
        self.result = result
        self.never: dict[_ClassKey, str | None] = {}
        self.waits: dict[tuple[_ClassKey, int], str] = {}
        self.blocked_by: int | None = None  # first blocked job, when backfill is off

    def run(self, jobs: list[QueuedJob]) -> None:
        done: set[int] = set()
        for job in jobs:
            if job.id not in done:  # a duplicated id is placed or explained once
                done.add(job.id)
                self.visit(job)

    def visit(self, job: QueuedJob) -> None:
        req = job.requirement
        allowed_key = None if job.allowed_gpus is None else tuple(sorted(set(job.allowed_gpus)))
        key: _ClassKey = (req.amount, req.vram_mb, allowed_key)
        cands = self.ledger.allowed(allowed_key)
        if key not in self.never:
            self.never[key] = _never_fits(req, allowed_key, cands, self.ledger)
        never = self.never[key]
        if never is not None:
            self.result.unschedulable[job.id] = never
            return
        if self.blocked_by is not None:
            self.result.reasons[job.id] = f"behind job {self.blocked_by}"
            return
        reason = self.waits.get((key, self.ledger.version))
        if reason is None:
            ok, issues = self.ledger.check(req, cands)
            chosen = self.ledger.choose(ok, req)
            if chosen is not None:
                self.ledger.place(chosen, req)
                self.result.placements.append(Placement(job.id, chosen, req.share))
                return
            reason = self.waits[(key, self.ledger.version)] = _wait_reason(req, ok, issues)
        self.blocked(job, cands, reason)

    def blocked(self, job: QueuedJob, cands: tuple[int, ...], reason: str) -> None:
        policy = self.ledger.policy
        if self.ledger.now - job.waiting_since >= policy.starvation_s:
            held = self.ledger.hold(job, cands)
            if held:
                reason += f"; {_ids(held)} held for it"
        if not policy.backfill:
            self.blocked_by = job.id
        self.result.reasons[job.id] = reason


def _never_fits(
    req: Requirement,
    allowed_key: tuple[int, ...] | None,
    cands: tuple[int, ...],
    ledger: _Ledger,
) -> str | None:
    """Why req can never run on this machine (pauses are temporary, so they do not count)."""
    if not cands:
        if allowed_key is None or not ledger.ids:
            return "this machine has no GPUs"
        return f"allowed {_ids(allowed_key)}: not among the scheduler's {_ids(ledger.ids)}"
    n = req.gpu_count
    if n > len(cands):
        return f"needs {n} GPUs but only {len(cands)} allowed ({_ids(cands)})"
    if req.vram_mb is None:
        return None
    vram = req.vram_mb
    big = [g for g in cands if ledger.gpus[g].total >= vram]
    if len(big) >= n:
        return None
    largest = max(ledger.gpus[g].total for g in cands)
    if n == 1:
        return f"needs {vram} MB of GPU memory but the largest allowed GPU has {largest} MB"
    return f"needs {n} GPUs with {vram} MB each but only {len(big)} allowed GPUs have that much"


def _wait_reason(req: Requirement, ok: list[int], issues: list[_Issue]) -> str:
    need = f" with {req.vram_mb} MB free" if req.vram_mb is not None else ""
    if req.gpu_count == 1:
        return f"needs {req}{need}: {_group(issues)}"
    each = f" and {req.vram_mb} MB free each" if req.vram_mb is not None else ""
    return f"needs {req} with nothing of ours on them{each}, {len(ok)} available ({_group(issues)})"


def _group(issues: list[_Issue]) -> str:
    """`GPUs 0-3 paused; GPU 4 load 95% ...`: GPUs with the same problem are named together."""
    by_text: dict[str, list[int]] = {}
    for g, text in issues:
        by_text.setdefault(text, []).append(g)
    return "; ".join(f"{_ids(gs)} {text}" for text, gs in by_text.items())


def _ids(ids: Sequence[int]) -> str:
    """`GPU 3`, `GPUs 0-1`, `GPUs 0, 2, 4-6`."""
    ordered = sorted(set(ids))
    if not ordered:
        return "no GPUs"
    if len(ordered) == 1:
        return f"GPU {ordered[0]}"
    runs: list[str] = []
    start = prev = ordered[0]
    for g in [*ordered[1:], None]:
        if g is not None and g == prev + 1:
            prev = g
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if g is not None:
            start = prev = g
    return "GPUs " + ", ".join(runs)


def _pct(part: float, total: float) -> str:
    return f"{part / total * 100:.0f}%" if total > 0 else "100%"


# --- properties ---------------------------------------------------------------------------------

Machine = tuple[list[GpuSnapshot], list[RunningJob], set[int]]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), queues(), policies)
def test_default_policy_gives_exactly_the_old_answer(
    machine: Machine, queue: list[QueuedJob], policy: Policy
) -> None:
    gpus, running, paused = machine
    expected = legacy_allocate(queue, gpus, running, paused, policy, NOW)
    assert policy.mode == "share"
    assert policy.max_workers is None
    assert allocate(queue, gpus, running, paused, policy, NOW) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), queues(), policies, st.integers(0, 100_000), st.data())
def test_neutral_settings_of_the_new_knobs_change_nothing(
    machine: Machine, queue: list[QueuedJob], policy: Policy, ram: int, data: st.DataObject
) -> None:
    """A host snapshot (and max_ram) with no RAM declared, a max_workers no one reaches, and
    per-job ramp-ups equal to the policy's."""
    gpus, running, paused = machine
    expected = legacy_allocate(queue, gpus, running, paused, policy, NOW)
    ramp = policy.ramp_up_s
    own_ramp = [dataclasses.replace(j, ramp_up_s=ramp) for j in running]
    own_queue = [
        dataclasses.replace(j, requirement=dataclasses.replace(j.requirement, ramp_up_s=ramp))
        for j in queue
    ]
    host = HostSnapshot(ram, data.draw(st.integers(0, ram)))
    neutral = dataclasses.replace(policy, max_workers=len(queue) + len(running), max_ram=0.5)
    assert allocate(queue, gpus, running, paused, neutral, NOW, host=host) == expected
    assert allocate(own_queue, gpus, own_ramp, paused, policy, NOW) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), queues(), policies)
def test_exclusive_mode_is_share_mode_with_whole_gpus(
    machine: Machine, queue: list[QueuedJob], policy: Policy
) -> None:
    gpus, running, paused = machine
    whole = [
        dataclasses.replace(
            j, requirement=Requirement(max(1.0, j.requirement.amount), j.requirement.vram_mb)
        )
        for j in queue
    ]
    expected = legacy_allocate(whole, gpus, running, paused, policy, NOW)
    got = allocate(queue, gpus, running, paused, dataclasses.replace(policy, mode="exclusive"), NOW)
    assert got.placements == expected.placements
    assert got.unschedulable == expected.unschedulable
    assert {i: r.replace(" (exclusive mode)", "") for i, r in got.reasons.items()} == (
        expected.reasons
    )
