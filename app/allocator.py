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

from collections.abc import Sequence
from operator import attrgetter

from app.allocator_rules import (
    GpuState,
    Need,
    gpu_problem,
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


def allocate(
    queue: Sequence[QueuedJob],
    gpus: Sequence[GpuSnapshot] | None,
    running: Sequence[RunningJob],
    paused: frozenset[int] | set[int],
    policy: Policy,
    now: float,
    probe_error: str = "",
    host: HostSnapshot | None = None,
) -> AllocationResult:
    """Place what fits now; every other queued job gets a reason or is unschedulable."""
    result = AllocationResult()
    if gpus is None:
        # Without a probe we cannot tell free from busy, and a wrong guess would oversubscribe.
        reason = f"GPUs unknown: {probe_error}" if probe_error else "GPUs unknown"
        for job in queue:
            result.reasons[job.id] = reason
        return result
    ledger = _Ledger(gpus, running, frozenset(paused), policy, now, host)
    _Pass(ledger, result).run(sorted(queue, key=attrgetter("priority", "seq", "id")))
    return result


class _Ledger:
    """GPUs, host RAM, pauses and holds, updated as the call places jobs."""

    def __init__(
        self,
        gpus: Sequence[GpuSnapshot],
        running: Sequence[RunningJob],
        paused: frozenset[int],
        policy: Policy,
        now: float,
        host: HostSnapshot | None,
    ) -> None:
        self.gpus = {g.index: GpuState(g) for g in sorted(gpus, key=lambda g: g.index)}
        self.ids = tuple(self.gpus)
        self.paused = paused
        self.policy = policy
        self.mode = policy.mode
        self.now = now
        self.host = host
        self.held: dict[int, str] = {}  # GPU -> "job N (waiting Ns)"
        self.version = 0  # bumped on every change, so cached answers know when they are stale
        self.changed = dict.fromkeys(self.ids, 0)  # GPU -> version of its last change
        self.ram_changed = 0  # version of the last change to reserved RAM
        self.workers = len({job.id for job in running})
        self.ram_reserved = 0.0  # declared RAM of ramping jobs
        self._allowed: dict[tuple[int, ...] | None, tuple[int, ...]] = {}
        self._holds: dict[tuple[tuple[int, ...], int], int] = {}  # (cands, n) -> version seen
        self._problems: dict[tuple[tuple[float, int, int | None], int], tuple[int, str | None]] = {}
        for job in running:
            ramp = job.ramp_up_s if job.ramp_up_s is not None else policy.ramp_up_s
            ramping = now - job.started_at < ramp
            if ramping and job.ram_mb is not None:
                self.ram_reserved += job.ram_mb
            for g in set(job.gpus):
                if g in self.gpus:
                    self.gpus[g].add(job.share, job.vram_mb, ramping)

    def place(
        self, gpus: tuple[int, ...], need: Need, share: float, ramp_up_s: float | None
    ) -> None:
        ramp = ramp_up_s if ramp_up_s is not None else self.policy.ramp_up_s
        # Placed now, so it counts as ramping unless it has no ramp-up at all; in detected mode
        # nothing else stops the next job from landing on the same memory, so it always counts.
        ramping = ramp > 0 or self.mode == "detected"
        self.version += 1
        for g in gpus:
            self.gpus[g].add(share, need.vram_mb, ramping)
            self.changed[g] = self.version
        if need.ram_mb is not None:
            self.ram_reserved += need.ram_mb
            self.ram_changed = self.version
        self.workers += 1

    def unchanged(self, cands: tuple[int, ...], since: int) -> bool:
        """Whether none of cands changed (placement or hold) after version `since`."""
        if since == self.version:
            return True
        changed = self.changed
        return all(changed[g] <= since for g in cands)

    def allowed(self, allowed_key: tuple[int, ...] | None) -> tuple[int, ...]:
        """Existing GPUs a job may use, ascending."""
        found = self._allowed.get(allowed_key)
        if found is None:
            keep = set(self.ids) if allowed_key is None else set(allowed_key)
            found = self._allowed[allowed_key] = tuple(g for g in self.ids if g in keep)
        return found

    def problem(self, g: int, need: Need) -> str | None:
        """Why GPU g cannot take (one GPU's worth of) need now, or None if it can."""
        if g in self.paused:
            return "paused"
        if g in self.held:
            return f"held for {self.held[g]}"
        return gpu_problem(self.gpus[g], need, self.policy)

    def check(self, need: Need, cands: tuple[int, ...]) -> tuple[list[int], list[_Issue]]:
        ok: list[int] = []
        issues: list[_Issue] = []
        # A GPU's answer depends on its own state and the need alone (not on the allowed GPUs or
        # RAM), so it is shared by classes and kept until that GPU changes.
        sig, changed, known = (need.share, need.count, need.vram_mb), self.changed, self._problems
        for g in cands:
            hit = known.get((sig, g))
            if hit is not None and hit[0] >= changed[g]:
                why = hit[1]
            else:
                why = self.problem(g, need)
                known[(sig, g)] = (self.version, why)
            if why is None:
                ok.append(g)
            else:
                issues.append((g, why))
        return ok, issues

    def choose(self, ok: list[int], need: Need) -> tuple[int, ...] | None:
        n = need.count
        if n > 1:
            return tuple(ok[:n]) if len(ok) >= n else None
        if not ok:
            return None
        placement = self.policy.placement
        if placement == "first-fit":
            return (ok[0],)  # ok is in ascending GPU order
        # Best fit keeps empty GPUs free for multi-GPU jobs; spread balances load instead.
        sign = -1.0 if placement == "pack" else 1.0
        mode = self.mode
        return (min(ok, key=lambda g: (sign * round(self.gpus[g].fill(mode), 9), g)),)

    def hold(self, job: QueuedJob, cands: tuple[int, ...]) -> tuple[int, ...]:
        """Hold the GPUs a starving job will use once they free up; returns the newly held ones."""
        n = job.requirement.gpu_count
        # The same GPUs in the same state pick the same ones again, all already held: skip.
        seen = self._holds.get((cands, n))
        if seen is not None and self.unchanged(cands, seen):
            return ()
        free = [g for g in cands if g not in self.paused]
        if len(free) < n:
            return ()  # it needs a paused GPU back first: holding the rest would only idle them
        # Least used = first to drain (and, for one GPU, the most free share).
        mode = self.mode
        chosen = sorted(free, key=lambda g: (round(self.gpus[g].fill(mode), 9), g))[:n]
        label = f"job {job.id} (waiting {self.now - job.waiting_since:.0f}s)"
        # A GPU already held for an earlier starving job stays theirs: it frees for them first.
        new = tuple(sorted(g for g in chosen if g not in self.held))
        for g in new:
            self.held[g] = label
        if new:
            self.version += 1
            for g in new:
                self.changed[g] = self.version
        self._holds[(cands, n)] = self.version
        return new


class _Pass:
    """One walk over the sorted queue, with per-class caches so 10,000 jobs stay cheap."""

    def __init__(self, ledger: _Ledger, result: AllocationResult) -> None:
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
        done: set[int] = set()
        for job in jobs:
            if job.id not in done:  # a duplicated id is placed or explained once
                done.add(job.id)
                self.visit(job)

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
