"""The dashboard's widgets. Each renders a snapshot handed to it; none reads the database."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.geometry import Region
from textual.widgets import Input, Static

from app.dashboard.format import (
    GPU_COLUMNS,
    JOB_COLUMNS,
    duration,
    gpu_cells,
    state_text,
)
from app.dashboard.lineview import TextPane
from app.dashboard.model import Detail, GpuView
from app.dashboard.rowtable import RowTable
from app.models import LineError

#: Column widths; the last column (info for jobs, jobs for GPUs) takes what is left.
JOB_WIDTHS = {"id": 5, "state": 15, "prio": 4, "script": 16, "env": 10, "model": 18,
              "need": 11, "GPUs": 5, "time": 7, "exit": 4, "info": 20}  # fmt: skip
GPU_WIDTHS = {"GPU": 3, "name": 24, "memory": 12, "used": 10, "util": 4, "history": 20,
              "share": 7, "jobs": 10}  # fmt: skip


class JobTable(RowTable):
    """The jobs table of the current tab."""

    def __init__(self, **kwargs: str) -> None:
        super().__init__(JOB_COLUMNS, JOB_WIDTHS, **kwargs)


class GpuTable(RowTable):
    def __init__(self, **kwargs: str) -> None:
        super().__init__(GPU_COLUMNS, GPU_WIDTHS, **kwargs)

    def show(self, gpus: Sequence[GpuView]) -> None:
        self.apply([(str(g.index), gpu_cells(g)) for g in gpus])

    @property
    def selected_gpu(self) -> int | None:
        key = self.selected_key
        return int(key) if key is not None else None


class FilterBox(Input):
    """The `/` filter, always on the line under the jobs table. Its size comes from CSS, so
    typing needs no layout pass.

    Input sets its virtual size on every new value, which asks the screen for a layout pass:
    a repaint of every widget on every key. Here that request is dropped (the size it would
    change is fixed)."""

    _typing = False

    def _watch_value(self, value: str) -> None:
        self._typing = True
        try:
            super()._watch_value(value)
        finally:
            self._typing = False

    def refresh(
        self,
        *regions: Region,
        repaint: bool = True,
        layout: bool = False,
        recompose: bool = False,
    ) -> Self:
        layout = layout and not self._typing
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)


class ErrorList(Static):
    """Malformed lines of the jobs file: file:line: reason, newest last."""

    _shown: tuple[LineError, ...] | None = None

    def show(self, errors: Sequence[LineError]) -> None:
        if tuple(errors) == self._shown:
            return
        self._shown = tuple(errors)
        if not errors:
            self.update(Text("No malformed lines in the jobs file.", style="dim"))
            return
        text = Text()
        for error in errors:
            text.append(f"{error.file}:{error.line}", style="bold red")
            text.append(f": {error.reason}\n")
        self.update(text)


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


class DetailPane(TextPane):
    """Everything about the selected job: command, session, log, timestamps, history.

    A fixed-size pane: following the cursor from job to job repaints this pane only."""

    _shown: tuple[Detail | None, str] | None = None

    def show(self, detail: Detail | None, attach: str) -> None:
        if (detail, attach) == self._shown:
            return  # nothing changed: no repaint
        self._shown = (detail, attach)
        if detail is None:
            self.border_title = "job"
            self.update(Text("No job selected.", style="dim"))
            return
        job = detail.job
        self.border_title = f"job #{job.id}"
        title = Text.assemble((f"Job #{job.id} ", "bold"), state_text(job.status))
        title.append(f"   priority {job.priority}")
        if job.gpus:
            title.append(f"   GPU {','.join(map(str, job.gpus))} (share {job.share or 0:g})")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")

        def field(name: str, value: str, style: str = "") -> None:
            grid.add_row(name, Text(value, style=style))

        if job.reason:
            field("reason", job.reason, "yellow")
        if job.exit_code is not None:
            field("exit code", str(job.exit_code), "bold red" if job.exit_code else "green")
        field("args", job.args or "(none)")
        if job.session:
            field("session", job.session)
            if attach:
                field("attach", attach, "cyan")
        field("log", job.log_path or "(not started)")
        if job.started_at and job.ended_at:
            field("runtime", duration(job.ended_at - job.started_at))
        field("submitted", _when(job.submitted_at))
        field("started", _when(job.started_at))
        field("ended", _when(job.ended_at))
        field("script", job.script)
        field("env", job.conda_env or "(none)")
        field("source", job.source or "-")
        if job.command:
            field("command", job.command)
        for at, status, what in detail.history[-8:]:
            line = f"{status} — {what}" if what else status
            field(time.strftime("%H:%M:%S", time.localtime(at)), line)
        self.update(Group(title, grid))


class LogPane(Static):
    """The live tail of the selected job: its pane while running, else its log file.

    Shows the last lines that fit, so the newest output is always in view.
    """

    _detail: Detail | None = None

    def on_resize(self) -> None:
        self.show(self._detail, force=True)

    def show(self, detail: Detail | None, force: bool = False) -> None:
        if detail == self._detail and not force:
            return  # nothing changed: no repaint
        self._detail = detail
        if detail is None or not detail.tail:
            what = "no output yet" if detail else "select a job to see its output"
            self.border_title = "log"
            self.update(Text(what, style="dim"), layout=False)
            return
        where = "tmux pane" if detail.tail_source == "pane" else detail.job.log_path or "log"
        self.border_title = f"#{detail.job.id} — {where}"
        room = self.content_size.height or len(detail.tail)
        tail = Text("\n".join(detail.tail[-room:]), no_wrap=True, overflow="ellipsis")
        self.update(tail, layout=False)  # a fixed-size pane: no layout pass
