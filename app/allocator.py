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

Holds: a job blocked by GPUs that has waited `starvation_s` gets the GPUs it will use held (no
later job may take them), unless one of the GPUs it could use is already held for an earlier
job: one hold at a time on any GPU. It gets the GPUs whose jobs of ours have run the shortest
(idle ones first), then the least used.

A job is unschedulable (for good) when no allowed GPU exists, it needs more GPUs than allowed, its
`vram_mb` is above every allowed GPU's total, its expected memory is above `max_vram` of every
allowed GPU, or its `ram_mb` is above the host's total RAM or `max_ram` of it. Policy-wide limits
alone (`min_free_mem_mb`, `max_workers`) only make jobs wait.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.allocator_ledger import Ledger
from app.allocator_pass import Pass
from app.allocator_queue import PreparedQueue
from app.models import (
    AllocationResult,
    GpuSnapshot,
    HostSnapshot,
    Policy,
    QueuedJob,
    RunningJob,
)


def allocate(
    queue: Sequence[QueuedJob] | PreparedQueue,
    gpus: Sequence[GpuSnapshot] | None,
    running: Sequence[RunningJob],
    paused: frozenset[int] | set[int],
    policy: Policy,
    now: float,
    probe_error: str = "",
    host: HostSnapshot | None = None,
) -> AllocationResult:
    """Place what fits now; every other queued job gets a reason or is unschedulable.

    The daemon passes a `PreparedQueue` (sorted and grouped once per change of its pending
    jobs, not on every pass); any other sequence is prepared here."""
    prepared = queue if isinstance(queue, PreparedQueue) else PreparedQueue(queue)
    result = AllocationResult()
    if gpus is None:
        # Without a probe we cannot tell free from busy, and a wrong guess would oversubscribe.
        reason = f"GPUs unknown: {probe_error}" if probe_error else "GPUs unknown"
        result.reasons.update(dict.fromkeys(prepared.ids, reason))
        return result
    ledger = Ledger(gpus, running, frozenset(paused), policy, now, host)
    Pass(ledger, result).run(prepared)
    return result
