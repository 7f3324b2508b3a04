"""`gpusched simulate`: traces, the generator, hand-computed schedules, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from app.models import Policy, Requirement
from app.sim import (
    POLICY_NAMES,
    SimulationStuckError,
    lower_bound,
    make_policy,
    p95,
    simulate,
)
from app.sim_trace import (
    AMOUNTS,
    HEADER,
    TraceError,
    TraceJob,
    format_trace,
    generate,
    parse_trace,
)

REPO = Path(__file__).resolve().parent.parent


def trace(*rows: str) -> list[TraceJob]:
    return parse_trace("\n".join([HEADER, *rows]) + "\n")


def starts(
    jobs: list[TraceJob], gpus: int, policy: Policy
) -> dict[int, tuple[float, tuple[int, ...]]]:
    result = simulate(jobs, gpus, policy)
    return {i: (r.start, r.gpus) for i, r in result.runs.items()}


# --- hand-computed schedules ---------------------------------------------------------------------


def test_four_whole_gpu_jobs_on_two_gpus() -> None:
    # Jobs 1 and 2 run on GPUs 0 and 1 during [0, 10], jobs 3 and 4 during [10, 20]: makespan 20.
    # Lower bound max(4 * 10 / 2, 0 + 10) = 20; waits 0, 0, 10, 10: mean 5, p95 (4th of 4) 10.
    result = simulate(trace(*["0,0,1,10,,"] * 4), 2, make_policy("pack"))
    assert result.makespan == 20 and result.lower_bound == 20 and result.ratio == 1
    assert result.utilization == 1.0
    assert result.mean_wait == 5 and result.p95_wait == 10 and result.max_wait == 10
    assert [result.runs[i].gpus for i in (1, 2, 3, 4)] == [(0,), (1,), (0,), (1,)]


def test_halves_pack_two_per_gpu_and_exclusive_gives_each_a_gpu() -> None:
    # Share: jobs 1 and 2 share GPU 0 during [0, 10], jobs 3 and 4 during [10, 20]: makespan 20
    # = the bound max(4 * 0.5 * 10 / 1, 10). Exclusive: one at a time: 40, ratio 2.
    jobs = trace(*["0,0,0.5,10,,"] * 4)
    shared = simulate(jobs, 1, make_policy("pack"))
    assert shared.makespan == 20 and shared.ratio == 1
    assert [shared.runs[i].start for i in (1, 2, 3, 4)] == [0, 0, 10, 10]
    alone = simulate(jobs, 1, make_policy("exclusive"))
    assert alone.makespan == 40 and alone.ratio == 2 and alone.utilization == 0.5


def test_exclusive_counts_a_quarter_as_a_whole_gpu() -> None:
    # Two 0.25 jobs: together on the GPU in share mode (makespan 10), one after the other in
    # exclusive mode (makespan 20).
    jobs = trace("0,0,0.25,10,,", "0,0,0.25,10,,")
    assert simulate(jobs, 1, make_policy("first-fit")).makespan == 10
    assert simulate(jobs, 1, make_policy("exclusive")).makespan == 20
    assert simulate(jobs, 1, make_policy("exclusive-nobackfill")).makespan == 20


def test_backfill_lets_halves_pass_a_blocked_two_gpu_job() -> None:
    # 2 GPUs. Job 1 (0.5, t=0) runs on GPU 0 during [0, 10]; job 2 (2 GPUs, t=1) needs both empty.
    # Backfill: job 3 (0.5, t=2) joins job 1 on GPU 0 (the fullest that fits) [2, 12], job 4
    #   (0.5, t=3) takes GPU 1 [3, 13]; job 2 starts when both are empty: [13, 23]. Makespan 23.
    # No backfill: jobs 3 and 4 wait behind job 2, which runs [10, 20]; then both halves share
    #   GPU 0 during [20, 30]. Makespan 30.
    # Lower bound: work (3 * 0.5 * 10 + 2 * 10) / 2 = 17.5 (> job 4's 3 + 10).
    jobs = trace("0,0,0.5,10,,", "1,0,2,10,,", "2,0,0.5,10,,", "3,0,0.5,10,,")
    backfill = simulate(jobs, 2, make_policy("pack"))
    assert starts(jobs, 2, make_policy("pack")) == {
        1: (0, (0,)),
        2: (13, (0, 1)),
        3: (2, (0,)),
        4: (3, (1,)),
    }
    assert backfill.makespan == 23 and backfill.lower_bound == 17.5
    assert backfill.mean_wait == (0 + 12 + 0 + 0) / 4
    strict = simulate(jobs, 2, make_policy("pack-nobackfill"))
    assert starts(jobs, 2, make_policy("pack-nobackfill")) == {
        1: (0, (0,)),
        2: (10, (0, 1)),
        3: (20, (0,)),
        4: (20, (0,)),
    }
    assert strict.makespan == 30 and strict.mean_wait == (0 + 9 + 18 + 17) / 4


def test_pack_first_fit_and_spread_place_differently() -> None:
    # 3 GPUs. Job 1 (0.5) goes to GPU 0 under every policy (all empty: lowest index). Job 2 (0.75)
    # does not fit beside it: GPU 1 under every policy (the emptiest ties go to the lowest).
    # Job 3 (0.25): pack takes the fullest GPU it fits on (GPU 1, 0.75 used), first-fit the
    # lowest-indexed (GPU 0), spread the emptiest (GPU 2).
    jobs = trace("0,0,0.5,100,,", "1,0,0.75,100,,", "2,0,0.25,100,,")
    where = {name: simulate(jobs, 3, make_policy(name)).runs for name in ("pack", "first-fit")}
    where["spread"] = simulate(jobs, 3, make_policy("spread")).runs
    for runs in where.values():
        assert runs[1].gpus == (0,) and runs[2].gpus == (1,)
    assert {name: runs[3].gpus for name, runs in where.items()} == {
        "pack": (1,),
        "first-fit": (0,),
        "spread": (2,),
    }


def test_starvation_holds_apply() -> None:
    # 2 GPUs, starvation after 5 s. Job 1 (1 GPU) runs [0, 10] on GPU 0; job 2 (2 GPUs, t=0)
    # waits; job 3 (1 GPU, t=1) backfills onto GPU 1 [1, 11]. At t=9 job 2 has waited 9 s >= 5:
    # both GPUs are held for it, so job 4 (t=9) does not take GPU 0 when job 1 ends at 10; job 2
    # starts when job 3 ends [11, 21] and job 4 runs [21, 31].
    # Without holds job 4 takes GPU 0 at 10 [10, 20] and job 2 waits until 20: [20, 30].
    jobs = trace("0,0,1,10,,", "0,0,2,10,,", "1,0,1,10,,", "9,0,1,10,,")
    held = simulate(jobs, 2, make_policy("pack", starvation_s=5))
    assert (held.runs[2].start, held.runs[4].start, held.makespan) == (11, 21, 31)
    free = simulate(jobs, 2, make_policy("pack", starvation_s=float("inf")))
    assert (free.runs[2].start, free.runs[4].start, free.makespan) == (20, 10, 30)


def test_memory_mode_packs_by_declared_memory() -> None:
    # One 80 GB GPU, three 0.5 jobs declaring 20 GB: memory mode runs all three at once (60 GB),
    # share mode two then one. A job without vram_gb needs a GPU of its own in memory mode.
    jobs = trace(*["0,0,0.5,10,20,"] * 3)
    assert simulate(jobs, 1, make_policy("pack", mode="memory")).makespan == 10
    assert simulate(jobs, 1, make_policy("pack")).makespan == 20
    undeclared = trace("0,0,0.5,10,,", "0,0,0.25,10,20,")
    assert simulate(undeclared, 1, make_policy("pack", mode="memory")).makespan == 20


def test_priorities_and_allowed_gpus() -> None:
    # Jobs 1-3 may only use GPU 0. Job 1 runs there [0, 10] and job 4 (any GPU) takes GPU 1
    # [0, 25]. Jobs 2 (priority 1) and 3 (priority 0) both arrive at 1: job 3 runs first [10, 20],
    # then job 2 [20, 30]. Job 5 may only use GPU 1: it waits for job 4 although GPU 0 is free
    # at 20, and runs [25, 30].
    jobs = trace("0,0,1,10,,0", "1,1,1,10,,0", "1,0,1,10,,0", "0,0,1,25,,", "2,0,1,5,,1")
    runs = simulate(jobs, 2, make_policy("pack")).runs
    assert runs[4].gpus == (1,)
    assert (runs[3].start, runs[2].start) == (10, 20)
    assert (runs[5].start, runs[5].gpus) == (25, (1,))


def test_unschedulable_jobs_are_reported_and_left_out() -> None:
    jobs = trace("0,0,4,10,,", "0,0,1,10,,5", "0,0,1,10,,", "0,0,0.5,10,200,")
    result = simulate(jobs, 2, make_policy("pack"))
    assert sorted(result.unschedulable) == [1, 2, 4]
    assert "needs 4 GPUs but only 2 allowed" in result.unschedulable[1]
    assert "not among the scheduler's" in result.unschedulable[2]
    assert "largest allowed GPU" in result.unschedulable[4]
    assert list(result.runs) == [3] and result.makespan == 10 and result.lower_bound == 10


def test_a_stuck_simulation_raises_instead_of_hanging() -> None:
    jobs = trace("0,0,1,10,,", "5,0,0.5,10,,")
    with pytest.raises(SimulationStuckError, match=r"2 jobs wait.*max workers \(0\) running"):
        simulate(jobs, 2, dataclasses.replace(make_policy("pack"), max_workers=0))
    with pytest.raises(SimulationStuckError, match="MB free"):
        simulate(jobs, 1, dataclasses.replace(make_policy("pack"), min_free_mem_mb=10**6))


def test_empty_trace() -> None:
    result = simulate([], 4, make_policy("pack"))
    assert (result.makespan, result.lower_bound, result.ratio, result.mean_wait) == (0, 0, 1, 0)


# --- metrics -------------------------------------------------------------------------------------


def test_lower_bound_is_work_over_gpus_or_the_latest_earliest_end() -> None:
    jobs = trace("0,0,2,60,,", "0,0,0.25,40,,", "50,0,1,30,,")
    # Work: 2 * 60 + 0.25 * 40 + 30 = 160 GPU-s. On 4 GPUs 40, below job 3's 50 + 30 = 80;
    # on 1 GPU 160.
    assert lower_bound(jobs, 4) == 80
    assert lower_bound(jobs, 1) == 160
    assert p95([]) == 0 and p95([5.0]) == 5 and p95([float(i) for i in range(1, 101)]) == 95


@pytest.mark.parametrize("seed", range(6))
def test_ratio_is_never_below_one(seed: int) -> None:
    rng = random.Random(seed)
    jobs = generate(rng.randint(1, 120), seed, gpus=4, mix=rng.choice(["mixed", "multi"]))
    for name in POLICY_NAMES:
        result = simulate(jobs, 4, make_policy(name))
        assert result.ratio >= 1 - 1e-12 and result.makespan >= result.lower_bound - 1e-9
        assert 0 < result.utilization <= 1 + 1e-12
        assert len(result.runs) == len(jobs)
        for run in result.runs.values():
            assert run.end > run.start >= jobs[run.job_id - 1].submit_at


def _check_no_overcommit(jobs: list[TraceJob], policy: Policy, gpus: int) -> None:
    result = simulate(jobs, gpus, policy)
    events: list[tuple[float, int, float, tuple[int, ...]]] = []
    for run in result.runs.values():
        share = 1.0 if policy.mode == "exclusive" else jobs[run.job_id - 1].requirement.share
        events += [(run.start, 1, share, run.gpus), (run.end, 0, -share, run.gpus)]
    load = [0.0] * gpus
    for _, _, delta, on in sorted(events):  # ends before starts at the same time
        for g in on:
            load[g] += delta
            assert load[g] <= 1 + 1e-9


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_gpu_is_ever_overcommitted(name: str) -> None:
    _check_no_overcommit(generate(300, 3, gpus=4, load=1.5), make_policy(name), 4)


# --- the pruned queue gives the full queue's schedule --------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_pruned_queue_gives_the_same_schedule_as_the_whole_queue(seed: int) -> None:
    rng = random.Random(seed)
    gpus = rng.choice([1, 2, 4, 8])
    jobs = [
        dataclasses.replace(
            job,
            priority=rng.randint(0, 2),
            allowed_gpus=rng.choice([None, None, None, (0, 1), (1, 2, 3), (0,)]),
            requirement=Requirement(
                job.requirement.amount, rng.choice([job.requirement.vram_mb, None])
            ),
        )
        for job in generate(rng.randint(20, 90), seed, gpus=gpus, mix="mixed", load=2.0)
    ]
    for mode in ("share", "memory", "detected"):
        for name in POLICY_NAMES:
            policy = dataclasses.replace(
                make_policy(name, mode, starvation_s=rng.choice([0.0, 60.0, 300.0, 1e9])),
                max_workers=rng.choice([None, None, 3]),
                min_free_mem_mb=rng.choice([0, 0, 2000]),
            )
            pruned = simulate(jobs, gpus, policy)
            whole = simulate(jobs, gpus, policy, prune=False)
            assert pruned.runs == whole.runs, (mode, name, policy)
            assert pruned.unschedulable == whole.unschedulable


@pytest.mark.timeout(600)
def test_ten_thousand_jobs() -> None:
    jobs = generate(10_000, 7, gpus=8, mix="mixed", load=1.2)
    result = simulate(jobs, 8, make_policy("pack"))
    assert len(result.runs) == 10_000 and result.ratio >= 1
    # Each event time gets at most one pass: arrivals plus finishes.
    assert result.allocate_calls <= 2 * 10_000


# --- traces and the generator --------------------------------------------------------------------


def test_trace_rows_are_parsed_like_the_jobs_file() -> None:
    text = (
        "# a comment\n\n"
        f"{HEADER}\n"
        "0,0,0.5,600,,\n"
        "12.5, 1 ,2,3600,40,0-3\n"
        "30,0,1,120,,0,2\n"  # everything after the fifth comma is the GPU list
        "31,0,1,120,\n"  # the GPU list may be left out
    )
    jobs = parse_trace(text, "t.csv")
    assert [j.id for j in jobs] == [1, 2, 3, 4]
    assert jobs[0] == TraceJob(1, 0.0, 0, Requirement(0.5), 600.0, None)
    assert jobs[1] == TraceJob(2, 12.5, 1, Requirement(2, 40 * 1024), 3600.0, (0, 1, 2, 3))
    assert jobs[2].allowed_gpus == (0, 2) and jobs[3].allowed_gpus is None
    assert parse_trace(format_trace(jobs)) == jobs


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("x,0,1,10,,", "submit_at 'x' is not a number"),
        ("-1,0,1,10,,", "submit_at -1 must be >= 0"),
        ("0,a,1,10,,", "priority 'a' is not an integer"),
        ("0,0,1.5,10,,", "must be a fraction of one GPU"),
        ("0,0,0,10,,", "must be greater than 0"),
        ("0,0,1,0,,", "duration 0 must be > 0"),
        ("0,0,1,inf,,", "not a finite number"),
        ("0,0,1,10,-2,", "vram_gb -2 must be > 0"),
        ("0,0,1,10,,0-x", "bad GPU range '0-x'"),
        ("0,0,1", "expected 6 fields"),
    ],
)
def test_bad_rows_name_file_line_and_reason(row: str, reason: str) -> None:
    text = f"{HEADER}\n0,0,1,10,,\n{row}\n"
    with pytest.raises(TraceError, match=r"^t\.csv:3: ") as info:
        parse_trace(text, "t.csv")
    assert reason in str(info.value)


def test_a_trace_needs_its_header() -> None:
    with pytest.raises(TraceError, match=r"^t\.csv:1: expected the header"):
        parse_trace("0,0,1,10,,\n", "t.csv")
    with pytest.raises(TraceError, match="empty trace"):
        parse_trace("# nothing\n", "t.csv")


def test_generator_is_deterministic_per_seed() -> None:
    one = format_trace(generate(300, 1))
    assert format_trace(generate(300, 1)) == one
    assert format_trace(generate(300, 2)) != one
    jobs = generate(500, 1)
    assert {j.requirement.amount for j in jobs} == set(AMOUNTS)
    assert all(j.requirement.vram_mb for j in jobs) and all(j.allowed_gpus is None for j in jobs)
    durations = sorted(j.duration for j in jobs)
    assert durations[-1] > 10 * durations[len(durations) // 2]  # heavy-tailed
    assert [j.submit_at for j in jobs] == sorted(j.submit_at for j in jobs)
    assert parse_trace(one) == generate(300, 1)
    for mix in ("fractional", "multi"):
        assert format_trace(generate(50, 1, mix=mix)) != format_trace(generate(50, 1))


def test_generator_load_sets_the_arrival_rate() -> None:
    # Offered work over the arrival span is about load x capacity.
    for load in (0.5, 2.0):
        jobs = generate(2000, 4, gpus=8, load=load)
        offered = sum(j.work for j in jobs) / jobs[-1].submit_at / 8
        assert load * 0.85 < offered < load * 1.15


# --- the command ---------------------------------------------------------------------------------


def gpusched(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "simulate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        timeout=120,
    )


def test_cli_json(tmp_path: Path) -> None:
    # Jobs 1 and 2 take GPUs 0 and 1, job 3 (allowed 0, 2 and 3) GPU 2: makespan 20.
    (tmp_path / "trace.csv").write_text(f"{HEADER}\n0,0,1,10,,\n0,0,1,10,,\n0,0,0.5,20,,0,2-3\n")
    done = gpusched("trace.csv", "--gpus", "4", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 1
    keys = {"policy", "makespan", "lower_bound", "ratio", "utilization", "mean_wait", "p95_wait"}
    assert keys <= set(rows[0])
    assert rows[0]["policy"] == "pack" and rows[0]["makespan"] == 20 and rows[0]["jobs"] == 3
    done = gpusched(
        "trace.csv", "--gpus", "1", "--json", "--policy", "pack,exclusive", cwd=tmp_path
    )
    assert [r["policy"] for r in json.loads(done.stdout)] == ["pack", "exclusive"]


def test_cli_compare_prints_a_table(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text(f"{HEADER}\n0,0,0.5,10,,\n0,0,0.5,10,,\n0,0,2,10,,\n")
    done = gpusched("trace.csv", "--gpus", "2", "--compare", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["policy", "makespan", "lower"]
    assert [line.split()[0] for line in lines[2:]] == list(POLICY_NAMES)


def test_cli_bad_line_exits_2_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text(f"{HEADER}\n0,0,1,10,,\n0,0,1.5,10,,\n")
    done = gpusched("trace.csv", cwd=tmp_path)
    assert done.returncode == 2
    assert "trace.csv:3:" in done.stderr and "1.5" in done.stderr and done.stdout == ""
    for args in (["--policy", "best"], [], ["trace.csv", "--generate", "5"]):
        assert gpusched(*args, cwd=tmp_path).returncode == 2


def test_cli_generate_and_write_trace(tmp_path: Path) -> None:
    done = gpusched(
        "--generate", "200", "--seed", "1", "--json", "--write-trace", "t.csv", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.csv").read_text() == format_trace(generate(200, 1))
    again = gpusched("t.csv", "--json", "--write-schedule", "s.csv", cwd=tmp_path)
    assert json.loads(again.stdout) == json.loads(done.stdout)
    schedule = (tmp_path / "s.csv").read_text().splitlines()
    assert schedule[0] == "policy,job,submit_at,start,end,gpus" and len(schedule) == 201
