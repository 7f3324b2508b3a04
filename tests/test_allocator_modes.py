"""Tests for allocation modes, worker and memory limits, host RAM and per-job ramp-up.

Hand-computed examples first (one GPU of 24000 MB unless said otherwise), then property tests
that replay every placement against each mode's own rule.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.allocator import allocate
from app.models import (
    ALLOCATION_MODES,
    PLACEMENTS,
    AllocationResult,
    GpuSnapshot,
    HostSnapshot,
    Policy,
    QueuedJob,
    Requirement,
    RequirementError,
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
    allowed: tuple[int, ...] | None = None,
    vram: int | None = None,
    ram: int | None = None,
    ramp: float | None = None,
    waiting: float = 0.0,
) -> QueuedJob:
    req = Requirement(amount, vram, ram_mb=ram, ramp_up_s=ramp)
    return QueuedJob(job_id, priority, job_id, req, allowed, NOW - waiting)


def rjob(
    job_id: int,
    gpus: tuple[int, ...],
    share: float,
    vram: int | None = None,
    *,
    age: float = 1e6,
    ram: int | None = None,
    ramp: float | None = None,
) -> RunningJob:
    return RunningJob(job_id, gpus, share, vram, NOW - age, ram_mb=ram, ramp_up_s=ramp)


def run(
    queue: list[QueuedJob],
    gpus: list[GpuSnapshot],
    running: list[RunningJob] | None = None,
    *,
    paused: set[int] | None = None,
    host: HostSnapshot | None = None,
    **policy: object,
) -> AllocationResult:
    pol = Policy(**policy)  # type: ignore[arg-type]
    return allocate(queue, gpus, running or [], paused or set(), pol, NOW, host=host)


def placed(result: AllocationResult) -> dict[int, tuple[int, ...]]:
    return {p.job_id: p.gpus for p in result.placements}


def shares(result: AllocationResult) -> dict[int, float]:
    return {p.job_id: p.share for p in result.placements}


# --- models --------------------------------------------------------------------------------------


def test_new_fields_default_to_todays_behaviour() -> None:
    assert Requirement(0.5) == Requirement(0.5, None, ram_mb=None, ramp_up_s=None)
    assert str(Requirement(0.5, 1000, ram_mb=8192, ramp_up_s=60)) == "0.5 GPU"
    assert RunningJob(1, (0,), 0.5, None, 0.0).ram_mb is None
    policy = Policy()
    assert (policy.mode, policy.max_workers, policy.min_free_mem_mb) == ("share", None, 0)
    assert (policy.max_ram, policy.max_vram) == (None, None)
    assert ALLOCATION_MODES == ("share", "exclusive", "memory", "detected")


@pytest.mark.parametrize(
    "kwargs",
    [{"ram_mb": -1}, {"ramp_up_s": -1.0}, {"ramp_up_s": math.nan}, {"ramp_up_s": math.inf}],
)
def test_requirement_rejects_bad_ram_and_ramp_up(kwargs: dict[str, float]) -> None:
    with pytest.raises(RequirementError):
        Requirement(0.5, **kwargs)  # type: ignore[arg-type]


def test_policy_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="allocation mode 'greedy' is not one of share, exclusive"):
        Policy(mode="greedy")


def test_host_snapshot_is_frozen() -> None:
    host = HostSnapshot(ram_total_mb=64_000, ram_available_mb=40_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.ram_total_mb = 1  # type: ignore[misc]


# --- exclusive -----------------------------------------------------------------------------------


def test_exclusive_gives_each_fractional_job_a_whole_gpu() -> None:
    result = run([qjob(1, 0.25), qjob(2, 0.25), qjob(3, 0.25)], [gpu(0), gpu(1)], mode="exclusive")
    assert placed(result) == {1: (0,), 2: (1,)}
    assert shares(result) == {1: 1.0, 2: 1.0}
    assert result.reasons[3] == "needs 1 GPU (exclusive mode): GPUs 0-1 share 1/1.0 used"


def test_exclusive_gpu_with_any_job_of_ours_is_taken() -> None:
    # A 0.25 job left from share mode still occupies GPU 0.
    result = run(
        [qjob(2, 1), qjob(3, 0.5)], [gpu(0), gpu(1)], [rjob(1, (0,), 0.25)], mode="exclusive"
    )
    assert placed(result) == {2: (1,)}
    assert result.reasons[3] == (
        "needs 1 GPU (exclusive mode): GPU 0 share 0.25/1.0 used; GPU 1 share 1/1.0 used"
    )


def test_exclusive_multi_gpu_job_takes_whole_gpus() -> None:
    result = run([qjob(2, 2)], [gpu(i) for i in range(4)], [rjob(1, (0,), 1.0)], mode="exclusive")
    assert placed(result) == {2: (1, 2)}
    assert shares(result) == {2: 1.0}


# --- memory --------------------------------------------------------------------------------------


def test_memory_mode_shares_by_declared_memory_not_by_share() -> None:
    # Two "whole GPU" jobs that declare 10000 MB each fit one 24000 MB GPU; a third does not.
    queue = [qjob(1, 1, vram=10_000), qjob(2, 1, vram=10_000), qjob(3, 0.1, vram=5_000)]
    result = run(queue, [gpu(0)], mode="memory")
    assert placed(result) == {1: (0,), 2: (0,)}
    assert shares(result) == {1: 10_000 / TOTAL, 2: 10_000 / TOTAL}
    assert result.reasons[3] == "needs 5000 MB on 1 GPU: GPU 0 20000/24000 MB declared"


def test_memory_mode_counts_settled_jobs_by_declaration() -> None:
    # The running job declared 16000 MB but the probe only sees 3000 MB: the declaration counts.
    running = [rjob(1, (0,), 0.5, vram=16_000)]
    result = run(
        [qjob(2, 0.1, vram=9000), qjob(3, 0.1, vram=8000)],
        [gpu(0, used=3000)],
        running,
        mode="memory",
    )
    assert placed(result) == {3: (0,)}
    assert result.reasons[2] == "needs 9000 MB on 1 GPU: GPU 0 16000/24000 MB declared"


def test_memory_mode_leaves_room_for_other_processes() -> None:
    result = run([qjob(1, 0.5, vram=20_000)], [gpu(0, used=6000)], mode="memory")
    assert result.reasons[1] == (
        "needs 20000 MB on 1 GPU: GPU 0 0/24000 MB declared + 6000 MB used by other processes"
    )
    assert placed(run([qjob(1, 0.5, vram=18_000)], [gpu(0, used=6000)], mode="memory")) == {1: (0,)}


def test_memory_mode_undeclared_running_job_fills_its_gpu() -> None:
    result = run(
        [qjob(2, 0.1, vram=100)],
        [gpu(0), gpu(1)],
        [rjob(1, (0,), 0.25)],
        mode="memory",
        placement="pack",
    )
    assert placed(result) == {2: (1,)}
    blocked = run([qjob(2, 0.1, vram=100)], [gpu(0)], [rjob(1, (0,), 0.25)], mode="memory")
    assert blocked.reasons[2] == "needs 100 MB on 1 GPU: GPU 0 24000/24000 MB declared"


def test_memory_mode_undeclared_job_needs_a_gpu_without_our_jobs() -> None:
    running = [rjob(1, (0,), 0.1, vram=1000)]
    result = run(
        [qjob(2, 0.25), qjob(3, 0.25)], [gpu(0, used=1000), gpu(1)], running, mode="memory"
    )
    assert placed(result) == {2: (1,)}
    assert shares(result) == {2: 1.0}
    assert result.reasons[3] == (
        "needs 1 GPU with nothing of ours on it (no GPU memory declared): "
        "GPUs 0-1 runs 1 job of ours"
    )


def test_memory_mode_multi_gpu_job_needs_gpus_without_our_jobs() -> None:
    running = [rjob(1, (0,), 0.1, vram=1000)]
    gpus = [gpu(0, used=1000), gpu(1), gpu(2, total=48_000)]
    result = run([qjob(2, 2, vram=12_000)], gpus, running, mode="memory")
    assert placed(result) == {2: (1, 2)}
    assert shares(result) == {2: 0.5}  # of the smaller chosen GPU
    blocked = run([qjob(2, 3, vram=12_000)], gpus, running, mode="memory")
    assert blocked.reasons[2] == (
        "needs 3 GPUs with nothing of ours on them and 12000 MB free each, 2 available "
        "(GPU 0 runs 1 job of ours)"
    )


def test_memory_mode_packs_onto_the_fullest_declared_gpu() -> None:
    running = [rjob(1, (0,), 0.5, vram=4000), rjob(2, (1,), 0.5, vram=12_000)]
    gpus = [gpu(0, used=4000), gpu(1, used=12_000), gpu(2)]
    assert placed(run([qjob(3, 0.5, vram=8000)], gpus, running, mode="memory")) == {3: (1,)}
    spread = run([qjob(3, 0.5, vram=8000)], gpus, running, mode="memory", placement="spread")
    assert placed(spread) == {3: (2,)}


def test_memory_mode_starving_job_holds_the_least_declared_gpu() -> None:
    running = [rjob(1, (0,), 0.5, vram=20_000), rjob(2, (1,), 0.5, vram=16_000)]
    gpus = [gpu(0, used=20_000), gpu(1, used=16_000)]
    queue = [
        qjob(3, 0.5, vram=10_000, priority=0, waiting=400),
        qjob(4, 0.1, vram=1000, priority=1),
    ]
    result = run(queue, gpus, running, mode="memory")
    assert result.reasons[3].endswith("; GPU 1 held for it")
    assert placed(result) == {4: (0,)}


# --- detected ------------------------------------------------------------------------------------


def test_detected_mode_places_by_reported_free_memory() -> None:
    gpus = [gpu(0, used=12_000), gpu(1, used=4000)]
    queue = [qjob(1, 0.25, vram=16_000), qjob(2, 0.25, vram=8000), qjob(3, 0.25, vram=8000)]
    result = run(queue, gpus, mode="detected")
    # Job 1 reserves 16000 MB on GPU 1 while it ramps up; job 2 then only fits GPU 0.
    assert placed(result) == {1: (1,), 2: (0,)}
    assert result.reasons[3] == ("needs 0.25 GPU with 8000 MB free: GPUs 0-1 has 4000 MB free")


def test_detected_mode_has_no_share_ledger() -> None:
    queue = [qjob(i, 0.5, vram=6000) for i in range(1, 6)]
    result = run(queue, [gpu(0)], mode="detected")
    assert placed(result) == {1: (0,), 2: (0,), 3: (0,), 4: (0,)}  # four halves on one GPU
    assert result.reasons[5] == "needs 0.5 GPU with 6000 MB free: GPU 0 has 0 MB free"


def test_detected_mode_reserves_placements_even_without_ramp_up() -> None:
    queue = [qjob(1, 0.5, vram=16_000), qjob(2, 0.5, vram=16_000)]
    result = run(queue, [gpu(0)], mode="detected", ramp_up_s=0.0)
    assert placed(result) == {1: (0,)}
    assert result.reasons[2] == "needs 0.5 GPU with 16000 MB free: GPU 0 has 8000 MB free"


def test_detected_mode_uses_min_free_mem_when_nothing_is_declared() -> None:
    result = run([qjob(1, 0.5)], [gpu(0, used=16_000)], mode="detected", min_free_mem_mb=10_000)
    assert result.reasons[1] == (
        "needs 0.5 GPU with 10000 MB free: GPU 0 has 8000 MB free (min 10000)"
    )
    assert placed(
        run([qjob(1, 0.5)], [gpu(0, used=14_000)], mode="detected", min_free_mem_mb=10_000)
    ) == {1: (0,)}


def test_detected_mode_falls_back_to_the_share_of_memory() -> None:
    result = run([qjob(1, 0.5), qjob(2, 0.25)], [gpu(0, used=14_000)], mode="detected")
    # 0.5 of 24000 MB = 12000 MB wanted, 10000 free; 0.25 wants 6000 and fits.
    assert placed(result) == {2: (0,)}
    assert result.reasons[1] == "needs 0.5 GPU: GPU 0 has 10000 MB free, needs 12000"


def test_detected_mode_multi_gpu_job_needs_gpus_without_our_jobs() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    running = [rjob(1, (0,), 0.1, vram=100)]
    result = run([qjob(2, 2, vram=20_000)], gpus, running, mode="detected")
    assert placed(result) == {2: (1, 2)}
    # Undeclared, a 2-GPU job wants both GPUs' whole memory free.
    blocked = run([qjob(2, 2)], [gpu(0), gpu(1, used=300), gpu(2)], running, mode="detected")
    assert blocked.reasons[2] == (
        "needs 2 GPUs with nothing of ours on them and all their memory free, 1 available "
        "(GPU 0 runs 1 job of ours; GPU 1 has 23700 MB free, needs 24000)"
    )


# --- limits in every mode ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALLOCATION_MODES)
def test_max_workers_counts_running_and_placed_jobs(mode: str) -> None:
    gpus = [gpu(i) for i in range(4)]
    queue = [qjob(2, 1, vram=1000), qjob(3, 1, vram=1000), qjob(4, 8), qjob(5, 1)]
    result = run(queue, gpus, [rjob(1, (0,), 1.0, vram=1000)], mode=mode, max_workers=2)
    assert len(result.placements) == 1
    assert result.unschedulable == {4: "needs 8 GPUs but only 4 allowed (GPUs 0-3)"}
    assert result.reasons == {3: "max workers (2) running", 5: "max workers (2) running"}


def test_max_workers_zero_starts_nothing() -> None:
    result = run([qjob(1, 0.5)], [gpu(0)], max_workers=0, backfill=False)
    assert result.reasons == {1: "max workers (0) running"}


def test_max_workers_reached_holds_no_gpus() -> None:
    queue = [qjob(2, 0.5, waiting=1000), qjob(3, 0.5)]
    result = run(queue, [gpu(0)], [rjob(1, (0,), 0.5)], max_workers=1, starvation_s=10)
    assert result.reasons == {2: "max workers (1) running", 3: "max workers (1) running"}


@pytest.mark.parametrize("mode", ALLOCATION_MODES)
def test_min_free_mem_keeps_full_gpus_from_new_jobs(mode: str) -> None:
    gpus = [gpu(0, used=17_000), gpu(1, used=1000), gpu(2, used=21_000)]
    queue = [qjob(1, 0.25, allowed=(0, 2), vram=1000), qjob(2, 0.25, vram=1000)]
    result = run(queue, gpus, mode=mode, min_free_mem_mb=8000, mem_threshold=0.95)
    assert placed(result) == {2: (1,)}
    assert result.reasons[1].endswith(
        ": GPU 0 has 7000 MB free (min 8000); GPU 2 has 3000 MB free (min 8000)"
    )


def test_min_free_mem_counts_ramp_up_reservations() -> None:
    ramping = [rjob(1, (0,), 0.5, age=5)]  # 12000 MB reserved, not yet seen by the probe
    result = run([qjob(2, 0.25)], [gpu(0)], ramping, min_free_mem_mb=13_000)
    assert result.reasons[2] == "needs 0.25 GPU: GPU 0 has 12000 MB free (min 13000)"
    assert placed(run([qjob(2, 0.25)], [gpu(0)], ramping, min_free_mem_mb=12_000)) == {2: (0,)}


def test_max_vram_caps_memory_in_use_with_the_new_job() -> None:
    queue = [qjob(1, 0.25, vram=6000), qjob(2, 0.25, vram=6000)]
    result = run(queue, [gpu(0, used=4000)], max_vram=0.5)
    # 4000 + 6000 <= 12000; then 4000 + 6000 (ramping) + 6000 = 16000 = 67% > 50%.
    assert placed(result) == {1: (0,)}
    assert result.reasons[2] == (
        "needs 0.25 GPU with 6000 MB free: GPU 0 memory would reach 67% (max_vram 0.5)"
    )


def test_max_vram_counts_an_undeclared_job_as_its_share() -> None:
    result = run([qjob(1, 0.5)], [gpu(0, used=1000)], max_vram=0.5)
    assert result.reasons[1] == "needs 0.5 GPU: GPU 0 memory would reach 54% (max_vram 0.5)"
    assert placed(run([qjob(1, 0.5)], [gpu(0)], max_vram=0.5)) == {1: (0,)}


@pytest.mark.parametrize(
    ("mode", "job", "reason"),
    [
        (
            "share",
            qjob(1, 1),
            "counts as a whole GPU's memory but max_vram is 0.5 "
            "(declare its GPU memory or raise max_vram)",
        ),
        (
            "exclusive",
            qjob(1, 0.25),
            "counts as a whole GPU's memory but max_vram is 0.5 "
            "(declare its GPU memory or raise max_vram)",
        ),
        (
            "detected",
            qjob(1, 0.75),
            "counts as 0.75 of a GPU's memory but max_vram is 0.5 "
            "(declare its GPU memory or raise max_vram)",
        ),
        (
            "memory",
            qjob(1, 0.5, vram=20_000),
            "needs 20000 MB of GPU memory but max_vram 0.5 allows at most 16000 MB "
            "on any allowed GPU",
        ),
        (
            "share",
            qjob(1, 2, vram=14_000),
            "needs 2 GPUs with 14000 MB each but max_vram 0.5 allows that on only 1 allowed GPUs",
        ),
    ],
)
def test_max_vram_beyond_every_gpu_is_unschedulable(mode: str, job: QueuedJob, reason: str) -> None:
    result = run([job], [gpu(0), gpu(1, total=32_000)], mode=mode, max_vram=0.5)
    assert result.unschedulable == {1: reason}


# --- host RAM ------------------------------------------------------------------------------------


def test_job_waits_for_host_ram() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=4000)
    result = run([qjob(1, 0.5, ram=8192)], [gpu(0)], host=host)
    assert result.reasons == {1: "needs 8192 MB RAM, 4000 MB available"}


def test_ram_of_jobs_placed_now_is_reserved() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=10_000)
    queue = [qjob(1, 0.25, ram=8192), qjob(2, 0.25, ram=8192), qjob(3, 0.25, ram=1000)]
    result = run(queue, [gpu(0)], host=host)
    assert placed(result) == {1: (0,), 3: (0,)}
    assert result.reasons[2] == (
        "needs 8192 MB RAM, 1808 MB available (8192 MB reserved for starting jobs)"
    )


def test_ramping_running_jobs_reserve_their_ram() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=10_000)
    queue = [qjob(2, 0.25, ram=8000)]
    ramping = [rjob(1, (0,), 0.25, age=5, ram=4000)]
    assert run(queue, [gpu(0)], ramping, host=host).reasons[2] == (
        "needs 8000 MB RAM, 6000 MB available (4000 MB reserved for starting jobs)"
    )
    settled = [rjob(1, (0,), 0.25, age=60, ram=4000)]  # the probe now sees its RAM
    assert placed(run(queue, [gpu(0)], settled, host=host)) == {2: (0,)}


def test_ram_is_ignored_without_a_host_snapshot() -> None:
    assert placed(run([qjob(1, 0.5, ram=10**9)], [gpu(0)])) == {1: (0,)}


def test_max_ram_caps_the_share_of_host_ram_in_use() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=20_000)  # 12000 MB in use
    result = run(
        [qjob(1, 0.25, ram=8000), qjob(2, 0.25, ram=4000)], [gpu(0)], host=host, max_ram=0.5
    )
    assert placed(result) == {2: (0,)}
    assert result.reasons[1] == "needs 8000 MB RAM, max_ram 0.5 leaves 4000 MB"


def test_jobs_without_declared_ram_pass_max_ram() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=1000)
    assert placed(run([qjob(1, 0.5)], [gpu(0)], host=host, max_ram=0.5)) == {1: (0,)}


@pytest.mark.parametrize(
    ("ram", "max_ram", "reason"),
    [
        (40_000, None, "needs 40000 MB of RAM but this machine has 32000 MB"),
        (
            20_000,
            0.5,
            "needs 20000 MB of RAM but max_ram 0.5 allows at most 16000 MB "
            "of this machine's 32000 MB",
        ),
    ],
)
def test_ram_beyond_the_host_is_unschedulable(ram: int, max_ram: float | None, reason: str) -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=32_000)
    result = run([qjob(1, 0.5, ram=ram)], [gpu(0)], host=host, max_ram=max_ram)
    assert result.unschedulable == {1: reason}


def test_job_waiting_for_ram_holds_no_gpus_and_lets_others_pass() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=4000)
    queue = [qjob(1, 0.5, ram=8000, priority=0, waiting=1000), qjob(2, 0.5, priority=1)]
    result = run(queue, [gpu(0)], host=host)
    assert result.reasons == {1: "needs 8000 MB RAM, 4000 MB available"}
    assert placed(result) == {2: (0,)}


def test_jobs_differing_only_in_ram_get_their_own_answer() -> None:
    host = HostSnapshot(ram_total_mb=32_000, ram_available_mb=4000)
    queue = [qjob(1, 0.25, ram=8000), qjob(2, 0.25, ram=1000), qjob(3, 0.25, ram=8000)]
    result = run(queue, [gpu(0)], host=host)
    assert placed(result) == {2: (0,)}
    assert result.reasons[3] == (
        "needs 8000 MB RAM, 3000 MB available (1000 MB reserved for starting jobs)"
    )


# --- per-job ramp-up -----------------------------------------------------------------------------


def test_running_job_ramp_up_overrides_the_policy() -> None:
    queue = [qjob(2, 0.5, vram=10_000)]
    slow = [rjob(1, (0,), 0.5, vram=16_000, age=60, ramp=120)]  # policy says 30 s: still ramping
    assert run(queue, [gpu(0, used=2000)], slow).reasons[2] == (
        "needs 0.5 GPU with 10000 MB free: GPU 0 has 6000 MB free"
    )
    instant = [rjob(1, (0,), 0.5, vram=16_000, age=5, ramp=0)]
    assert placed(run(queue, [gpu(0, used=2000)], instant)) == {2: (0,)}


def test_placed_job_ramp_up_overrides_the_policy() -> None:
    no_ramp = [qjob(1, 0.5, vram=16_000, ramp=0), qjob(2, 0.5, vram=10_000)]
    assert placed(run(no_ramp, [gpu(0, used=2000)])) == {1: (0,), 2: (0,)}
    ramp = [qjob(1, 0.5, vram=16_000, ramp=60), qjob(2, 0.5, vram=10_000)]
    result = run(ramp, [gpu(0, used=2000)], ramp_up_s=0.0)
    assert result.reasons[2] == "needs 0.5 GPU with 10000 MB free: GPU 0 has 6000 MB free"


# --- unschedulable in every mode -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ALLOCATION_MODES)
def test_unschedulable_in_every_mode(mode: str) -> None:
    gpus = [gpu(0), gpu(1, total=32_000)]
    queue = [
        qjob(1, 0.5, vram=40_960),
        qjob(2, 3),
        qjob(3, 0.5, allowed=(7,)),
        qjob(4, 2, vram=30_000),
    ]
    result = run(queue, gpus, paused={0, 1}, mode=mode)
    assert result.unschedulable == {
        1: "needs 40960 MB of GPU memory but the largest allowed GPU has 32000 MB",
        2: "needs 3 GPUs but only 2 allowed (GPUs 0-1)",
        3: "allowed GPU 7: not among the scheduler's GPUs 0-1",
        4: "needs 2 GPUs with 30000 MB each but only 1 allowed GPUs have that much",
    }


@pytest.mark.parametrize("mode", ALLOCATION_MODES)
def test_min_free_mem_larger_than_any_gpu_only_waits(mode: str) -> None:
    result = run([qjob(1, 0.5)], [gpu(0)], mode=mode, min_free_mem_mb=30_000)
    assert result.unschedulable == {}
    assert "GPU 0 has 24000 MB free (min 30000)" in result.reasons[1]


# --- properties ----------------------------------------------------------------------------------


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[
    list[QueuedJob], list[GpuSnapshot], list[RunningJob], set[int], Policy, HostSnapshot | None
]:
    ids = draw(st.lists(st.integers(0, 7), min_size=1, max_size=6, unique=True))
    gpus = []
    for i in ids:
        total = draw(st.integers(1_000, 80_000))
        gpus.append(GpuSnapshot(i, "g", total, draw(st.integers(0, total)), draw(st.floats(0, 1))))
    mode = draw(st.sampled_from(ALLOCATION_MODES))
    running = []
    for job_id in range(1000, 1000 + draw(st.integers(0, 8))):
        share = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0]))
        on = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
        running.append(
            RunningJob(
                job_id,
                tuple(on if share == 1.0 else on[:1]),
                share,
                draw(st.none() | st.integers(0, 40_000)),
                draw(st.floats(NOW - 200, NOW)),
                ram_mb=draw(st.none() | st.integers(0, 20_000)),
                ramp_up_s=draw(st.none() | st.floats(0, 100)),
            )
        )
    queue = []
    for job_id in range(draw(st.integers(0, 25))):
        req = Requirement(
            draw(st.sampled_from([0.1, 0.25, 0.5, 1, 2, 3])),
            draw(st.none() | st.integers(0, 50_000)),
            ram_mb=draw(st.none() | st.integers(0, 40_000)),
            ramp_up_s=draw(st.none() | st.floats(0, 100)),
        )
        allowed = draw(st.none() | st.lists(st.integers(0, 8), max_size=4).map(tuple))
        queue.append(
            QueuedJob(
                job_id,
                draw(st.integers(0, 3)),
                draw(st.integers(0, 50)),
                req,
                allowed,
                NOW - draw(st.floats(0, 1000)),
            )
        )
    policy = Policy(
        mem_threshold=draw(st.floats(0.1, 1.0)),
        load_threshold=draw(st.floats(0.1, 1.0)),
        ramp_up_s=draw(st.floats(0, 100)),
        starvation_s=draw(st.floats(0, 2000)),
        backfill=draw(st.booleans()),
        placement=draw(st.sampled_from(PLACEMENTS)),
        mode=mode,
        max_workers=draw(st.none() | st.integers(0, 12)),
        min_free_mem_mb=draw(st.sampled_from([0, 0, 1000, 8000])),
        max_ram=draw(st.none() | st.floats(0.1, 1.0)),
        max_vram=draw(st.none() | st.floats(0.1, 1.0)),
    )
    host = None
    if draw(st.booleans()):
        ram_total = draw(st.integers(1_000, 64_000))
        host = HostSnapshot(ram_total, draw(st.integers(0, ram_total)))
    paused = draw(st.sets(st.integers(0, 8), max_size=3))
    return queue, gpus, running, paused, policy, host


def replay(
    queue: list[QueuedJob],
    gpus: list[GpuSnapshot],
    running: list[RunningJob],
    paused: set[int],
    policy: Policy,
    host: HostSnapshot | None,
    result: AllocationResult,
) -> None:
    """Apply the placements one by one, checking each against the mode's rule and every limit."""
    snap = {g.index: g for g in gpus}
    share = dict.fromkeys(snap, 0.0)
    ours = dict.fromkeys(snap, 0.0)
    ramping = dict.fromkeys(snap, 0.0)
    declared = dict.fromkeys(snap, 0.0)
    jobs = dict.fromkeys(snap, 0)
    ram_reserved = 0.0

    def add(g: int, s: float, vram: int | None, ramps: bool) -> None:
        mem = float(vram) if vram is not None else s * snap[g].memory_total_mb
        share[g] += s
        ours[g] += mem
        ramping[g] += mem if ramps else 0.0
        declared[g] += float(vram) if vram is not None else snap[g].memory_total_mb
        jobs[g] += 1

    for rj in running:
        ramps = NOW - rj.started_at < (
            rj.ramp_up_s if rj.ramp_up_s is not None else policy.ramp_up_s
        )
        ram_reserved += rj.ram_mb if ramps and rj.ram_mb is not None else 0
        for g in set(rj.gpus):
            if g in snap:
                add(g, rj.share, rj.vram_mb, ramps)
    workers = len({rj.id for rj in running})
    by_id = {job.id: job for job in queue}
    mode, eps = policy.mode, 1e-6
    for p in result.placements:
        job = by_id[p.job_id]
        req = job.requirement
        workers += 1
        assert policy.max_workers is None or workers <= policy.max_workers
        assert len(p.gpus) == len(set(p.gpus)) == req.gpu_count
        whole = mode == "exclusive" or (mode == "memory" and req.vram_mb is None)
        need_share = 1.0 if whole else req.share
        if mode == "memory" and req.vram_mb is not None:
            assert 0.0 <= p.share <= 1.0
        else:
            assert p.share == need_share
        for g in p.gpus:
            total = snap[g].memory_total_mb
            used = snap[g].memory_used_mb + ramping[g]
            free = total - used
            assert g not in paused
            assert job.allowed_gpus is None or g in job.allowed_gpus
            if req.gpu_count > 1:
                assert jobs[g] == 0 if mode in {"memory", "detected"} else share[g] == 0.0
            if mode in {"share", "exclusive"}:
                assert share[g] + need_share <= 1.0 + 1e-9
            if mode == "exclusive":
                assert jobs[g] == 0 or share[g] <= 1e-9
            if mode == "memory" and req.gpu_count == 1:
                if req.vram_mb is None:
                    assert jobs[g] == 0
                else:
                    others = max(0.0, used - ours[g])
                    assert declared[g] + req.vram_mb <= total - others + eps
            if mode == "detected":
                if req.vram_mb is not None:
                    wanted = float(req.vram_mb)
                elif policy.min_free_mem_mb > 0:
                    wanted = float(policy.min_free_mem_mb)
                else:
                    wanted = need_share * total
                assert free >= wanted - eps
            if req.vram_mb is not None:
                assert free >= req.vram_mb - eps
            if policy.min_free_mem_mb > 0:
                assert free >= policy.min_free_mem_mb - eps
            if policy.max_vram is not None:
                expected = req.vram_mb if req.vram_mb is not None else need_share * total
                assert used + expected <= policy.max_vram * total + eps
        if host is not None and req.ram_mb is not None:
            assert req.ram_mb <= host.ram_available_mb - ram_reserved + eps
            if policy.max_ram is not None:
                in_use = host.ram_total_mb - host.ram_available_mb + ram_reserved
                assert in_use + req.ram_mb <= policy.max_ram * host.ram_total_mb + eps
            ram_reserved += req.ram_mb
        ramp = req.ramp_up_s if req.ramp_up_s is not None else policy.ramp_up_s
        for g in p.gpus:
            add(g, p.share, req.vram_mb, ramp > 0 or mode == "detected")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_mode_keeps_its_own_rule_on_random_machines(
    scenario: tuple[
        list[QueuedJob], list[GpuSnapshot], list[RunningJob], set[int], Policy, HostSnapshot | None
    ],
) -> None:
    queue, gpus, running, paused, policy, host = scenario
    result = allocate(queue, gpus, running, paused, policy, NOW, host=host)
    replay(queue, gpus, running, paused, policy, host, result)
    seen = [p.job_id for p in result.placements]
    assert len(seen) == len(set(seen))
    for job in queue:
        homes = (job.id in seen, job.id in result.reasons, job.id in result.unschedulable)
        assert sum(homes) == 1
    if policy.max_workers is not None:
        assert len(result.placements) <= max(0, policy.max_workers - len(running))
    again = allocate(list(queue), list(gpus), list(running), set(paused), policy, NOW, host=host)
    assert again == result


def test_ten_thousand_jobs_in_every_mode() -> None:
    gpus = [gpu(i, used=1000 * i, util=0.1 * i) for i in range(8)]
    running = [rjob(90_000, (0,), 0.5), rjob(90_001, (1, 2), 1.0)]
    amounts = [0.1, 0.25, 0.5, 1, 2, 3, 4]
    queue = [
        qjob(
            i,
            amounts[i % len(amounts)],
            priority=i % 4,
            allowed=None if i % 3 else (i % 8, (i + 1) % 8),
            vram=None if i % 5 else 1000 * (i % 30) + 500,
            ram=None if i % 4 else 512 * (i % 16),
            waiting=float(i % 700),
        )
        for i in range(10_000)
    ]
    host = HostSnapshot(64_000, 40_000)
    for mode in ALLOCATION_MODES:
        policy = Policy(mode=mode, max_workers=20, min_free_mem_mb=500, max_vram=0.9, max_ram=0.8)
        result = allocate(queue, gpus, running, {7}, policy, NOW, host=host)
        replay(queue, gpus, running, {7}, policy, host, result)
        assert result.placements
        assert len(result.reasons) + len(result.unschedulable) + len(result.placements) == 10_000
