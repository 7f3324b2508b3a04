"""Tests for app.allocator: one test per rule, then property tests over random machines."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

NOW = 10_000.0
TOTAL = 24_000


def gpu(index: int, used: int = 0, util: float = 0.0, total: int = TOTAL) -> GpuSnapshot:
    return GpuSnapshot(index, f"GPU{index}", total, used, util)


def qjob(
    job_id: int,
    amount: float,
    *,
    priority: int = 5,
    seq: int | None = None,
    allowed: tuple[int, ...] | None = None,
    vram: int | None = None,
    waiting: float = 0.0,
) -> QueuedJob:
    seq = job_id if seq is None else seq
    return QueuedJob(job_id, priority, seq, Requirement(amount, vram), allowed, NOW - waiting)


def rjob(
    job_id: int, gpus: tuple[int, ...], share: float, vram: int | None = None, age: float = 1e6
) -> RunningJob:
    return RunningJob(job_id, gpus, share, vram, NOW - age)


def run(
    queue: list[QueuedJob],
    gpus: list[GpuSnapshot] | None,
    running: list[RunningJob] | None = None,
    paused: set[int] | None = None,
    policy: Policy | None = None,
) -> AllocationResult:
    return allocate(queue, gpus, running or [], paused or set(), policy or Policy(), NOW)


def placed(result: AllocationResult) -> dict[int, tuple[int, ...]]:
    return {p.job_id: p.gpus for p in result.placements}


# --- rule 1: order -------------------------------------------------------------------------


def test_priority_then_fcfs_order() -> None:
    queue = [qjob(1, 1, priority=5, seq=1), qjob(2, 1, priority=1, seq=2), qjob(3, 1, seq=0)]
    result = run(queue, [gpu(0)])
    assert placed(result) == {2: (0,)}
    assert set(result.reasons) == {1, 3}


def test_earlier_placements_count_for_later_jobs() -> None:
    result = run([qjob(1, 0.75), qjob(2, 0.5)], [gpu(0)])
    assert placed(result) == {1: (0,)}
    assert result.reasons[2] == "needs 0.5 GPU: GPU 0 share 0.75/1.0 used"


# --- rule 2 & 4: ledger and thresholds -------------------------------------------------------


def test_two_halves_share_a_busy_gpu_that_is_busy_with_our_job() -> None:
    running = [rjob(1, (0,), 0.5)]  # uses half the memory and all the compute
    result = run([qjob(2, 0.5)], [gpu(0, used=TOTAL // 2, util=1.0)], running)
    assert placed(result) == {2: (0,)}
    assert result.placements[0].share == 0.5


def test_two_halves_share_an_idle_gpu_in_one_call() -> None:
    result = run([qjob(1, 0.5), qjob(2, 0.5), qjob(3, 0.5)], [gpu(0)])
    assert placed(result) == {1: (0,), 2: (0,)}
    assert "share 1/1.0 used" in result.reasons[3]


def test_multi_gpu_job_gets_distinct_free_gpus() -> None:
    running = [rjob(1, (0,), 0.25)]
    result = run([qjob(2, 2)], [gpu(0), gpu(1), gpu(2), gpu(3)], running)
    assert placed(result) == {2: (1, 2)}
    assert result.placements[0].share == 1.0


def test_multi_gpu_reason_lists_each_gpu() -> None:
    running = [rjob(1, (0,), 0.5)]
    result = run([qjob(2, 2)], [gpu(0), gpu(1), gpu(2)], running, paused={1})
    assert result.reasons[2] == (
        "needs 2 GPUs with nothing of ours on them, 1 available "
        "(GPU 0 share 0.5/1.0 used; GPU 1 paused)"
    )


def test_external_memory_keeps_jobs_off() -> None:
    result = run([qjob(1, 0.25)], [gpu(0, used=int(TOTAL * 0.9))])
    assert placed(result) == {}
    assert result.reasons[1] == (
        "needs 0.25 GPU: GPU 0 memory 90% used by other processes (threshold 80%)"
    )


def test_external_memory_counts_even_when_we_share_the_gpu() -> None:
    # Our 0.1 job should use 2400 MB; the other 20000 MB belong to someone else.
    running = [rjob(1, (0,), 0.1)]
    result = run([qjob(2, 0.25)], [gpu(0, used=2400 + 20_000)], running)
    assert placed(result) == {}
    assert "used by other processes" in result.reasons[2]


def test_load_threshold_only_on_gpus_without_our_jobs() -> None:
    gpus = [gpu(0, util=0.95), gpu(1, util=0.95)]
    result = run([qjob(2, 0.25), qjob(3, 0.25)], gpus, [rjob(1, (1,), 0.25)])
    assert placed(result) == {2: (1,), 3: (1,)}
    blocked = run([qjob(2, 0.25)], [gpu(0, util=0.95)])
    assert blocked.reasons[2] == "needs 0.25 GPU: GPU 0 load 95% (threshold 80%)"


def test_full_reason_names_every_gpu_once() -> None:
    gpus = [gpu(0), gpu(1), gpu(2, used=int(TOTAL * 0.85)), gpu(3, util=0.95)]
    result = run([qjob(2, 0.5)], gpus, [rjob(1, (1,), 0.75)], paused={0})
    assert result.reasons[2] == (
        "needs 0.5 GPU: GPU 0 paused; GPU 1 share 0.75/1.0 used; "
        "GPU 2 memory 85% used by other processes (threshold 80%); "
        "GPU 3 load 95% (threshold 80%)"
    )


def test_gpus_with_the_same_problem_are_named_together() -> None:
    gpus = [gpu(i) for i in range(8)]
    result = run([qjob(1, 0.5)], gpus, paused={0, 1, 2, 3, 5, 6, 7}, running=[rjob(9, (4,), 1.0)])
    assert result.reasons[1] == "needs 0.5 GPU: GPUs 0-3, 5-7 paused; GPU 4 share 1/1.0 used"


# --- rule 3: paused / allowed / existing --------------------------------------------------------


def test_paused_gpu_is_never_used() -> None:
    result = run([qjob(1, 0.5), qjob(2, 0.5), qjob(3, 0.5)], [gpu(0), gpu(1)], paused={0})
    assert placed(result) == {1: (1,), 2: (1,)}
    assert result.reasons[3].startswith("needs 0.5 GPU: GPU 0 paused")


def test_allowed_gpus_respected_and_nonexistent_ignored() -> None:
    result = run([qjob(1, 1, allowed=(1, 7)), qjob(2, 1, allowed=(1,))], [gpu(0), gpu(1)])
    assert placed(result) == {1: (1,)}
    assert result.reasons[2] == "needs 1 GPU: GPU 1 share 1/1.0 used"


# --- rule 5: declared memory and ramp-up -------------------------------------------------------


def test_declared_vram_blocks_during_ramp_up_only() -> None:
    queue = [qjob(2, 0.5, vram=10_000)]
    ramping = [rjob(1, (0,), 0.5, vram=16_000, age=5)]
    # The first job has not allocated yet: the probe still sees 2000 MB used.
    blocked = run(queue, [gpu(0, used=2000)], ramping)
    assert blocked.reasons[2] == "needs 0.5 GPU with 10000 MB free: GPU 0 has 6000 MB free"
    settled = [rjob(1, (0,), 0.5, vram=16_000, age=60)]
    assert placed(run(queue, [gpu(0, used=2000)], settled)) == {2: (0,)}


def test_placement_in_this_call_counts_as_ramping() -> None:
    queue = [qjob(1, 0.5, vram=16_000), qjob(2, 0.5, vram=10_000)]
    result = run(queue, [gpu(0, used=2000)])
    assert placed(result) == {1: (0,)}
    assert "has 6000 MB free" in result.reasons[2]


def test_undeclared_memory_counts_as_share_while_ramping() -> None:
    # The 0.5 job just started and counts 12000 MB; a declared 13000 MB job must wait.
    result = run([qjob(1, 0.5), qjob(2, 0.5, vram=13_000)], [gpu(0)])
    assert placed(result) == {1: (0,)}
    assert "has 12000 MB free" in result.reasons[2]


# --- rule 6: packing ---------------------------------------------------------------------------


def test_pack_puts_small_job_on_shared_gpu() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    result = run([qjob(2, 0.25)], gpus, [rjob(1, (1,), 0.5)])
    assert placed(result) == {2: (1,)}


def test_pack_prefers_fullest_gpu_that_fits() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    running = [rjob(1, (0,), 0.5), rjob(2, (1,), 0.8)]
    assert placed(run([qjob(3, 0.25)], gpus, running)) == {3: (0,)}
    assert placed(run([qjob(3, 0.2)], gpus, running)) == {3: (1,)}


def test_spread_uses_least_used_gpu() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    result = run(
        [qjob(2, 0.25), qjob(3, 0.25)],
        gpus,
        [rjob(1, (0,), 0.5)],
        policy=Policy(placement="spread"),
    )
    assert placed(result) == {2: (1,), 3: (2,)}


def test_multi_gpu_takes_lowest_indexes() -> None:
    result = run([qjob(1, 3)], [gpu(i) for i in range(6)], paused={1})
    assert placed(result) == {1: (0, 2, 3)}


# --- rule 7: unschedulable ----------------------------------------------------------------------


def test_unschedulable_too_many_gpus() -> None:
    result = run([qjob(1, 4, allowed=(0, 1, 9))], [gpu(0), gpu(1), gpu(2)])
    assert result.unschedulable == {1: "needs 4 GPUs but only 2 allowed (GPUs 0-1)"}
    assert result.reasons == {}


def test_unschedulable_no_allowed_gpu_exists() -> None:
    result = run([qjob(1, 0.5, allowed=(5, 6))], [gpu(0), gpu(1)])
    assert result.unschedulable == {1: "allowed GPUs 5-6: not among the scheduler's GPUs 0-1"}


def test_unschedulable_vram_larger_than_any_gpu() -> None:
    result = run([qjob(1, 0.5, vram=40_960)], [gpu(0), gpu(1, total=32_000)])
    assert result.unschedulable == {
        1: "needs 40960 MB of GPU memory but the largest allowed GPU has 32000 MB"
    }


def test_paused_gpus_do_not_make_a_job_unschedulable() -> None:
    result = run([qjob(1, 2)], [gpu(0), gpu(1)], paused={0, 1})
    assert result.unschedulable == {}
    assert result.reasons[1].endswith("0 available (GPUs 0-1 paused)")


def test_unschedulable_does_not_block_strict_order() -> None:
    queue = [qjob(1, 4), qjob(2, 0.5)]
    result = run(queue, [gpu(0)], policy=Policy(backfill=False))
    assert 1 in result.unschedulable
    assert placed(result) == {2: (0,)}


# --- rule 8 & 9: reasons, backfill -------------------------------------------------------------


def test_backfill_lets_small_job_pass_blocked_big_job() -> None:
    gpus = [gpu(i) for i in range(4)]
    queue = [qjob(2, 4, priority=0), qjob(3, 0.5, priority=1)]
    result = run(queue, gpus, [rjob(1, (0,), 0.5)])
    assert placed(result) == {3: (0,)}
    assert result.reasons[2].startswith("needs 4 GPUs with nothing of ours on them, 3 available")


def test_no_backfill_keeps_strict_order() -> None:
    gpus = [gpu(i) for i in range(4)]
    queue = [qjob(2, 4, priority=0), qjob(3, 0.5, priority=1), qjob(4, 0.5, priority=2)]
    result = run(queue, gpus, [rjob(1, (0,), 0.5)], policy=Policy(backfill=False))
    assert placed(result) == {}
    assert result.reasons[3] == "behind job 2"
    assert result.reasons[4] == "behind job 2"


# --- rule 10: starvation ------------------------------------------------------------------------


def test_starving_multi_gpu_job_holds_least_used_gpus() -> None:
    gpus = [gpu(i) for i in range(4)]
    running = [rjob(1, (0,), 0.5), rjob(2, (2,), 0.25)]
    queue = [qjob(3, 3, priority=0, waiting=400), qjob(4, 0.25, priority=1)]
    result = run(queue, gpus, running)
    # GPUs 1 and 3 are empty, GPU 2 is the least used busy one: those three are held.
    assert result.reasons[3].endswith("; GPUs 1-3 held for it")
    assert placed(result) == {4: (0,)}


def test_hold_blocks_later_jobs_with_reason() -> None:
    gpus = [gpu(0), gpu(1)]
    queue = [qjob(2, 2, priority=0, waiting=400), qjob(3, 0.25, priority=1)]
    result = run(queue, gpus, [rjob(1, (0,), 0.5)])
    assert placed(result) == {}
    assert result.reasons[3] == ("needs 0.25 GPU: GPUs 0-1 held for job 2 (waiting 400s)")


def test_no_hold_before_starvation() -> None:
    gpus = [gpu(0), gpu(1)]
    queue = [qjob(2, 2, priority=0, waiting=100), qjob(3, 0.25, priority=1)]
    result = run(queue, gpus, [rjob(1, (0,), 0.5)])
    assert placed(result) == {3: (0,)}


def test_starving_fractional_job_holds_gpu_with_most_free_share() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    running = [rjob(1, (0,), 0.8), rjob(2, (1,), 0.5), rjob(3, (2,), 0.5)]
    queue = [qjob(4, 0.75, priority=0, waiting=400), qjob(5, 0.25, priority=1)]
    result = run(queue, gpus, running)
    assert result.reasons[4].endswith("; GPU 1 held for it")
    assert placed(result) == {5: (2,)}  # GPU 1 would be the best fit but is held


def test_holds_accumulate() -> None:
    gpus = [gpu(i) for i in range(3)]
    running = [rjob(1, (0,), 0.5), rjob(2, (1,), 0.75), rjob(3, (2,), 0.9)]
    queue = [
        qjob(4, 0.75, priority=0, waiting=500, allowed=(0,)),
        qjob(5, 0.75, priority=0, waiting=400, allowed=(1,)),
        qjob(6, 0.1, priority=1),
        qjob(7, 0.25, priority=1, allowed=(0, 1)),
    ]
    result = run(queue, gpus, running)
    assert placed(result) == {6: (2,)}
    assert result.reasons[7] == (
        "needs 0.25 GPU: GPU 0 held for job 4 (waiting 500s); GPU 1 held for job 5 (waiting 400s)"
    )


def test_one_hold_at_a_time_on_a_gpu() -> None:
    # Both starve and either could use any GPU: the first holds one, the second waits its turn
    # (holding for every starving job of a long queue would idle the whole machine).
    gpus = [gpu(0), gpu(1)]
    running = [rjob(1, (0,), 0.5), rjob(2, (1,), 0.5)]
    queue = [qjob(3, 1, priority=0, waiting=500), qjob(4, 1, priority=0, waiting=400)]
    result = run(queue, gpus, running)
    assert result.reasons[3].endswith("held for it")
    assert "held for it" not in result.reasons[4]
    assert "held for job 3 (waiting 500s)" in result.reasons[4]


def test_hold_takes_the_gpus_whose_jobs_have_run_the_shortest() -> None:
    # Without run times, a job that has run for hours is the likeliest to run for hours more.
    gpus = [gpu(0), gpu(1), gpu(2)]
    running = [rjob(1, (0,), 0.25, age=36000), rjob(2, (1,), 0.5, age=60), rjob(3, (2,), 0.25)]
    queue = [qjob(4, 1, priority=0, waiting=400), qjob(5, 0.25, priority=1)]
    result = run(queue, gpus, running)
    assert result.reasons[4].endswith("; GPU 1 held for it")
    assert placed(result) == {5: (0,)}  # the fullest GPU that is not held: best fit


# --- probe failure -----------------------------------------------------------------------------


def test_probe_failure_places_nothing() -> None:
    queue = [qjob(1, 0.5), qjob(2, 8)]
    result = allocate(queue, None, [], set(), Policy(), NOW, "nvidia-smi not found")
    assert result.placements == []
    assert result.unschedulable == {}
    assert result.reasons == {1: "GPUs unknown: nvidia-smi not found", 2: result.reasons[1]}


# --- properties ---------------------------------------------------------------------------------

AMOUNTS = [0.1, 0.25, 0.5, 1, 2, 3, 4]


@st.composite
def machines(draw: st.DrawFn) -> tuple[list[GpuSnapshot], list[RunningJob], set[int]]:
    ids = draw(st.lists(st.integers(0, 9), min_size=1, max_size=8, unique=True))
    gpus = []
    for i in ids:
        total = draw(st.integers(1_000, 80_000))
        used = draw(st.integers(0, total))
        gpus.append(GpuSnapshot(i, "g", total, used, draw(st.floats(0, 1))))
    ledger: dict[int, float] = defaultdict(float)
    running = []
    for job_id in range(1000, 1000 + draw(st.integers(0, 10))):
        share = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0]))
        on = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
        on = on if share == 1.0 else on[:1]
        if all(ledger[g] + share <= 1.0 + 1e-9 for g in on):
            for g in on:
                ledger[g] += share
            vram = draw(st.none() | st.integers(100, 40_000))
            running.append(RunningJob(job_id, tuple(on), share, vram, draw(st.floats(0, NOW))))
    paused = draw(st.sets(st.integers(0, 10), max_size=4))
    return gpus, running, paused


@st.composite
def queues(draw: st.DrawFn) -> list[QueuedJob]:
    jobs = []
    for job_id in range(draw(st.integers(0, 25))):
        amount = draw(st.sampled_from(AMOUNTS))
        allowed = draw(st.none() | st.lists(st.integers(0, 10), max_size=5).map(tuple))
        vram = draw(st.none() | st.integers(500, 90_000))
        jobs.append(
            QueuedJob(
                job_id,
                draw(st.integers(0, 3)),
                draw(st.integers(0, 1000)),
                Requirement(amount, vram),
                allowed,
                NOW - draw(st.floats(0, 1000)),
            )
        )
    return jobs


policies = st.builds(
    Policy,
    mem_threshold=st.floats(0.1, 1.0),
    load_threshold=st.floats(0.1, 1.0),
    ramp_up_s=st.floats(0, 100),
    starvation_s=st.floats(0, 2000),
    backfill=st.booleans(),
    placement=st.sampled_from(PLACEMENTS),
)


def check_invariants(
    queue: list[QueuedJob],
    gpus: list[GpuSnapshot],
    running: list[RunningJob],
    paused: set[int],
    result: AllocationResult,
) -> None:
    existing = {g.index for g in gpus}
    ledger: dict[int, float] = defaultdict(float)
    for rj in running:
        for g in rj.gpus:
            ledger[g] += rj.share
    by_id = {job.id: job for job in queue}
    seen: set[int] = set()
    for p in result.placements:
        job = by_id[p.job_id]
        assert p.job_id not in seen
        seen.add(p.job_id)
        assert len(p.gpus) == len(set(p.gpus)) == job.requirement.gpu_count
        assert p.share == job.requirement.share
        for g in p.gpus:
            assert g in existing
            assert g not in paused
            assert job.allowed_gpus is None or g in job.allowed_gpus
            if job.requirement.gpu_count > 1:  # nothing of ours, this call's placements included
                assert ledger[g] == 0.0
            ledger[g] += p.share
    assert all(share <= 1.0 + 1e-9 for share in ledger.values())
    for job in queue:
        homes = (job.id in seen, job.id in result.reasons, job.id in result.unschedulable)
        assert sum(homes) == 1
    assert len(result.reasons) + len(result.unschedulable) + len(seen) == len(queue)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), queues(), policies)
def test_invariants_hold_on_random_machines(
    machine: tuple[list[GpuSnapshot], list[RunningJob], set[int]],
    queue: list[QueuedJob],
    policy: Policy,
) -> None:
    gpus, running, paused = machine
    result = allocate(queue, gpus, running, paused, policy, NOW)
    check_invariants(queue, gpus, running, paused, result)
    again = allocate(list(queue), list(gpus), list(running), set(paused), policy, NOW)
    assert again == result


@settings(max_examples=50, deadline=None)
@given(machines(), queues(), st.text(max_size=20))
def test_probe_failure_explains_every_job(
    machine: tuple[list[GpuSnapshot], list[RunningJob], set[int]],
    queue: list[QueuedJob],
    error: str,
) -> None:
    _, running, paused = machine
    result = allocate(queue, None, running, paused, Policy(), NOW, error)
    assert result.placements == []
    assert result.unschedulable == {}
    assert set(result.reasons) == {job.id for job in queue}


def test_ten_thousand_jobs_on_eight_gpus() -> None:
    gpus = [gpu(i, used=1000 * i, util=0.1 * i) for i in range(8)]
    running = [rjob(90_000, (0,), 0.5), rjob(90_001, (1, 2), 1.0)]
    queue = [
        qjob(
            i,
            AMOUNTS[i % len(AMOUNTS)],
            priority=i % 4,
            allowed=None if i % 3 else (i % 8, (i + 1) % 8),
            vram=None if i % 5 else 1000 * (i % 30),
            waiting=float(i % 700),
        )
        for i in range(10_000)
    ]
    for policy in (Policy(), Policy(backfill=False), Policy(placement="spread", starvation_s=1e9)):
        result = allocate(queue, gpus, running, {7}, policy, NOW)
        check_invariants(queue, gpus, running, {7}, result)
        assert result.placements or policy.backfill is False


def test_gpu_held_by_earlier_job_is_not_reported_as_held_for_later_one() -> None:
    queue = [qjob(2, 0.75, allowed=(0,), waiting=500), qjob(3, 0.75, allowed=(0,), waiting=400)]
    result = run(queue, [gpu(0), gpu(1)], [rjob(1, (0,), 0.5)])
    assert result.reasons[2].endswith("; GPU 0 held for it")
    assert result.reasons[3] == "needs 0.75 GPU: GPU 0 held for job 2 (waiting 500s)"
