"""The live dashboard: GPUs, jobs, details and logs on one screen, one key per action.

The UI thread only renders. Polling (`DashboardReader.poll`, `JobList.page`) and every action
run in worker threads; actions use the same functions as the CLI (`app.control`) on their own
database connection, so a kill that waits for a process tree never stalls the screen.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import ContentSwitcher, Input, Static, Tab, Tabs

from app.dashboard.actions import JobActions
from app.dashboard.attach import attach_argv
from app.dashboard.format import header_text
from app.dashboard.heap import HeapKeeper
from app.dashboard.joblist import VIEWS, JobList, Page, view_count
from app.dashboard.keybar import KeyBar
from app.dashboard.model import DashboardReader, Detail, Snapshot
from app.dashboard.screens import HelpScreen, QuitScreen
from app.dashboard.widgets import (
    DetailPane,
    ErrorList,
    FilterBox,
    GpuTable,
    JobTable,
    LogPane,
)
from app.models import Job, JobState
from app.paths import StatePaths
from app.store import Store

POLL_INTERVAL = 0.5
TAB_IDS = (*VIEWS, "errors")
Action = Callable[[Store, StatePaths], str]


class DashboardApp(JobActions):
    TITLE = "gpusched"
    CSS = """
    #header { height: auto; padding: 0 1; background: $panel; }
    #gpus { height: auto; max-height: 10; }
    /* The filter box is always laid out, on the line under the table: `/` and `Esc` only move
       the focus, so they need no layout pass (showing a hidden box would repaint everything). */
    #status-line { height: 1; }
    #filter { width: 48; height: 1; }
    #switcher { height: 3fr; }
    /* A fixed height and a scrollbar that is always there: a new row count (a tab switch,
       a filter key) then needs no layout pass, which would repaint the whole screen. */
    #jobs { height: 100%; overflow-y: scroll; }
    /* A scrollbar appearing would narrow the table and force a second full repaint. */
    JobTable { scrollbar-gutter: stable; }
    #errors { padding: 0 1; }
    #shown { width: 1fr; height: 1; padding: 0 1; color: $text-muted; }
    #bottom { height: 2fr; min-height: 8; }
    #detail { width: 1fr; height: 100%; border: round $primary; padding: 0 1; }
    #log { width: 1fr; height: 100%; border: round $primary; padding: 0 1; }
    #log.hidden { display: none; }
    """
    BINDINGS = [
        Binding("p", "pause_gpu(True)", "pause GPU"),
        Binding("r", "pause_gpu(False)", "resume GPU"),
        Binding("a", "attach", "attach"),
        Binding("k", "kill", "kill"),
        Binding("R", "retry", "retry"),
        Binding("plus", "priority(-1)", "prio+"),
        Binding("minus", "priority(1)", "prio-"),
        Binding("d", "remove", "remove"),
        Binding("slash", "filter", "filter"),
        Binding("l", "toggle_log", "log"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_dashboard", "quit"),
        Binding("escape", "clear_filter", "clear filter", show=False),
        *(Binding(str(i + 1), f"tab('{tab}')", show=False) for i, tab in enumerate(TAB_IDS)),
    ]

    def __init__(
        self,
        paths: StatePaths,
        *,
        embedded: bool = False,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.embedded = embedded
        self.clock = clock
        self.poll_interval = poll_interval
        self.reader = DashboardReader(paths, clock=clock)
        self.joblist = JobList()
        self.heap = HeapKeeper()
        self.view = "queue"
        self.filter_text = ""
        self.snapshot: Snapshot | None = None
        self.polls = 0
        self._polling = False
        self._poll_again = False
        self._last_poll_error = ""
        self._detail_for: int | None = None
        self.detail_shown: int | None = None
        """The job whose details are on screen (tests and benchmarks wait on it)."""

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield GpuTable(id="gpus")
        yield Tabs(*(Tab(label, id=view) for view, (label, _) in VIEWS.items()),
                   Tab("Errors", id="errors-tab"))  # fmt: skip
        with ContentSwitcher(initial="jobs", id="switcher"):
            yield JobTable(id="jobs")
            with VerticalScroll(id="errors"):
                yield ErrorList(id="errors-list")
        with Horizontal(id="status-line"):
            yield Static(id="shown")
            yield FilterBox(placeholder="/ filter: id, script, env, args, reason", id="filter",
                            compact=True)  # fmt: skip
        with Horizontal(id="bottom"):
            yield DetailPane(id="detail")
            yield LogPane(id="log")
        yield KeyBar()

    def on_mount(self) -> None:
        # The poll worker gives up the GIL at each SQLite call; with Python's default 5 ms
        # switch interval it then waits behind every frame the UI thread renders (bench/
        # dashboard.py: a poll's 3 ms of work took 200 ms of wall time). 1 ms fixes that.
        sys.setswitchinterval(0.001)
        # No animations: the tabs' sliding underline repaints for 0.3 s after every switch,
        # competing with the new rows for the UI thread; nothing here needs to move.
        self.animation_level = "none"
        self.install_screen(HelpScreen(), name="help")
        self.query_one(JobTable).focus()
        self.watch(self.query_one(FilterBox), "value", self._filter_typed, init=False)
        self.request_poll()
        self.set_interval(self.poll_interval, self.request_poll)

    def on_unmount(self) -> None:
        self.reader.close()

    # ---- polling (worker threads) ---------------------------------------------------------

    def request_poll(self) -> None:
        if self._polling:
            self._poll_again = True
            return
        self._polling = True
        self.run_worker(self._poll, thread=True, group="poll")

    def _poll(self) -> None:
        view, text = self.view, self.filter_text
        try:
            snapshot = self.reader.poll()
            self.joblist.merge(snapshot.changed)
            page = self.joblist.page(view if view in VIEWS else "all", text, snapshot.now)
        except Exception as exc:  # e.g. the database locked or unreadable: say so, keep going
            self._from_worker(self._poll_failed, f"{type(exc).__name__}: {exc}")
            return
        self._from_worker(self._apply, snapshot, page, view, text)
        # The other tabs' rows, ready for a switch. Only a head start: page() does the same
        # work when it must, and reports any error it meets, so one here is let go.
        with contextlib.suppress(Exception):
            self.joblist.warm(snapshot.now)

    def _poll_failed(self, error: str) -> None:
        self._polling = False
        if error != self._last_poll_error:  # once per distinct error, not every half second
            self._last_poll_error = error
            self.notify(f"cannot read the state database: {error}", severity="error", timeout=10)

    def _from_worker(self, callback: Callable[..., object], *args: object) -> None:
        """Hand a worker's result to the UI thread; dropped once the dashboard is closing."""
        if self.is_running:
            with contextlib.suppress(RuntimeError, NoMatches):
                self.call_from_thread(callback, *args)

    def _apply(self, snapshot: Snapshot, page: Page, view: str, text: str) -> None:
        self._polling = False
        with contextlib.suppress(NoMatches):  # the screen is being torn down
            self._render_snapshot(snapshot, page, view, text)

    def _render_snapshot(self, snapshot: Snapshot, page: Page, view: str, text: str) -> None:
        self._last_poll_error = ""
        self.snapshot = snapshot
        self.polls += 1
        counts = snapshot.header.counts
        self._update_static("#header", header_text(snapshot.header, snapshot.now))
        self.query_one(GpuTable).show(snapshot.gpus)
        tabs = self.query_one(Tabs)
        for tab_id, (label, _) in VIEWS.items():
            self._label(tabs, tab_id, f"{label} {view_count(tab_id, counts)}")
        self._label(tabs, "errors-tab", f"Errors {len(snapshot.errors)}")
        self.query_one(ErrorList).show(snapshot.errors)
        if (view, text) == (self.view, self.filter_text):
            self._show_jobs(page)
        else:  # the tab or filter changed while the worker ran: redo the page for them
            self._show_jobs()
        selected = self.selected_job_id()
        changed = {job.id for job in snapshot.changed}
        job = self.joblist.jobs.get(selected) if selected is not None else None
        if (
            selected != self._detail_for
            or selected in changed
            or (job is not None and job.status == JobState.RUNNING)
        ):
            self.request_detail()
        self.call_after_refresh(self.heap.after_poll)  # after the frame that shows the rows
        if self._poll_again:
            self._poll_again = False
            self.request_poll()

    def _show_jobs(self, page: Page | None = None) -> None:
        """Show the current tab's rows. Without a page, it is built here from the jobs in
        memory (no database read): a tab switch or a filter key needs no worker round trip."""
        if self.view not in VIEWS:
            return
        text = self.filter_text
        if page is None:
            now = self.snapshot.now if self.snapshot else self.clock()
            page = self.joblist.page(self.view, text, now)
        self.query_one(JobTable).apply(page.rows)
        capped = page.matching > len(page.rows)
        shown = (
            f"{len(page.rows):,} of {page.matching:,} shown"
            if capped
            else (f"{page.matching:,} job{'s' if page.matching != 1 else ''}")
        )
        hint = f" matching '{text}'" if text else ""
        more = " — narrow with / to see the rest" if capped else ""
        self._update_static("#shown", Text(f"{shown}{hint}{more}"))

    def _update_static(self, selector: str, text: Text) -> None:
        """Update a Static only when its text changed: an unchanged poll repaints nothing.

        A layout pass re-renders the whole screen (~50 ms on a big table), so it is asked for
        only when the text's number of lines changed (the header's probe-error line)."""
        widget = self.query_one(selector, Static)
        old = widget.content
        if old != text:
            lines = text.plain.count("\n")
            same_height = isinstance(old, Text) and old.plain.count("\n") == lines
            widget.update(text, layout=not same_height)

    @staticmethod
    def _label(tabs: Tabs, tab_id: str, label: str) -> None:
        tab = tabs.get_tab(tab_id)
        if tab is not None and tab.label_text != label:
            tab.label = label

    def request_detail(self) -> None:
        job_id = self.selected_job_id()
        self._detail_for = job_id
        if job_id is None:
            self._show_detail(None)
            return
        self.run_worker(lambda: self._detail(job_id), thread=True, group="detail", exclusive=True)

    def _detail(self, job_id: int) -> None:
        try:
            detail = self.reader.detail(job_id, lines=60)
        except Exception as exc:  # reported by the next poll if the database is the cause
            self._from_worker(self._notify, f"job {job_id}: {type(exc).__name__}: {exc}", "error")
            return
        self._from_worker(self._show_detail, detail)

    def _show_detail(self, detail: Detail | None) -> None:
        if detail is not None and detail.job.id != self.selected_job_id():
            return  # the cursor moved on meanwhile
        attach = ""
        if detail and detail.job.session and detail.job.status == JobState.RUNNING:
            attach = " ".join(attach_argv(detail.job))
        self.query_one(DetailPane).show(detail, attach)
        self.detail_shown = detail.job.id if detail else None
        self.query_one(LogPane).show(detail)

    @on(JobTable.RowHighlighted, "#jobs")
    def _job_highlighted(self) -> None:
        # After the frame that shows the cursor (or the new rows): the detail worker would
        # compete with that frame for the GIL.
        self.call_after_refresh(self._detail_if_moved)

    def _detail_if_moved(self) -> None:
        if self.selected_job_id() != self._detail_for:
            self.request_detail()

    @on(JobTable.RowSelected, "#jobs")
    def _job_selected(self) -> None:
        self.action_attach()

    @on(Tabs.TabActivated)
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        tab_id = event.tab.id or "queue"  # a click on a tab, or the keys below
        self._switch_view("errors" if tab_id == "errors-tab" else tab_id)

    def _switch_view(self, view: str) -> None:
        if view == self.view:
            return
        self.view = view
        switcher = self.query_one(ContentSwitcher)
        switcher.current = "errors" if self.view == "errors" else "jobs"
        self._show_jobs()
        self.call_after_refresh(self._detail_if_moved)  # as in _job_highlighted

    # ---- selection ------------------------------------------------------------------------

    def selected_job_id(self) -> int | None:
        try:
            key = self.query_one(JobTable).selected_key
        except NoMatches:
            return None
        return int(key) if key is not None and self.view in VIEWS else None

    def selected_job(self) -> Job | None:
        job_id = self.selected_job_id()
        if job_id is None:
            self.notify("No job selected.", severity="warning")
            return None
        return self.joblist.jobs.get(job_id)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.focus()

    def _filter_typed(self, value: str) -> None:
        """Each key in the filter box, at once (Input.Changed would reach the app a few
        message hops later, after the frame that the new rows should be in)."""
        if value != self.filter_text:
            self.filter_text = value
            self._show_jobs()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self.query_one(JobTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        self.filter_text = ""
        self.query_one(JobTable).focus()
        self._show_jobs()

    def action_tab(self, tab_id: str) -> None:
        # The rows first, at once: waiting for the tabs' TabActivated message would leave
        # them out of the next frame.
        self._switch_view(tab_id)
        self.query_one(Tabs).active = "errors-tab" if tab_id == "errors" else tab_id

    def action_toggle_log(self) -> None:
        self.query_one(LogPane).toggle_class("hidden")

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen("help")  # installed once: reopening does not compose it again

    def action_quit_dashboard(self) -> None:
        if not self.embedded:
            self.exit("quit")
            return

        def chosen(choice: str | None) -> None:
            if choice in ("background", "stop"):
                self.exit(choice)

        self.push_screen(QuitScreen(), chosen)
