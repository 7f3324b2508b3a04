"""The dashboard's widgets. Each renders a snapshot handed to it; none reads the database."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import DataTable, Static
from textual.widgets.data_table import ColumnKey, RowKey

from app.dashboard.format import (
    GPU_COLUMNS,
    JOB_COLUMNS,
    duration,
    gpu_cells,
    state_text,
)
from app.dashboard.joblist import Cells, Row
from app.dashboard.model import Detail, GpuView
from app.models import LineError

#: Fixed widths keep updates from re-measuring columns; the last column takes the rest.
JOB_WIDTHS = {"id": 5, "state": 15, "prio": 4, "script": 16, "env": 10, "model": 18,
              "need": 11, "GPUs": 5, "time": 7, "exit": 4}  # fmt: skip


class KeyedTable(DataTable[Text]):
    """A row-cursor table updated by diff: rows keyed by id, only changed cells rewritten."""

    def __init__(self, columns: Sequence[str], widths: dict[str, int], **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._columns = tuple(columns)
        self._widths = widths
        self._shown: dict[str, Cells] = {}
        self._order: list[str] = []

    def on_mount(self) -> None:
        for name in self._columns:
            self.add_column(name, key=name, width=self._widths.get(name))

    @property
    def selected_key(self) -> str | None:
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)

    def apply(self, rows: Sequence[Row]) -> bool:
        """Make the table show `rows` in order; True when rows were added, removed or moved."""
        selected = self.selected_key
        keys = [key for key, _ in rows]
        wanted = set(keys)
        gone = [key for key in self._shown if key not in wanted]
        structural = bool(gone)
        # Many rows leaving (a tab switch, a narrower filter): start afresh, since each
        # remove_row rebuilds the table's whole row index.
        if len(gone) > min(64, len(self._shown) // 2):
            self.clear()
            self._shown.clear()
        else:
            for key in gone:
                self.remove_row(key)
                del self._shown[key]
        for key, cells in rows:
            old = self._shown.get(key)
            if old is None:
                self.add_row(*cells, key=key)
                structural = True
            elif old != cells:
                for column, (before, after) in enumerate(zip(old, cells, strict=True)):
                    if before != after:
                        self.update_cell(key, self._columns[column], after)
            self._shown[key] = cells
        if self._current_order() != keys:
            rank = {key: i for i, key in enumerate(keys)}
            self.sort(self._columns[0], key=lambda value: rank[str(value)])
            structural = True
        self._order = keys
        if structural and selected in wanted and selected != self.selected_key:
            self.move_cursor(row=self.get_row_index(selected), scroll=False)
        return structural

    def _current_order(self) -> list[str]:
        return [str(row.key.value) for row in self.ordered_rows]

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        # DataTable measures every cell of every new row (to size auto-width columns): with
        # fixed widths and one-line rows there is nothing to learn, and adding 1,000 rows
        # would cost ~0.5 s of measuring. The rest (the virtual size) still runs.
        if all(not column.auto_width for column in self.columns.values()):
            new_rows = ()
        super()._update_dimensions(new_rows)


class JobTable(KeyedTable):
    """The jobs table. Every column has a fixed width; the last one (info) takes what is left."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(JOB_COLUMNS, {**JOB_WIDTHS, "info": 40}, **kwargs)

    def on_resize(self) -> None:
        used = sum(JOB_WIDTHS.values()) + 2 * self.cell_padding * len(JOB_COLUMNS)
        info = self.columns.get(ColumnKey("info"))
        width = max(self.scrollable_content_region.width - used, 20)
        if info is not None and info.width != width:
            info.width = width
            self._require_update_dimensions = True
            self.refresh()


class GpuTable(KeyedTable):
    def __init__(self, **kwargs: object) -> None:
        widths = {"GPU": 3, "name": 24, "memory": 12, "used": 10, "util": 4, "history": 20,
                  "share": 7}  # fmt: skip
        super().__init__(GPU_COLUMNS, widths, **kwargs)

    def show(self, gpus: Sequence[GpuView]) -> None:
        self.apply([(str(g.index), gpu_cells(g)) for g in gpus])

    @property
    def selected_gpu(self) -> int | None:
        key = self.selected_key
        return int(key) if key is not None else None


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


class DetailPane(Static):
    """Everything about the selected job: command, session, log, timestamps, history."""

    _shown: tuple[Detail | None, str] | None = None

    def show(self, detail: Detail | None, attach: str) -> None:
        if (detail, attach) == self._shown:
            return  # nothing changed: no repaint
        self._shown = (detail, attach)
        if detail is None:
            self.update(Text("No job selected.", style="dim"))
            return
        job = detail.job
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
            self.update(Text(what, style="dim"))
            return
        where = "tmux pane" if detail.tail_source == "pane" else detail.job.log_path or "log"
        self.border_title = f"#{detail.job.id} — {where}"
        room = self.content_size.height or len(detail.tail)
        tail = Text("\n".join(detail.tail[-room:]), no_wrap=True, overflow="ellipsis")
        self.update(tail, layout=False)  # a fixed-size pane: no layout pass
