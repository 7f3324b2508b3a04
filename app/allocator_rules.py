"""What one GPU can take, per allocation mode: the per-GPU half of `app.allocator`. Pure.

`Need` is a job class's requirement as the policy's mode reads it; `GpuState` is one GPU with what
we hold on it during an allocation call; `gpu_problem` says why a GPU cannot take a need now and
`never_fits` why a need can never run here. The rules themselves are documented in app.allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.jobsfile import format_gpu_list
from app.models import GpuSnapshot, HostSnapshot, Policy, Requirement

EPS = 1e-9
MB_EPS = 1e-6


@dataclass
class GpuState:
    """One GPU's working state during a call: the snapshot plus what we hold on it."""

    snap: GpuSnapshot
    share: float = 0.0  # ledger: sum of our shares on this GPU
    ours_mb: float = 0.0  # expected memory of our jobs
    ramping_mb: float = 0.0  # expected memory of our jobs still inside their ramp-up
    jobs: int = 0  # how many of our jobs are on it
    declared_mb: float = 0.0  # memory mode: declared memory of ours (undeclared = whole GPU)

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

    @property
    def free(self) -> float:
        return self.total - self.effective_used

    def expected_mb(self, share: float, vram_mb: int | None) -> float:
        return float(vram_mb) if vram_mb is not None else share * self.total

    def add(self, share: float, vram_mb: int | None, ramping: bool) -> None:
        mem = self.expected_mb(share, vram_mb)
        self.share += share
        self.ours_mb += mem
        if ramping:
            self.ramping_mb += mem
        self.jobs += 1
        self.declared_mb += float(vram_mb) if vram_mb is not None else self.total

    def fill(self, mode: str) -> float:
        """How full of our work the GPU is, for best fit / spread and for holds."""
        if mode == "memory":
            return self.declared_mb / self.total if self.total > 0 else 1.0
        if mode == "detected":
            return self.effective_used / self.total if self.total > 0 else 1.0
        return self.share


@dataclass(frozen=True)
class Need:
    """A job class's requirement as the mode reads it."""

    req: Requirement  # as written
    mode: str
    share: float  # ledger share per GPU: exclusive and undeclared memory-mode jobs take 1.0
    count: int  # GPUs
    vram_mb: int | None
    ram_mb: int | None

    @classmethod
    def of(cls, req: Requirement, mode: str) -> Need:
        whole = mode == "exclusive" or (mode == "memory" and req.vram_mb is None)
        share = 1.0 if whole else req.share
        return cls(req, mode, share, req.gpu_count, req.vram_mb, req.ram_mb)

    def expected_mb(self, gpu: GpuState) -> float:
        """The memory this job should use on gpu (what ramp-up reserves and max_vram counts)."""
        return gpu.expected_mb(self.share, self.vram_mb)

    def placement_share(self, gpus: Sequence[GpuState]) -> float:
        if self.mode == "memory" and self.vram_mb is not None:
            smallest = min(g.total for g in gpus)
            return min(1.0, self.vram_mb / smallest) if smallest > 0 else 1.0
        return self.share

    def free_mb(self, gpu: GpuState, policy: Policy) -> float:
        """Detected mode: the free memory gpu must report (after ramp-up reservations)."""
        if self.vram_mb is not None:
            return float(self.vram_mb)
        if policy.min_free_mem_mb > 0:
            return float(policy.min_free_mem_mb)
        return self.share * gpu.total


