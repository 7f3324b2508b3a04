"""The allocator's working ledger: GPUs, host RAM, pauses and holds as one call places jobs.

Answers are cached per GPU and need, and every change bumps `version`, so callers can tell
whether an answer worked out earlier still holds (see app/allocator.py for the rules).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.allocator_rules import GpuState, Need, gpu_problem
from app.models import GpuSnapshot, HostSnapshot, Policy, QueuedJob, RunningJob

#: (GPU, why it cannot take a need now, or None)
Issue = tuple[int, str]


class Ledger:
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
        # GPU -> start of the longest-running of our jobs on it (absent: none of ours runs there)
        self.oldest_start: dict[int, float] = {}
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
                    self.oldest_start[g] = min(self.oldest_start.get(g, now), job.started_at)

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

    def check(self, need: Need, cands: tuple[int, ...]) -> tuple[list[int], list[Issue]]:
        ok: list[int] = []
        issues: list[Issue] = []
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
        # One hold at a time on any GPU: a later starving job waits until the earlier one has
        # started before it holds GPUs that job could use. Holding for every starving job at
        # once would idle most of a busy machine (on a long queue every job starves).
        if any(g in self.held for g in cands):
            return ()
        free = [g for g in cands if g not in self.paused]
        if len(free) < n:
            return ()  # it needs a paused GPU back first: holding the rest would only idle them
        # First to drain, as far as can be told without run times: the GPUs whose jobs of ours
        # have run the shortest (an idle GPU first). With heavy-tailed run times (a few long
        # trainings among many short runs) a job that has run for hours likely runs for hours
        # more, so a GPU held behind it would idle the longest. Then the least used.
        mode, oldest, now = self.mode, self.oldest_start, self.now
        chosen = sorted(
            free, key=lambda g: (-oldest.get(g, now), round(self.gpus[g].fill(mode), 9), g)
        )[:n]
        label = f"job {job.id} (waiting {self.now - job.waiting_since:.0f}s)"
        new = tuple(sorted(chosen))
        for g in new:
            self.held[g] = label
        if new:
            self.version += 1
            for g in new:
                self.changed[g] = self.version
        self._holds[(cands, n)] = self.version
        return new
