"""The allocator visits few jobs of a long queue: its answers must be exactly those of visiting
every job one by one, in every mode, with host RAM, worker limits, starvation and backfill.

The one-by-one walk is built from the allocator's own `Pass.visit`, so the property checks the
bulk bookkeeping (which jobs must be visited, which share their class's cached answer) and
nothing else.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.allocator import allocate
from app.allocator_ledger import Ledger
from app.allocator_pass import Pass
from app.models import (
    AllocationResult,
    GpuSnapshot,
    HostSnapshot,
    Policy,
    QueuedJob,
    Requirement,
    RunningJob,
)
from tests.test_allocator import NOW, machines, policies


def one_by_one(
    queue: list[QueuedJob],
    gpus: list[GpuSnapshot],
    running: list[RunningJob],
    paused: set[int],
    policy: Policy,
    host: HostSnapshot | None,
) -> AllocationResult:
    result = AllocationResult()
    walker = Pass(Ledger(gpus, running, frozenset(paused), policy, NOW, host), result)
    done: set[int] = set()
    for job in sorted(queue, key=lambda j: (j.priority, j.seq, j.id)):
        if job.id not in done:
            done.add(job.id)
            walker.visit(job)
    return result


#: A few classes, so a queue has many jobs of each (what the bulk answers are for).
CLASSES = [
    (Requirement(0.5), None),
    (Requirement(1.0), None),
    (Requirement(0.25, vram_mb=4_000), (0, 1)),
    (Requirement(2.0), None),
    (Requirement(1.0, ram_mb=8_000), None),
    (Requirement(0.5, vram_mb=30_000, ram_mb=2_000), (1, 2, 3)),
    (Requirement(4.0), (0, 1, 2, 3, 4)),
]


@st.composite
def long_queues(draw: st.DrawFn) -> list[QueuedJob]:
    jobs = []
    for job_id in range(draw(st.integers(0, 80))):
        req, allowed = draw(st.sampled_from(CLASSES))
        jobs.append(
            QueuedJob(
                draw(st.integers(0, job_id)) if draw(st.integers(0, 30)) == 0 else job_id,
                draw(st.integers(0, 2)),
                draw(st.integers(0, 200)),
                req,
                allowed,
                NOW - draw(st.sampled_from([0.0, 50.0, 400.0, 5_000.0])),
            )
        )
    return jobs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    machines(),
    long_queues(),
    policies,
    st.sampled_from(["share", "exclusive", "memory", "detected"]),
    st.none() | st.integers(0, 12),
    st.none() | st.integers(0, 40_000),
)
def test_bulk_answers_equal_visiting_every_job(
    machine: tuple[list[GpuSnapshot], list[RunningJob], set[int]],
    queue: list[QueuedJob],
    policy: Policy,
    mode: str,
    max_workers: int | None,
    ram_free: int | None,
) -> None:
    gpus, running, paused = machine
    policy = dataclasses.replace(policy, mode=mode, max_workers=max_workers)
    host = None if ram_free is None else HostSnapshot(32_000, min(ram_free, 32_000))
    expected = one_by_one(queue, gpus, running, paused, policy, host)
    got = allocate(queue, gpus, running, paused, policy, NOW, host=host)
    assert got.placements == expected.placements
    assert got.unschedulable == expected.unschedulable
    assert got.reasons == expected.reasons
