"""The dashboard's data side without a screen: revisions, the reader, tab rows, formatting."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from app.dashboard.format import coarse_duration, job_time, llm_model, requirement_text
from app.dashboard.joblist import JobList, view_count
from app.dashboard.model import DashboardReader, read_tail
from app.models import Job, JobSpec, JobState
from app.paths import StatePaths
from app.store import Store


def ingest(store: Store, count: int, now: float = 1000.0) -> None:
    specs = [JobSpec(i % 3, f"/w/s{i}.py", "", f"--n {i}", None, f"jobs.txt:{i + 1}")
             for i in range(count)]  # fmt: skip
    store.ingest("jobs.txt", "{}", Counter(), [], specs, [], now)


def test_every_write_to_a_job_gets_a_new_revision(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    ingest(store, 3)
    revs = {j.id: j.rev for j in store.jobs()}
    assert sorted(revs.values()) == [1, 2, 3]
    store.set_priority(2, 9)
    assert [j.id for j in store.jobs_changed_since(3)] == [2]
    assert store.job(2).rev == 4  # type: ignore[union-attr]
    store.transition(1, JobState.RUNNING, when=[JobState.PENDING], now=5.0, gpus="0")
    assert [j.id for j in store.jobs_changed_since(4)] == [1]
    assert store.jobs_changed_since(5) == []


def test_revisions_continue_across_the_insert_trigger_migration(state_paths: StatePaths) -> None:
    """A database made before schema 005 (inserts stamped by a trigger) keeps its revisions,
    and jobs ingested after the upgrade continue the sequence (one counter update a batch)."""
    import sqlite3

    from app.schema import MIGRATIONS

    state_paths.db.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(state_paths.db, isolation_level=None)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, at REAL)")
    for name, migrate in MIGRATIONS:
        if name.startswith("005"):
            break
        migrate(db)
        db.execute("INSERT INTO migrations VALUES (?, 0)", (name,))
    db.execute(
        "INSERT INTO jobs (key, status, priority, seq, script, conda_env, args, submitted_at,"
        " queued_at) VALUES ('old', 'completed', 0, 1, '/w/a.py', '', '', 0, 0)"
    )
    db.close()
    store = Store(state_paths.db)
    assert store.max_rev() == 1 and store.job(1).rev == 1  # type: ignore[union-attr]
    ingest(store, 3)
    assert [j.rev for j in store.jobs_changed_since(1)] == [2, 3, 4]
    assert store.max_rev() == 4
    store.set_priority(3, 7)
    assert store.job(3).rev == 5 and store.max_rev() == 5  # type: ignore[union-attr]


def test_reader_returns_only_changed_jobs_and_gpu_views(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    ingest(store, 5)
    gpus = [{"name": "G", "memory_used_mb": 10, "memory_total_mb": 100, "utilization": 0.5}] * 2
    store.set_meta({"gpus": json.dumps(gpus)})
    store.set_paused(1, True)
    clock = iter(float(t) for t in range(100, 200))
    reader = DashboardReader(state_paths, clock=lambda: next(clock))
    first = reader.poll()
    assert len(first.changed) == 5 and first.header.counts == {"pending": 5}
    assert [g.paused for g in first.gpus] == [False, True]
    assert reader.poll().changed == ()
    store.set_priority(4, -1)
    third = reader.poll()
    assert [j.id for j in third.changed] == [4] and third.changed[0].priority == -1
    assert len(third.gpus[0].history) == 3  # one sample per second of the (fake) clock
    reader.close()


def job(job_id: int, status: JobState, **fields: object) -> Job:
    base = Job(id=job_id, key=str(job_id), status=status, priority=0, seq=job_id,
               script="/w/train.py", conda_env="", args=f"--llm m{job_id} --x", allowed_gpus=None,
               source="", requirement=1.0, gpus=(), share=None, vram_mb=None, session=None,
               runner=None, log_path=None, command=None, pid=None, launched=False,
               exit_code=None, reason="", attempts=0, next_attempt_at=None, submitted_at=0.0,
               queued_at=0.0, started_at=None, ended_at=None, rev=job_id)  # fmt: skip
    return replace(base, **fields)  # type: ignore[arg-type]


def test_tabs_order_filter_and_cap() -> None:
    jobs = JobList(cap=3)
    jobs.merge([job(1, JobState.PENDING, priority=5), job(2, JobState.PENDING, priority=1),
                job(3, JobState.UNSCHEDULABLE), job(4, JobState.COMPLETED, ended_at=10.0),
                job(5, JobState.COMPLETED, ended_at=20.0), job(6, JobState.PENDING, priority=1),
                job(7, JobState.FAILED, ended_at=1.0)])  # fmt: skip
    queue = jobs.page("queue", "", now=100.0)
    assert [key for key, _ in queue.rows] == ["2", "6", "1"] and queue.matching == 4
    assert [key for key, _ in jobs.page("done", "", 100.0).rows] == ["5", "4"]  # newest first
    assert [key for key, _ in jobs.page("all", "m7", 100.0).rows] == ["7"]
    assert [key for key, _ in jobs.page("all", "", 100.0).rows] == ["7", "6", "5"]
    assert jobs.page("failed", "nothing like this", 100.0).matching == 0
    jobs.merge([job(1, JobState.PENDING, priority=0, rev=99)])  # moved up the queue
    assert [key for key, _ in jobs.page("queue", "", 100.0).rows] == ["1", "2", "6"]


def test_only_the_time_cell_changes_between_polls() -> None:
    jobs = JobList()
    jobs.merge([job(1, JobState.RUNNING, started_at=1.0, gpus=(0,))])
    ((_, first),) = jobs.page("running", "", now=5.0).rows
    ((_, second),) = jobs.page("running", "", now=6.0).rows
    changed = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    assert changed == [8] and (first[8].plain, second[8].plain) == ("0m04s", "0m05s")
    assert all(a is b for i, (a, b) in enumerate(zip(first, second, strict=True)) if i != 8)


def test_warm_renders_every_tabs_first_page_ahead_of_a_switch() -> None:
    jobs = JobList(cap=2)
    jobs.merge([job(1, JobState.PENDING), job(2, JobState.PENDING), job(3, JobState.PENDING),
                job(4, JobState.RUNNING, started_at=1.0),
                job(5, JobState.COMPLETED, ended_at=2.0)])  # fmt: skip
    jobs.warm(now=10.0)
    # Each tab's first `cap` jobs have cells; job 3 is beyond the queue's cap and All's
    # first page (5, 4): nothing rendered it.
    assert set(jobs._cells) == {1, 2, 4, 5}
    warmed = {job_id: cells for job_id, (_, cells) in jobs._cells.items()}
    rows = dict(jobs.page("queue", "", now=10.0).rows)
    assert rows["1"] is warmed[1] and rows["2"] is warmed[2]  # the page reuses them
    # A new revision is rendered again by the next warm, an unchanged one is not.
    jobs.merge([job(2, JobState.PENDING, reason="waiting for GPU 0", rev=50)])
    jobs.warm(now=10.0)
    assert jobs._cells[2][0] == 50 and jobs._cells[2][1][10].plain == "waiting for GPU 0"
    assert jobs._cells[1][1] is warmed[1]


def test_selections_follow_the_jobs_generation() -> None:
    jobs = JobList()
    jobs.merge([job(1, JobState.PENDING), job(2, JobState.COMPLETED, ended_at=1.0)])
    assert [key for key, _ in jobs.page("queue", "", 5.0).rows] == ["1"]
    assert [key for key, _ in jobs.page("done", "", 5.0).rows] == ["2"]
    jobs.merge([job(1, JobState.COMPLETED, ended_at=3.0, rev=7)])  # leaves the queue
    assert jobs.page("queue", "", 5.0).rows == ()
    assert [key for key, _ in jobs.page("done", "", 5.0).rows] == ["1", "2"]


def test_formatting() -> None:
    assert llm_model("--llm qwen2.5-7b-inst --e 3") == "qwen2.5-7b-inst"
    assert llm_model("--x 1 --llm=big") == "big" and llm_model("--x 'unbalanced") == ""
    assert [coarse_duration(s) for s in (5, 61, 3661, 90000)] == ["<1m", "1m", "1h01m", "1d01h"]
    assert (
        requirement_text(job(1, JobState.PENDING, requirement=2.0, vram_mb=61440)) == "2 GPUs 60G"
    )
    assert requirement_text(job(1, JobState.PENDING, requirement=0.5)) == "0.5 GPU"
    assert job_time(job(1, JobState.PENDING, queued_at=0.0), 30.0) == "<1m"
    assert job_time(job(1, JobState.FAILED, started_at=10.0, ended_at=75.0), 999.0) == "1m05s"
    assert view_count("failed", {"failed": 2, "lost": 1, "pending": 4}) == 3


def test_read_tail_keeps_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = read_tail(log, 100)
    assert tail is not None and tail.startswith("line ") and tail.endswith("line 999\n")
    assert read_tail(tmp_path / "missing", 100) is None