def gpu_problem(gpu: GpuState, need: Need, policy: Policy) -> str | None:
    """Why gpu cannot take (one GPU's worth of) need now, or None; pauses and holds are not here."""
    busy = _occupancy(gpu, need)
    if busy is not None:
        return busy
    if gpu.others_mb >= policy.mem_threshold * gpu.total:
        return (
            f"memory {pct(gpu.others_mb, gpu.total)} used by other processes "
            f"(threshold {policy.mem_threshold * 100:.0f}%)"
        )
    # Load on a GPU we already run on is our own, so it only guards GPUs free of our jobs.
    idle = gpu.share <= EPS if need.mode in {"share", "exclusive"} else gpu.jobs == 0
    if idle and gpu.snap.utilization >= policy.load_threshold:
        return (
            f"load {gpu.snap.utilization * 100:.0f}% (threshold {policy.load_threshold * 100:.0f}%)"
        )
    free = gpu.free
    if policy.min_free_mem_mb > 0 and free < policy.min_free_mem_mb - MB_EPS:
        return f"has {max(0.0, free):.0f} MB free (min {policy.min_free_mem_mb})"
    if need.mode == "detected":
        wanted = need.free_mb(gpu, policy)
        if wanted > free + MB_EPS:
            more = f", needs {wanted:.0f}" if need.vram_mb is None else ""
            return f"has {max(0.0, free):.0f} MB free{more}"
    elif need.vram_mb is not None and need.vram_mb > free + MB_EPS:
        return f"has {max(0.0, free):.0f} MB free"
    if policy.max_vram is not None:
        after = gpu.effective_used + need.expected_mb(gpu)
        if after > policy.max_vram * gpu.total + MB_EPS:
            return f"memory would reach {pct(after, gpu.total)} (max_vram {policy.max_vram:g})"
    return None


def _occupancy(gpu: GpuState, need: Need) -> str | None:
    """The mode's own rule for our jobs already on the GPU."""
    if need.mode in {"share", "exclusive"}:
        if need.count > 1 and gpu.share > EPS:
            return f"share {gpu.share:g}/1.0 used"
        if gpu.share + need.share > 1.0 + EPS:
            return f"share {gpu.share:g}/1.0 used"
        return None
    if need.mode == "memory" and need.count == 1 and need.vram_mb is not None:
        room = gpu.total - gpu.others_mb
        if gpu.declared_mb + need.vram_mb > room + MB_EPS:
            text = f"{gpu.declared_mb:.0f}/{gpu.total} MB declared"
            if gpu.others_mb >= 1:
                text += f" + {gpu.others_mb:.0f} MB used by other processes"
            return text
        return None
    # Memory mode without a declaration, and multi-GPU jobs in memory and detected modes.
    whole = need.count > 1 or need.mode == "memory"
    if whole and gpu.jobs > 0:
        return f"runs {gpu.jobs} job{'s' if gpu.jobs != 1 else ''} of ours"
    return None


def wait_reason(need: Need, policy: Policy, ok: int, issues: str) -> str:
    """`needs 0.5 GPU: GPU 0 share 0.75/1.0 used; GPU 1 paused`; issues is `group`'s text."""
    shown = need.req if need.mode != "exclusive" else Requirement(max(1.0, need.req.amount))
    mem = need.vram_mb
    if need.mode == "detected" and mem is None and policy.min_free_mem_mb > 0:
        mem = policy.min_free_mem_mb
    if need.count == 1:
        if need.mode == "memory":
            head = (
                f"needs {mem} MB on 1 GPU"
                if mem is not None
                else "needs 1 GPU with nothing of ours on it (no GPU memory declared)"
            )
        else:
            extra = " (exclusive mode)" if need.mode == "exclusive" and need.req.amount < 1 else ""
            head = f"needs {shown}{extra}" + (f" with {mem} MB free" if mem is not None else "")
        return f"{head}: {issues}"
    if mem is not None:
        each = f" and {mem} MB free each"
    elif need.mode == "detected":
        each = " and all their memory free"
    else:
        each = ""
    return f"needs {shown} with nothing of ours on them{each}, {ok} available ({issues})"


def never_fits(
    need: Need,
    allowed_key: tuple[int, ...] | None,
    cands: tuple[int, ...],
    gpus: dict[int, GpuState],
    policy: Policy,
    host: HostSnapshot | None,
) -> str | None:
    """Why need can never run on this machine (pauses are temporary, so they do not count)."""
    if not cands:
        if allowed_key is None or not gpus:
            return "this machine has no GPUs"
        return f"allowed {ids(allowed_key)}: not among the scheduler's {ids(tuple(gpus))}"
    n = need.count
    if n > len(cands):
        return f"needs {n} GPUs but only {len(cands)} allowed ({ids(cands)})"
    return (
        _never_vram(need, cands, gpus)
        or _never_max_vram(need, cands, gpus, policy)
        or (_never_ram(need, policy, host))
    )


