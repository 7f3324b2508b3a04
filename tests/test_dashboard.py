"""The dashboard driven key by key (Textual's Pilot) against a real scheduler on fake GPUs.

The scheduler runs in a thread of the test process on a private tmux server; the dashboard
reads the same state database, and every assertion checks the database and the screen.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Static, Tabs

from app.dashboard.app import DashboardApp
from app.dashboard.screens import ConfirmScreen, HelpScreen, QuitScreen
from app.dashboard.widgets import DetailPane, ErrorList, GpuTable, JobTable, LogPane
from app.models import JobSpec, JobState
from app.paths import StatePaths
from app.service import serve
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import make_workspace


@dataclass
class Scene:
    root: Path
    paths: StatePaths
    store: Store

    def append(self, *lines: str) -> None:
        with (self.root / "jobs.txt").open("a") as f:
            f.writelines(line + "\n" for line in lines)

    def line(self, args: str, priority: int = 0) -> str:
        return f"{priority},{self.root / 'job.py'},,{args},"

    def status(self, job_id: int) -> JobState | None:
        job = self.store.job(job_id)
        return job.status if job else None


@pytest.fixture
def scene(tmp_path: Path, tmux_socket: str) -> Iterator[Scene]:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    ws.store.close()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ws.settings, stop, False), daemon=True)
    thread.start()
    wait_until(lambda: ws.paths.lock.exists() and ws.paths.lock.read_text().strip())
    store = Store(ws.paths.db)
    yield Scene(tmp_path, ws.paths, store)
    stop.set()
    thread.join(timeout=10)
    store.close()


def drive(paths: StatePaths, steps: Callable[[DashboardApp, Pilot[str]], Coroutine[Any, Any, None]],
          embedded: bool = False) -> DashboardApp:  # fmt: skip
    """Run the dashboard headless around `steps`; returns the app for after-the-fact checks."""
    app = DashboardApp(paths, embedded=embedded, poll_interval=0.1)

    async def main() -> None:
        async with app.run_test(size=(160, 45)) as pilot:
            await steps(app, pilot)

    asyncio.run(main())
    return app


async def until(pilot: Pilot[str], condition: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await pilot.pause(0.05)


def text_of(widget: Static) -> str:
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def rows(app: DashboardApp) -> dict[int, list[str]]:
    table = app.query_one(JobTable)
    return {int(key): [str(c) for c in table.get_row(key)] for key in table.keys}


def notes(app: DashboardApp) -> list[tuple[str, str]]:
    return [(n.message, n.severity) for n in app._notifications]


def tab_labels(app: DashboardApp) -> list[str]:
    return [str(tab.label_text) for tab in app.query_one(Tabs).query("Tab")]


async def select_job(pilot: Pilot[str], app: DashboardApp, job_id: int) -> None:
    table = app.query_one(JobTable)
    await until(pilot, lambda: job_id in rows(app))
    table.focus()
    table.move_cursor(row=table.get_row_index(str(job_id)))
    await until(pilot, lambda: app.selected_job_id() == job_id)


def test_shows_scheduler_gpus_jobs_and_malformed_lines(scene: Scene) -> None:
    scene.append(
        scene.line("--llm half --sleep 60 --name a"),
        scene.line("--llm one --sleep 60 --name b"),
        scene.line("--llm one --sleep 60 --name c", priority=3),
        "x,a,b,c,d",
    )
    wait_until(lambda: scene.status(3) == JobState.PENDING and scene.status(2) == JobState.RUNNING)

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await until(pilot, lambda: "Errors 1" in tab_labels(app) and 3 in rows(app))
        header = text_of(app.query_one("#header", Static))
        assert "scheduler running (pid" in header and "backend fake" in header
        assert "2 running" in header and "1 pending" in header
        gpus = app.query_one(GpuTable)
        assert gpus.row_count == 2
        shares = {str(gpus.get_row(k)[6]) for k in gpus.keys}
        assert shares == {"0.5/1.0", "1/1.0"}
        assert tab_labels(app)[:5] == ["Queue 1", "Running 2", "Done 0", "Failed 0", "All 3"]
        queued = rows(app)[3]  # the Queue tab: the waiting job with its reason
        assert queued[1] == "◌ pending" and queued[2] == "3" and queued[5] == "one"
        assert "needs 1 GPU" in queued[10]
        await pilot.press("2")
        await until(pilot, lambda: set(rows(app)) == {1, 2})
        assert rows(app)[1][7] in ("0", "1") and rows(app)[1][6] == "0.5 GPU"
        await pilot.press("6")
        await until(pilot, lambda: "jobs.txt:4" in text_of(app.query_one(ErrorList)))
        assert "priority 'x' is not an integer" in text_of(app.query_one(ErrorList))

    drive(scene.paths, steps)


def test_pause_and_resume_the_gpu_under_the_cursor(scene: Scene) -> None:
    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        gpus = app.query_one(GpuTable)
        await until(pilot, lambda: gpus.row_count == 2)
        gpus.focus()
        await pilot.press("down")
        assert gpus.selected_gpu == 1
        await pilot.press("p")
        await until(pilot, lambda: scene.store.paused() == {1})
        await until(pilot, lambda: "PAUSED" in str(gpus.get_row("1")[1]))
        await until(pilot, lambda: ("GPU 1 paused", "information") in notes(app))
        await pilot.press("r")
        await until(pilot, lambda: scene.store.paused() == set())
        await until(pilot, lambda: "PAUSED" not in str(gpus.get_row("1")[1]))

    drive(scene.paths, steps)
    scene.append(scene.line("--sleep 0"))
    wait_until(lambda: scene.status(1) == JobState.COMPLETED)  # the scheduler saw the resume


def test_kill_asks_first_then_kills_the_whole_job(scene: Scene) -> None:
    scene.append(scene.line("--llm half --sleep 60"))
    wait_until(lambda: scene.status(1) == JobState.RUNNING)
    session = scene.store.job(1).session  # type: ignore[union-attr]

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await pilot.press("2")
        await select_job(pilot, app, 1)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # no: nothing happens
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert scene.status(1) == JobState.RUNNING
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: scene.status(1) == JobState.KILLED)
        await until(pilot, lambda: any("killed" in m for m, _ in notes(app)))
        await until(pilot, lambda: 1 not in rows(app))  # left the Running tab
        await pilot.press("k")  # nothing selected any more on this tab
        await until(pilot, lambda: ("No job selected.", "warning") in notes(app))

    drive(scene.paths, steps)
    job = scene.store.job(1)
    assert job is not None and job.session == session
    from app.runners import TmuxRunner

    assert session not in TmuxRunner(scene.store.job(1).runner[5:]).sessions()  # type: ignore[index,union-attr]


def test_retry_requeues_a_failed_job_and_refuses_a_running_one(scene: Scene) -> None:
    scene.append(scene.line("--exit 3 --name bad"), scene.line("--llm half --sleep 60"))
    wait_until(lambda: scene.status(1) == JobState.FAILED and scene.status(2) == JobState.RUNNING)

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await pilot.press("2")
        await select_job(pilot, app, 2)
        await pilot.press("R")
        await until(pilot, lambda: any(s == "error" and "job 2 is running" in m
                                       for m, s in notes(app)))  # fmt: skip
        await pilot.press("4")
        await select_job(pilot, app, 1)
        assert rows(app)[1][9] == "3"  # exit code column
        await pilot.press("R")
        await until(pilot, lambda: ("job 1 queued again", "information") in notes(app))
        await until(pilot, lambda: scene.status(1) == JobState.FAILED
                    and len(scene.store.history(1)) > 3)  # fmt: skip

    drive(scene.paths, steps)
    statuses = [status for _, status, _ in scene.store.history(1)]
    assert statuses.count("running") == 2 and "pending" in statuses[2:]


def test_priority_keys_and_remove_work_on_pending_jobs_only(scene: Scene) -> None:
    scene.append(
        scene.line("--llm two --sleep 60"),  # takes both GPUs: the rest waits
        scene.line("--llm half --name p", priority=5),
    )
    wait_until(lambda: scene.status(2) == JobState.PENDING and scene.status(1) == JobState.RUNNING)

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await select_job(pilot, app, 2)
        await pilot.press("plus", "plus")
        await until(pilot, lambda: scene.store.job(2).priority == 3)  # type: ignore[union-attr]
        await until(pilot, lambda: rows(app)[2][2] == "3")
        await pilot.press("minus")
        await until(pilot, lambda: scene.store.job(2).priority == 4)  # type: ignore[union-attr]
        await pilot.press("d")
        await until(pilot, lambda: scene.status(2) == JobState.KILLED)
        await until(pilot, lambda: 2 not in rows(app))
        await pilot.press("2")
        await select_job(pilot, app, 1)
        await pilot.press("plus")
        await until(pilot, lambda: any(s == "error" and "only a pending job" in m
                                       for m, s in notes(app)))  # fmt: skip
        await pilot.press("d")
        await until(pilot, lambda: any("only a pending job can be removed" in m
                                       for m, _ in notes(app)))  # fmt: skip
        assert scene.status(1) == JobState.RUNNING

    drive(scene.paths, steps)


def test_filter_detail_and_log_pane(scene: Scene) -> None:
    scene.append(scene.line("--name alpha --sleep 60"), scene.line("--name beta --sleep 60"))
    wait_until(lambda: all(scene.status(i) == JobState.RUNNING for i in (1, 2)))
    log_path = Path(scene.store.job(2).log_path or "")  # type: ignore[union-attr]
    wait_until(lambda: log_path.exists() and "started" in log_path.read_text())

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await pilot.press("5")
        await until(pilot, lambda: set(rows(app)) == {1, 2})
        await pilot.press("slash", *"beta")
        await until(pilot, lambda: set(rows(app)) == {2})
        assert "matching 'beta'" in text_of(app.query_one("#shown", Static))
        await pilot.press("enter")  # back to the table, filter kept
        await until(pilot, lambda: app.selected_job_id() == 2)
        detail = app.query_one(DetailPane)
        await until(pilot, lambda: "Job #2" in text_of(detail))
        shown = text_of(detail)
        assert "--name beta" in shown and "session" in shown and "attach" in shown
        log = app.query_one(LogPane)
        await until(pilot, lambda: "started --name beta" in text_of(log))
        assert log.display
        await pilot.press("l")
        assert not log.display
        await pilot.press("l")
        assert log.display
        await pilot.press("escape")
        await until(pilot, lambda: set(rows(app)) == {1, 2})

    drive(scene.paths, steps)


def test_attach_headless_says_what_to_run_help_and_quit(scene: Scene) -> None:
    scene.append(scene.line("--sleep 60"))
    wait_until(lambda: scene.status(1) == JobState.RUNNING)
    session = scene.store.job(1).session  # type: ignore[union-attr]

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await pilot.press("2")
        await select_job(pilot, app, 1)
        await pilot.press("a")  # no terminal to hand over in a headless run: say the command
        await until(pilot, lambda: any(f"attach -t ={session}" in m for m, _ in notes(app)))
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen))
        await pilot.press("q")

    app = drive(scene.paths, steps)
    assert app.return_value == "quit"
    assert scene.status(1) == JobState.RUNNING  # quitting leaves the jobs alone


def test_command_palette_offers_the_actions(scene: Scene) -> None:
    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        gpus = app.query_one(GpuTable)
        await until(pilot, lambda: gpus.row_count == 2)
        await pilot.press("ctrl+p")
        await pilot.press(*"Pause GPU")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: scene.store.paused() == {0})

    drive(scene.paths, steps)


def test_embedded_quit_asks_what_to_do_with_the_scheduler(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state").ensure()

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.press("c")  # cancel: still here
        await until(pilot, lambda: not isinstance(app.screen, QuitScreen))
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.press("b")

    assert drive(paths, steps, embedded=True).return_value == "background"


def test_without_a_scheduler_it_says_so_and_actions_still_reach_the_database(
    tmp_path: Path,
) -> None:
    paths = StatePaths(tmp_path / "state").ensure()
    store = Store(paths.db)
    spec = JobSpec(0, "/w/t.py", "", "--llm [/oops] --tags [gpu]", None, "jobs.txt:1")
    store.ingest("jobs.txt", "{}", Counter(), [], [spec], [], time.time())  # brackets: no markup
    store.set_meta({"gpus": '[{"name": "Old GPU", "memory_used_mb": 1024, '
                            '"memory_total_mb": 8192, "utilization": 0.5}]',
                    "gpus_at": str(time.time() - 120)})  # fmt: skip

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await until(pilot, lambda: app.query_one(GpuTable).row_count == 1 and 1 in rows(app))
        assert rows(app)[1][5] == "[/oops]"
        await until(pilot, lambda: app.detail_shown == 1)
        assert "--tags [gpu]" in text_of(app.query_one(DetailPane))
        header = text_of(app.query_one("#header", Static))
        assert "scheduler not running" in header and "GPU figures from 2m00s ago" in header
        app.query_one(GpuTable).focus()
        await pilot.press("p")
        await until(pilot, lambda: store.paused() == {0})

    drive(paths, steps)
    store.close()


def test_an_unreadable_database_is_a_notification_not_a_traceback(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state").ensure()
    paths.db.write_bytes(b"this is not a database" * 100)

    async def steps(app: DashboardApp, pilot: Pilot[str]) -> None:
        await until(pilot, lambda: any("cannot read the state database" in m and s == "error"
                                       for m, s in notes(app)))  # fmt: skip
        await pilot.pause(0.5)  # later polls fail the same way: still one notification
        assert sum("cannot read" in m for m, _ in notes(app)) == 1
        await pilot.press("q")

    assert drive(paths, steps).return_value == "quit"
