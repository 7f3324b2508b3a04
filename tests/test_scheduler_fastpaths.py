"""What keeps a scheduler pass and `gpusched status` cheap with a long queue: the incremental
pending queue, the batched ingest, status read from rows, and the quiet watched folders."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from app.models import Job, JobSpec, JobState, Requirement, RequirementError
from app.paths import StatePaths
from app.pending import PendingQueue
from app.requirements import LlmConfig
from app.status import build_status, job_dict
from app.store import Store
from app.tailer import PathWatcher
from tests.helpers import wait_until

P, R = JobState.PENDING, JobState.RUNNING


def spec(
    n: int, args: str = "", priority: int = 0, allowed: tuple[int, ...] | None = None
) -> JobSpec:
    return JobSpec(priority, f"/w/s{n}.py", "", args or f"--n {n}", allowed, f"jobs.txt:{n}")


def ingest(store: Store, *specs: JobSpec, now: float = 1000.0) -> list[int]:
    return store.ingest("jobs.txt", "{}", Counter(), [], list(specs), [], now).queued


# ---- batched ingest ------------------------------------------------------------------------------


def test_ingest_in_one_batch_keeps_order_duplicates_and_requeues(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    assert ingest(store, spec(1), spec(2), spec(3)) == [1, 2, 3]
    store.transition(2, JobState.FAILED, when=[P], ended_at=1.0)
    report = store.ingest(
        "jobs.txt", "{}", Counter(), [],
        [spec(4), spec(1), spec(2, priority=5), spec(5), spec(4), spec(2)], [], 2000.0,
    )  # fmt: skip
    assert report.queued == [4, 5]
    assert report.requeued == [2]
    assert report.duplicates == [
        ("jobs.txt:1", 1, P),  # still pending
        ("jobs.txt:2", 2, P),  # queued again by the line before, in the same read
        ("jobs.txt:4", 4, P),  # new in this very read
    ]
    jobs = {j.id: j for j in store.jobs()}
    assert jobs[2].status == P and jobs[2].priority == 5
    # Submission order follows the lines: 4, then 2 (queued again), then 5.
    assert jobs[3].seq < jobs[4].seq < jobs[2].seq < jobs[5].seq
    assert [s for _, s, _ in store.history(4)] == ["pending"]
    assert sum(1 for j in store.jobs() if j.status == P) == 5


# ---- pending queue ------------------------------------------------------------------------


class Calls:
    """A requirement function that counts its calls; `--bad` is an invalid requirement."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, config: LlmConfig, job: Job) -> Requirement:
        self.count += 1
        if "--bad" in job.args:
            raise RequirementError("1.5 GPUs is neither a share nor a whole number")
        return Requirement(1.0)


def test_pending_queue_follows_the_store_and_rebuilds_only_what_changed(
    state_paths: StatePaths,
) -> None:
    store = Store(state_paths.db)
    ingest(store, spec(1), spec(2, allowed=(0, 1)), spec(3))
    calls = Calls()
    pending = PendingQueue(store, calls)
    config = LlmConfig(source="test")
    first = pending.build(config, 10.0)
    assert [q.id for q in first.queue] == [1, 2, 3] and calls.count == 3
    assert first.queue[1].allowed_gpus == (0, 1)
    assert first.changes == {n: {"requirement": 1.0, "vram_mb": None} for n in (1, 2, 3)}
    store.update_pending(first.changes)  # as the scheduler does: then they match
    calls.count = 0
    second = pending.build(config, 11.0)
    assert [q.id for q in second.queue] == [1, 2, 3] and second.changes == {}
    assert calls.count == 3  # the three rows were rewritten: rebuilt once
    calls.count = 0
    assert pending.build(config, 12.0).queue is second.queue and calls.count == 0  # unchanged

    store.transition(2, R, when=[P], gpus="0", started_at=12.0)  # launched
    ingest(store, spec(4), spec(5, "--bad"), now=13.0)
    third = pending.build(config, 13.0)
    assert [q.id for q in third.queue] == [1, 3, 4]
    assert [(j.id, reason) for j, reason in third.invalid] == [
        (5, "1.5 GPUs is neither a share nor a whole number")
    ]
    assert calls.count == 2  # only the two new jobs

    store.unplace(2, "back off", 14.0, next_attempt_at=20.0)  # a launch that failed
    waiting = pending.build(config, 14.0)
    assert [q.id for q in waiting.queue] == [1, 3, 4]  # 2 waits out its back-off
    assert 2 not in waiting.jobs_by_id
    back = pending.build(config, 20.5)  # the back-off is over: in queue order again
    assert [q.id for q in back.queue] == [1, 2, 3, 4]

    calls.count = 0
    other = LlmConfig(source="changed")
    assert [q.id for q in pending.build(other, 21.0).queue] == [1, 2, 3, 4]
    assert calls.count == 5  # a new config: every requirement again (5 is still invalid)
    assert [j.id for j in pending.jobs()] == [1, 2, 3, 4, 5]


