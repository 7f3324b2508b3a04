"""`gpusched dashboard` and `gpusched start --tui`: the live Textual dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence

from app.control import AlreadyRunningError, read_pid, scheduler_pid
from app.paths import StatePaths, state_paths
from app.settings import Settings


def run_dashboard(paths: StatePaths) -> int:
    """Open the dashboard on a state directory, whether or not a scheduler runs there."""
    from app.dashboard.app import DashboardApp

    DashboardApp(paths).run()
    return 0


def run_with_scheduler(settings: Settings, relaunch: Sequence[str]) -> int:
    """The scheduler in a thread of this process and the dashboard in front of it.

    Quitting asks whether to stop the scheduler or keep it running: then it is started again
    as a detached `gpusched start` (same flags, minus --tui) that re-adopts the running jobs.
    """
    from app.dashboard.app import DashboardApp
    from app.service import serve

    paths = state_paths(settings.state_dir).ensure()
    stop = threading.Event()
    failure: list[BaseException] = []

    def scheduler() -> None:
        try:
            serve(settings, stop, console=False)
        except BaseException as exc:  # handed to the main thread below
            failure.append(exc)

    thread = threading.Thread(target=scheduler, name="gpusched-scheduler", daemon=True)
    thread.start()
    while thread.is_alive() and read_pid(paths.lock) != os.getpid():
        thread.join(timeout=0.02)
    if failure:
        raise failure[0]
    try:
        choice = DashboardApp(paths, embedded=True).run()
    finally:
        stop.set()
        thread.join(timeout=30)
    if choice == "background":
        if scheduler_pid(paths) is not None:
            raise AlreadyRunningError("the scheduler did not stop; not starting another")
        child = subprocess.Popen(
            [sys.executable, "-m", "app", *relaunch],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        print(
            f"gpusched: the scheduler keeps running in the background (pid {child.pid}); "
            f"log {paths.scheduler_log}; reopen the dashboard with `gpusched dashboard`"
        )
    else:
        print("gpusched: scheduler stopped; running jobs keep running and are re-adopted later")
    return 0
