"""What the dashboard's job and GPU keys do, and the command palette that offers them.

Each action is a function of `app.control` (the CLI's own), run in a worker thread on its own
database connection; its message or error comes back as a notification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import closing

from textual.app import App, SystemCommand
from textual.notifications import SeverityLevel
from textual.screen import Screen

from app import control
from app.dashboard.attach import attach
from app.dashboard.screens import ConfirmScreen
from app.dashboard.widgets import GpuTable
from app.models import Job, JobState
from app.paths import StatePaths
from app.store import Store

Action = Callable[[Store, StatePaths], str]


class JobActions(App[str]):
    """The actions half of DashboardApp; the app supplies the selection and the polling."""

    paths: StatePaths

    def selected_job(self) -> Job | None:
        raise NotImplementedError

    def request_poll(self) -> None:
        raise NotImplementedError

    def _from_worker(self, callback: Callable[..., object], *args: object) -> None:
        raise NotImplementedError

    def action_help(self) -> None:
        raise NotImplementedError

    def action_filter(self) -> None:
        raise NotImplementedError

    def action_toggle_log(self) -> None:
        raise NotImplementedError

    def act(self, action: Action) -> None:
        """Run a control action off the UI thread; its message or error becomes a notification."""

        def work() -> None:
            try:
                with closing(Store(self.paths.ensure().db)) as store:
                    message = action(store, self.paths)
            except control.ActionError as exc:
                self._from_worker(self._notify, str(exc), "error")
            except Exception as exc:  # never a traceback on screen: say what failed
                self._from_worker(self._notify, f"{type(exc).__name__}: {exc}", "error")
            else:
                self._from_worker(self._notify, message, "information")
            self._from_worker(self.request_poll)

        self.run_worker(work, thread=True, group="action")

    def _notify(self, message: str, severity: SeverityLevel) -> None:
        self.notify(message, severity=severity, timeout=8 if severity == "error" else 4)

    def action_pause_gpu(self, paused: bool) -> None:
        gpu = self.query_one(GpuTable).selected_gpu
        if gpu is None:
            self.notify("No GPU known yet: start the scheduler first.", severity="warning")
            return
        self.act(lambda store, paths: control.set_paused(store, paths, gpu, paused))

    def action_kill(self) -> None:
        job = self.selected_job()
        if job is None:
            return
        if job.status not in (JobState.PENDING, JobState.RUNNING):
            self.notify(f"job {job.id} already ended ({job.status})", severity="error")
            return
        where = f" on GPU {','.join(map(str, job.gpus))}" if job.gpus else ""
        question = f"Kill job {job.id} ({job.status}{where})?\n{job.script} {job.args}"

        def answered(yes: bool | None) -> None:
            if yes:
                self.act(lambda store, paths: control.kill_job(store, paths, job.id))

        self.push_screen(ConfirmScreen(question, yes="Kill"), answered)

    def action_retry(self) -> None:
        if job := self.selected_job():
            self.act(lambda store, paths: control.retry_job(store, paths, job.id))

    def action_priority(self, delta: int) -> None:
        if job := self.selected_job():
            self.act(lambda store, paths: control.change_priority(store, paths, job.id, delta))

    def action_remove(self) -> None:
        if job := self.selected_job():
            self.act(lambda store, paths: control.remove_pending(store, paths, job.id))

    def action_attach(self) -> None:
        if job := self.selected_job():
            message, severity = attach(self, job)
            self._notify(message, severity)
            self.request_poll()

    # ---- command palette --------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:  # type: ignore[type-arg]
        yield from super().get_system_commands(screen)
        commands = (
            ("Pause GPU", "Pause the GPU under the GPU cursor",
             lambda: self.action_pause_gpu(True)),
            ("Resume GPU", "Resume the GPU under the GPU cursor",
             lambda: self.action_pause_gpu(False)),
            ("Attach to job", "Attach to the selected job's tmux session", self.action_attach),
            ("Kill job", "Kill the selected job (asks first)", self.action_kill),
            ("Retry job", "Queue the selected ended job again", self.action_retry),
            ("Raise priority", "Run the selected pending job sooner",
             lambda: self.action_priority(-1)),
            ("Lower priority", "Run the selected pending job later",
             lambda: self.action_priority(1)),
            ("Remove pending job", "Take the selected pending job off the queue",
             self.action_remove),
            ("Filter jobs", "Show only jobs matching a text", self.action_filter),
            ("Toggle log pane", "Show or hide the selected job's output", self.action_toggle_log),
            ("Keys", "Show every key", self.action_help),
        )  # fmt: skip
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