# ---- status ------------------------------------------------------------------------------------


def test_status_rows_are_what_job_dict_makes_of_each_job(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    ingest(store, *(spec(n) for n in range(1, 7)))
    store.transition(1, R, when=[P], gpus="0,1", share=1.0, started_at=5.0, pid=77,
                     command="python3 /w/s1.py", session="gpujob_1_0-1_s1")  # fmt: skip
    store.transition(2, R, when=[P], gpus="1", share=0.5, started_at=5.0)
    store.transition(2, JobState.COMPLETED, when=[R], exit_code=0, ended_at=9.0)
    store.transition(3, JobState.FAILED, when=[P], exit_code=3, ended_at=9.0, reason="exit 3")
    store.update_pending({4: {"reason": "waiting", "requirement": 0.5}})
    store.set_meta({"gpus": '[{"name": "A", "memory_used_mb": 1, "memory_total_mb": 2, '
                    '"utilization": 0.5}, {"name": "B", "memory_used_mb": 0, '
                    '"memory_total_mb": 2, "utilization": 0.0}]'})  # fmt: skip
    status = build_status(store, state_paths)
    assert status["jobs"] == [job_dict(job) for job in store.jobs()]
    assert [g["jobs"] for g in status["gpus"]] == [[1], [1]]
    assert [g["allocated"] for g in status["gpus"]] == [1.0, 1.0]
    assert status.plain[1].pid == 77 and status.plain[1].command == "python3 /w/s1.py"


# ---- quiet watched folders --------------------------------------------------------------------


def test_quiet_folders_report_finished_writes_only(tmp_path: Path) -> None:
    loud, quiet = tmp_path / "in", tmp_path / "state"
    seen: list[str] = []
    lock = threading.Lock()
    quiet.mkdir()
    db = quiet / "gpusched.db-wal"
    db.write_text("")  # there before: SQLite keeps it open and writes to it

    def record(path: str) -> None:
        with lock:
            seen.append(path)

    def saw(path: Path) -> bool:
        with lock:
            return str(path) in seen

    with PathWatcher([loud], record, quiet=[quiet, loud]):  # `loud` stays loud
        held = db.open("a")
        held.write("x")
        held.flush()  # a write to a file kept open (SQLite, a log): no event
        (quiet / "old").write_text("")
        record_file = quiet / "job_1.json"
        tmp = tmp_path / "job_1.tmp"
        tmp.write_text("{}")
        tmp.replace(record_file)  # renamed into place: an event
        assert wait_until(lambda: saw(record_file), timeout=5)
        old_events = seen.count(str(quiet / "old"))  # created, closed
        (quiet / "old").unlink()  # deletions: no event
        appended = loud / "jobs.txt"
        with appended.open("a") as f:  # a writer that keeps the jobs file open: seen
            f.write("line\n")
            f.flush()
            assert wait_until(lambda: saw(appended), timeout=5)
        marker = quiet / "wakeup"
        marker.write_text("1")  # closed after writing: an event; events come in order
        assert wait_until(lambda: saw(marker), timeout=5)
        assert not saw(db)
        with lock:
            assert seen.count(str(quiet / "old")) == old_events
        held.close()