def _never_vram(need: Need, cands: tuple[int, ...], gpus: dict[int, GpuState]) -> str | None:
    if need.vram_mb is None:
        return None
    vram, n = need.vram_mb, need.count
    big = [g for g in cands if gpus[g].total >= vram]
    if len(big) >= n:
        return None
    largest = max(gpus[g].total for g in cands)
    if n == 1:
        return f"needs {vram} MB of GPU memory but the largest allowed GPU has {largest} MB"
    return f"needs {n} GPUs with {vram} MB each but only {len(big)} allowed GPUs have that much"


def _never_max_vram(
    need: Need, cands: tuple[int, ...], gpus: dict[int, GpuState], policy: Policy
) -> str | None:
    cap = policy.max_vram
    if cap is None:
        return None
    fits = [g for g in cands if need.expected_mb(gpus[g]) <= cap * gpus[g].total + MB_EPS]
    if len(fits) >= need.count:
        return None
    if need.vram_mb is None:
        what = "a whole GPU's memory" if need.share >= 1 else f"{need.share:g} of a GPU's memory"
        return (
            f"counts as {what} but max_vram is {cap:g} (declare its GPU memory or raise max_vram)"
        )
    best = max(cap * gpus[g].total for g in cands)
    if need.count == 1:
        return (
            f"needs {need.vram_mb} MB of GPU memory but max_vram {cap:g} allows at most "
            f"{best:.0f} MB on any allowed GPU"
        )
    return (
        f"needs {need.count} GPUs with {need.vram_mb} MB each but max_vram {cap:g} allows that "
        f"on only {len(fits)} allowed GPUs"
    )


def _never_ram(need: Need, policy: Policy, host: HostSnapshot | None) -> str | None:
    if host is None or need.ram_mb is None:
        return None
    if need.ram_mb > host.ram_total_mb:
        return f"needs {need.ram_mb} MB of RAM but this machine has {host.ram_total_mb} MB"
    if policy.max_ram is not None and need.ram_mb > policy.max_ram * host.ram_total_mb + MB_EPS:
        return (
            f"needs {need.ram_mb} MB of RAM but max_ram {policy.max_ram:g} allows at most "
            f"{policy.max_ram * host.ram_total_mb:.0f} MB of this machine's {host.ram_total_mb} MB"
        )
    return None


def ram_problem(
    ram_mb: int | None, host: HostSnapshot | None, reserved_mb: float, policy: Policy
) -> str | None:
    """Why the host cannot give ram_mb now; `reserved_mb` is what ramping jobs declared."""
    if host is None or ram_mb is None:
        return None
    available = host.ram_available_mb - reserved_mb
    if ram_mb > available + MB_EPS:
        held = f" ({reserved_mb:.0f} MB reserved for starting jobs)" if reserved_mb > 0 else ""
        return f"needs {ram_mb} MB RAM, {max(0.0, available):.0f} MB available{held}"
    if policy.max_ram is not None:
        used = host.ram_total_mb - host.ram_available_mb + reserved_mb
        room = policy.max_ram * host.ram_total_mb - used
        if ram_mb > room + MB_EPS:
            return (
                f"needs {ram_mb} MB RAM, max_ram {policy.max_ram:g} leaves {max(0.0, room):.0f} MB"
            )
    return None


def group(issues: list[tuple[int, str]]) -> str:
    """`GPUs 0-3 paused; GPU 4 load 95% ...`: GPUs with the same problem are named together."""
    by_text: dict[str, list[int]] = {}
    for g, text in issues:
        by_text.setdefault(text, []).append(g)
    return "; ".join(f"{ids(gs)} {text}" for text, gs in by_text.items())


def ids(values: Sequence[int]) -> str:
    """`GPU 3`, `GPUs 0-1`, `GPUs 0, 2, 4-6`: the jobs file's compact form, for reading."""
    ordered = sorted(set(values))
    if not ordered:
        return "no GPUs"
    if len(ordered) == 1:
        return f"GPU {ordered[0]}"
    return "GPUs " + format_gpu_list(tuple(ordered)).replace(",", ", ")


def pct(part: float, total: float) -> str:
    return f"{part / total * 100:.0f}%" if total > 0 else "100%"
