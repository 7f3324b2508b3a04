"""Snapshot tests (pytest-textual-snapshot) of the main screen, the help and the detail pane.

The state database is written by hand with fixed ids, timestamps and paths, the dashboard's
clock is frozen and the time zone is UTC, so the screen is the same on every machine.
Update the SVGs after an intended change: `pytest tests/test_dashboard_snapshots.py
--snapshot-update`, then look at them (`snapshot_report.html`) before committing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from app.dashboard.app import DashboardApp
from app.dashboard.widgets import JobTable
from app.paths import StatePaths
from app.schema import stamp_revisions
from app.store import Store

NOW = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
GPUS = [
    {"name": "NVIDIA A100 80GB", "memory_used_mb": 61440, "memory_total_mb": 81920,
     "utilization": 0.93},
    {"name": "NVIDIA A100 80GB", "memory_used_mb": 20480, "memory_total_mb": 81920,
     "utilization": 0.41},
    {"name": "NVIDIA A100 80GB", "memory_used_mb": 512, "memory_total_mb": 81920,
     "utilization": 0.0},
    {"name": "NVIDIA A100 80GB", "memory_used_mb": 75000, "memory_total_mb": 81920,
     "utilization": 0.99},
]  # fmt: skip
# id, status, priority, args, gpus, share, exit, reason, submitted, started, ended
JOBS: list[tuple[Any, ...]] = [
    (1, "running", 0, "--llm qwen2.5-32b-inst --epochs 3", "0,1", 1.0, None, "", -7200, -7190,
     None),
    (2, "running", 1, "--llm qwen2.5-3b-inst --seed 1", "2", 0.5, None, "", -1800, -1795, None),
    (3, "completed", 1, "--llm qwen2.5-3b-inst --seed 0", "2", 0.5, 0, "", -5400, -5390, -2000),
    (4, "failed", 2, "--llm qwen2.5-7b-inst --lr 3e-4", "3", 1.0, 3, "exited with 3", -900, -890,
     -600),
    (5, "pending", 0, "--llm qwen2.5-7b-inst --dataset test", None, None, None,
     "needs 1 GPU: GPU 0-1 share 1/1.0 used, GPU 2 share 0.5/1.0 used, GPU 3 paused", -300, None,
     None),
    (6, "pending", 2, "--llm qwen2.5-32b-inst --batch_size 1", None, None, None,
     "needs 2 GPUs: waiting behind job 5", -120, None, None),
    (7, "unschedulable", 3, "--llm qwen2.5-72b-inst", None, None, None,
     "needs 8 GPUs, only 4 exist", -60, None, None),
]  # fmt: skip


def fill(paths: StatePaths) -> None:
    store = Store(paths.db)
    logs = Path("state/logs")
    logs.mkdir(parents=True, exist_ok=True)
    with store.tx() as db:
        for job_id, status, prio, args, gpus, share, code, reason, sub, start, end in JOBS:
            log = None
            if start is not None:
                log = str(logs / f"job_{job_id}.log")
                Path(log).write_text(
                    f"job {job_id} on GPU {gpus}: {args}\n"
                    + "".join(
                        f"epoch 1 step {s}/500 loss {2.5 - s / 400:.3f}\n"
                        for s in range(50, 450, 50)
                    )
                )
            db.execute(
                "INSERT INTO jobs (id, key, status, priority, seq, script, conda_env, args, "
                "allowed_gpus, source, requirement, gpus, share, session, runner, log_path, "
                "command, exit_code, reason, submitted_at, queued_at, started_at, ended_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, f"k{job_id}", status, prio, job_id, "/home/ana/exp/train.py", "torch",
                 args, f"jobs.txt:{job_id}", 2.0 if "32b" in args else (share or 1.0), gpus,
                 share, f"gpujob_{job_id}_train" if start else None,
                 "tmux:gpusched-snapshot-none", log,
                 f"python /home/ana/exp/train.py {args} --cuda {gpus}" if start else None,
                 code, reason, NOW + sub, NOW + sub, NOW + start if start else None,
                 NOW + end if end else None),
            )  # fmt: skip
            db.execute(
                "INSERT INTO job_events (job_id, at, status, detail) VALUES (?, ?, 'pending', ?)",
                (job_id, NOW + sub, f"submitted from jobs.txt:{job_id}"),
            )
            if start is not None:
                db.execute(
                    "INSERT INTO job_events (job_id, at, status, detail) VALUES (?, ?, ?, ?)",
                    (job_id, NOW + start, "running", f"on GPU {gpus}"),
                )
        db.execute("INSERT INTO line_errors (file, line, reason, at) VALUES "
                   "('jobs.txt', 8, 'priority ''high'' is not an integer', ?)",
                   (NOW,))  # fmt: skip
        db.execute("INSERT INTO paused_gpus VALUES (3, ?)", (NOW,))
        stamp_revisions(db)
    store.set_meta({"gpus": json.dumps(GPUS), "gpus_at": str(NOW - 5), "backend": "nvml",
                    "jobs_file": "/home/ana/exp/jobs.txt"})  # fmt: skip
    store.close()


@pytest.fixture
def frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DashboardApp]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    paths = StatePaths(Path("state")).ensure()
    fill(paths)
    yield DashboardApp(paths, clock=lambda: NOW, poll_interval=3600)
    monkeypatch.undo()
    time.tzset()


def loaded(extra: Callable[[DashboardApp], bool] = lambda app: True, *keys: str) -> Any:
    """A run_before: wait for the first poll (and `extra`), press `keys`, wait again."""

    async def run_before(pilot: Pilot[str]) -> None:
        app = pilot.app
        assert isinstance(app, DashboardApp)
        for _ in range(400):
            if app.polls and app.query_one(JobTable).row_count and app.detail_shown:
                break
            await pilot.pause(0.01)
        await pilot.press(*keys)
        for _ in range(400):
            if app.polls and extra(app) and not app._polling:
                break
            await pilot.pause(0.01)
        await pilot.pause()

    return run_before


def detail_of(job_id: int) -> Callable[[DashboardApp], bool]:
    return lambda app: app.detail_shown == job_id


def test_main_screen(frozen: DashboardApp, snap_compare: Any) -> None:
    assert snap_compare(frozen, terminal_size=(160, 45), run_before=loaded(detail_of(5)))


def test_help_screen(frozen: DashboardApp, snap_compare: Any) -> None:
    assert snap_compare(frozen, terminal_size=(160, 45),
                        run_before=loaded(detail_of(5), "question_mark"))  # fmt: skip


def test_detail_pane_of_a_running_job(frozen: DashboardApp, snap_compare: Any) -> None:
    def shows_job_2(app: DashboardApp) -> bool:
        return detail_of(2)(app) and app.view == "running"

    assert snap_compare(frozen, terminal_size=(160, 45),
                        run_before=loaded(shows_job_2, "2", "down"))  # fmt: skip
