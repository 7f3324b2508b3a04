"""`gpusched status`: the plain one-line-per-job view and the `--json` object, from a real
state database holding hand-made jobs."""

from __future__ import annotations

import json
from collections import Counter

from app.models import JobSpec, JobState, LineError
from app.paths import StatePaths
from app.status import LIMITS, build_status, format_jobs, format_status
from app.store import Store

P, R = JobState.PENDING, JobState.RUNNING


def queue(store: Store, *specs: JobSpec, now: float = 1000.0) -> None:
    store.ingest("jobs.txt", "{}", Counter(), [], list(specs), [], now)


def script(n: int, name: str, args: str = "", priority: int = 0) -> JobSpec:
    return JobSpec(priority, f"/home/u/exp/{name}", "", args, None, f"jobs.txt:{n}")


def run(store: Store, job_id: int, gpus: str, command: str, **fields: object) -> None:
    fields = {"started_at": 1000.0, "pid": 4000 + job_id, **fields}
    store.transition(job_id, R, when=[P], now=1000.0, gpus=gpus, command=command, **fields)


def end(store: Store, job_id: int, to: JobState, at: float, **fields: object) -> None:
    store.transition(job_id, to, when=[P, R], now=at, ended_at=at, **fields)


def test_one_line_per_job_most_relevant_first(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    queue(
        store,
        script(1, "train.py", "--lr 3"),
        JobSpec(0, "python eval.py --split test", "", "", None, "commands.txt:1", kind="command"),
        script(3, "bad.py"),
        script(4, "later.py", "--n 4"),
        script(5, "urgent.py", "--n 5", priority=-1),
        script(6, "dropped.py"),
        script(7, "gone.py"),
        script(8, "huge.py", "--llm huge"),
        script(9, "train.py", "--lr 4"),
    )
    run(store, 1, "0", "python3 /home/u/exp/train.py --lr 3 --cuda 0", pid=1234)
    run(store, 2, "1", "python eval.py --split test")
    end(store, 2, JobState.COMPLETED, 1100.0, exit_code=0)
    run(store, 3, "1", "python3 /home/u/exp/bad.py --cuda 7")  # --no-cuda-rewrite: kept
    end(store, 3, JobState.FAILED, 1150.0, exit_code=3)
    store.update_pending({4: {"reason": "needs 1 GPU: GPU 0 share 1/1.0 used"}})
    end(store, 6, JobState.KILLED, 1160.0)
    run(store, 7, "0", "python3 /home/u/exp/gone.py --cuda 0")
    end(store, 7, JobState.LOST, 1170.0, reason="session vanished, no exit record")
    end(store, 8, JobState.UNSCHEDULABLE, 1120.0, reason="needs 4 GPUs, 2 allowed")
    run(store, 9, "0,1", "python3 /home/u/exp/train.py --lr 4 --cuda=0,1", started_at=1180.0)

    text = format_status(build_status(store, state_paths), now=1185.0)

    jobs = text.splitlines()[2:]  # after the scheduler and GPUs lines (no GPUs probed here)
    assert jobs == [
        "jobs: 9 (2 pending, 2 running, 1 completed, 1 failed, 1 killed, 1 lost, 1 unschedulable)",
        "  [→] #1 python3 train.py --lr 3      → GPU 0   → running (pid 1234, 3m05s)",
        "  [→] #9 python3 train.py --lr 4      → GPU 0,1 → running (pid 4009, 0m05s)",
        "  [ ] #5 urgent.py --n 5              → pending (waiting for the next pass)",
        "  [ ] #4 later.py --n 4               → pending (needs 1 GPU: GPU 0 share 1/1.0 used)",
        "  [?] #7 python3 gone.py              → GPU 0   → lost (session vanished, no exit record)",
        "  [✗] #6 dropped.py                   → killed",
        "  [✗] #3 python3 bad.py --cuda 7      → GPU 1   → failed (exit 3)",
        "  [!] #8 huge.py --llm huge           → unschedulable (needs 4 GPUs, 2 allowed)",
        "  [✓] #2 python eval.py --split test  → GPU 1   → completed",
    ]
    assert text.splitlines()[:2] == [
        f"scheduler: not running  state: {state_paths.root}",
        "GPUs: none seen yet (start the scheduler)",
    ]


def test_gpus_and_errors_sections_stay(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    gpu = {"name": "Fake A100", "memory_used_mb": 100, "memory_total_mb": 81920}
    store.set_meta({"gpus": json.dumps([{**gpu, "utilization": 0.5}, {**gpu, "utilization": 0}])})
    store.set_paused(1, True)
    queue(store, script(1, "a.py", "--llm half"))
    run(store, 1, "0", "python3 /home/u/exp/a.py --llm half --cuda 0", share=0.5)
    store.ingest("jobs.txt", "{}", None, [], [], [LineError("jobs.txt", 2, "bad line")], 1000.0)

    lines = format_status(build_status(store, state_paths), now=1060.0).splitlines()

    assert lines[1:] == [
        "GPUs:",
        "  GPU 0 Fake A100: share 0.5/1.0, 100/81920 MB, load 50% jobs #1",
        "  GPU 1 Fake A100: share 0/1.0, 100/81920 MB, load 0%  PAUSED",
        "jobs: 1 (1 running)",
        "  [→] #1 python3 a.py --llm half  → GPU 0 → running (pid 4001, 1m00s)",
        "jobs file errors:",
        "  jobs.txt:2: bad line",
    ]


def test_long_lists_are_capped_with_a_count_of_the_rest(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    queue(store, *(script(n, f"s{n}.py") for n in range(1, 10)))
    for job_id in (1, 2, 3, 4):
        end(store, job_id, JobState.FAILED, 1000.0 + job_id, reason="launch failed")

    lines = format_jobs(
        build_status(store, state_paths), 1010.0, {**LIMITS, "pending": 2, "ended": 1}
    )

    assert lines == [
        "jobs: 9 (5 pending, 4 failed)",
        "  [ ] #5 s5.py  → pending (waiting for the next pass)",
        "  [ ] #6 s6.py  → pending (waiting for the next pass)",
        "  … 3 more pending",
        "  [✗] #4 s4.py  → failed (launch failed)",
        "  … 3 more ended",
        "  (gpusched status --json lists every job)",
    ]
    assert LIMITS == {"running": 50, "pending": 20, "ended": 10}


def test_long_commands_are_cut_and_ids_aligned(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    queue(store, *(script(n, f"s{n}.py") for n in range(1, 11)))
    queue(store, JobSpec(0, "echo " + "x" * 80, "", "", None, "c:1", kind="command"))
    for job_id in range(1, 10):
        end(store, job_id, JobState.COMPLETED, 1000.0)

    lines = format_jobs(build_status(store, state_paths), 1010.0, {**LIMITS, "ended": 0})

    cut = "echo " + "x" * 54 + "…"
    assert lines[1:4] == [
        f"  [ ] #10 {'s10.py':<60}  → pending (waiting for the next pass)",
        f"  [ ] #11 {cut}  → pending (waiting for the next pass)",
        "  … 9 more ended",
    ]


def test_json_is_unchanged_and_a_plain_dict_still_formats(state_paths: StatePaths) -> None:
    store = Store(state_paths.db)
    queue(store, script(1, "train.py", "--lr 3"))
    run(store, 1, "0", "python3 /home/u/exp/train.py --lr 3 --cuda 0")
    status = build_status(store, state_paths)

    data = json.loads(json.dumps(status))
    assert data == dict(status)
    assert set(data) == {"scheduler", "gpus", "jobs", "errors"}
    assert set(data["jobs"][0]) == {"id", "status", "priority", "script", "conda_env", "args",
                                    "gpus", "requirement", "session", "log", "exit_code",
                                    "reason", "source", "submitted_at", "started_at",
                                    "ended_at"}  # fmt: skip
    # Read back from --json there is no launched command or pid: the script and its args.
    assert format_jobs(data, 1030.0)[1] == "  [→] #1 train.py --lr 3  → GPU 0 → running (0m30s)"
