"""Dashboard benchmark: key-to-repaint latency and the steady-state poll cycle, 100 to 10,000 jobs.

    python bench/dashboard.py [--sizes 100,1000,10000] [--repeats N] [--steady S]
                              [--out docs/benchmarks.md]

For each size a fresh state directory is filled in one SQLite transaction with a realistic mix
(mostly pending; 12 running on 8 GPUs; completed, failed, killed, lost, unschedulable; the
scheduler's GPU snapshot in `meta`; a held scheduler lock; log files; when tmux is installed, a
private tmux server with one live session per running job). The real `DashboardApp` then runs
headless in this process (`App.run_test(size=(160, 45))`, its default 0.5 s polling).

1. Key to repaint. The clock starts just before the key event is handed to the driver
   (`Driver.send_message`, what the terminal driver's input thread does once it has parsed the
   bytes) and stops at the end of the first frame that shows the key's effect. Headless Textual
   runs its whole update path (idle -> the screen's update timer -> layout ->
   `Compositor.render_update` -> `App._display`) and then drops the frame: `_display` skips
   turning it into terminal output when headless. The bench wraps `App._display` to do what the
   real driver path does (`CompositorUpdate.render_segments` on the app's console, truecolor)
   and takes the end of the first frame in which (a) the key's effect is in the widgets' state
   (the cursor row; the rows of a finished poll for the new tab or filter text, compared with
   the rows an independent `JobList` computes from the database; the help screen laid out) and
   (b) no repaint or layout of the widgets concerned is still pending (refresh flags,
   Update/Layout messages queued on the screen).
   Keys are pressed one at a time once the app has settled (no worker running, nothing to
   repaint, no frame for 30 ms); the 0.5 s background poll keeps running, as it does for a
   user. --repeats presses per key kind; the filter is exercised in a third as many rounds of
   `/`, a short word typed a character at a time (each character a sample), `Esc`. During the
   run fd 0 is a pseudo-terminal of the app's size, so that Rich's terminal-size lookups cost
   what they cost in a terminal (see `terminal_stdin`).
2. Steady state. A writer thread gives every running job a new `pid` (a new revision stamp, as
   any write does) and rewrites the GPU snapshot once a second, for --steady seconds on the
   Queue tab and on the Running tab. Each poll cycle is timed in its worker part
   (`DashboardReader.poll`, `JobList.merge`, `JobList.page`) and its UI part
   (`DashboardApp._apply`, of which `JobTable.apply`); rows added to, removed from and
   re-ordered in the tables, and rows re-rendered into lines, are counted.

All instrumentation is instance attributes set on the app, its reader, job list and tables
inside this process; nothing under app/ is modified. The Markdown section between the dashboard
markers in --out is replaced; the rest of the file is left alone (the markers are appended at the
end of the file when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import kill_server, machine_base, stats_ms

# Serve frames as to a truecolor terminal (Textual reads this when it is first imported).
os.environ.setdefault("TEXTUAL_COLOR_SYSTEM", "truecolor")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BEGIN = "<!-- dashboard:begin -->"
END = "<!-- dashboard:end -->"
SIZE = (160, 45)
TARGET_MS = 100.0
RUNNING = 12
GPUS = 8
TAB_KEYS = ("2", "3", "4", "5", "1")  # cycled, so that every press changes the tab
TAB_VIEWS = {"1": "queue", "2": "running", "3": "done", "4": "failed", "5": "all"}
#: Typed into the filter one character at a time (each character is a sample), then cleared.
FILTER_WORDS = ("lla", "qwe", "7b", "eva", "seed", "mis")
PRESS_TIMEOUT = 30.0
Condition = Callable[[Any], bool]

SCRIPTS = ("train.py", "finetune.py", "eval.py", "sweep.py", "pretrain.py", "distill.py")
ENVS = ("", "torch", "llm", "/opt/envs/jax")
MODELS = ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2-7b", "gemma-2-9b", "phi-3-mini", "")
REASONS = (
    "needs 1 GPU: GPUs 0-7 share 1.0/1.0 in use",
    "needs 0.5 GPU with 20000 MB free: GPUs 0-3 share 1.0/1.0 in use; GPUs 4-7 has 9000 MB free",
    "needs 2 GPUs with nothing of ours on them, 0 available (GPUs 0-7 share in use)",
)


# ---- the state directory ----------------------------------------------------------------------


@dataclass
class Fill:
    counts: Counter[str]
    seconds: float
    tmux_socket: str | None


def gpu_snapshot(rng: random.Random) -> str:
    """The `meta` "gpus" value, as the scheduler's probe writes it (GpuSnapshot.__dict__)."""
    gpus = [
        {
            "index": i,
            "name": "NVIDIA RTX A6000",
            "memory_total_mb": 49140,
            "memory_used_mb": rng.randint(9000, 47000),
            "utilization": round(rng.uniform(0.55, 1.0), 2),
        }
        for i in range(GPUS)
    ]
    return json.dumps(gpus)


def state_mix(n: int) -> list[str]:
    """Statuses in submission order: old jobs ended, then the running ones, then the queue."""
    running = min(RUNNING, max(1, n // 4))
    ended = {"completed": n * 20 // 100, "failed": n * 4 // 100, "killed": n // 100,
             "lost": n // 200}  # fmt: skip
    unschedulable = n // 200
    pending = n - running - sum(ended.values()) - unschedulable
    rng = random.Random(n)
    old = [s for s, k in ended.items() for _ in range(k)]
    rng.shuffle(old)
    queue = ["pending"] * pending + ["unschedulable"] * unschedulable
    rng.shuffle(queue)
    return old + ["running"] * running + queue


def job_rows(
    n: int, now: float, logs_dir: Path, jobs_file: str, runner: str
) -> list[tuple[Any, ...]]:
    """`n` rows of the jobs table, in JOB_COLUMNS order."""
    from app.models import dedup_key

    rng = random.Random(1000 + n)
    slots = [(str(g), 1.0) for g in range(4)] + [(str(g), 0.5) for g in range(4, 8)] * 2
    placed = 0
    rows = []
    for i, status in enumerate(state_mix(n)):
        job_id = i + 1
        script = f"/home/ana/proj/{SCRIPTS[i % len(SCRIPTS)]}"
        env = ENVS[(i // 7) % len(ENVS)]
        model = MODELS[(i * 5) % len(MODELS)]
        lr = rng.choice(("1e-4", "3e-4", "1e-3"))
        args = f"--lr {lr} --seed {i} --epochs {rng.randint(1, 20)}"
        if model:
            args = f"--llm {model} {args}"
        submitted = now - (n - i) * 20.0 - 3600
        requirement = vram = gpus = share = session = log = command = pid = code = None
        start = end = None
        reason = ""
        if status != "pending" or i % 3:  # the allocator has looked at it
            requirement = rng.choice((0.5, 1.0, 1.0, 2.0))
            vram = rng.choice((None, None, 20000))
        if status == "pending" and i % 3:
            reason = REASONS[i % len(REASONS)] if i % 11 else f"behind job {max(1, job_id - 7)}"
        elif status == "unschedulable":
            reason, end = "needs 9 GPUs: only 8 exist", submitted + 5
        elif status != "pending":
            if status == "running":
                gpus, share = slots[placed % len(slots)]
                # A third started within the hour: their runtime cell changes every second.
                start = now - rng.uniform(60, 3000 if placed % 3 == 0 else 36000)
                placed += 1
            else:
                gpus, share = str(rng.randrange(GPUS)), 1.0
                start = submitted + rng.uniform(10, 600)
                end = start + rng.uniform(30, 20000)
            session = f"gpujob_{job_id}_{gpus}_{Path(script).stem}"
            log = str(logs_dir / f"job_{job_id}.log")
            command = f"python3 {script} {args} --cuda {gpus}"
            pid = 40000 + job_id
            code = {"completed": 0, "failed": 1, "killed": -15}.get(status)
            ended_reasons = {"failed": "exited with 1",
                             "lost": "session vanished without an exit record"}  # fmt: skip
            reason = ended_reasons.get(status, "")
        rows.append((
            job_id, dedup_key(script, env, args), status, rng.randint(0, 9), job_id, script, env,
            args, None if i % 9 else "0-3", f"{jobs_file}:{job_id + 1}", requirement, gpus,
            share, vram, session, runner if session else None, log, command, pid,
            1 if session else 0, code, reason, 0, None, submitted, submitted, start, end,
        ))  # fmt: skip
    return rows


JOB_COLUMNS = (
    "id", "key", "status", "priority", "seq", "script", "conda_env", "args", "allowed_gpus",
    "source", "requirement", "gpus", "share", "vram_mb", "session", "runner", "log_path",
    "command", "pid", "launched", "exit_code", "reason", "attempts", "next_attempt_at",
    "submitted_at", "queued_at", "started_at", "ended_at",
)  # fmt: skip


def fill_state(root: Path, n: int, now: float) -> Fill:
    """A fresh state directory with `n` jobs, their events and the scheduler's metadata, written
    in one transaction (`stamp_revisions` gives the rows their revisions)."""
    from app.paths import StatePaths
    from app.schema import stamp_revisions
    from app.store import Store

    started = time.perf_counter()
    paths = StatePaths(root).ensure()
    socket = f"gpusched_benchdash_{uuid.uuid4().hex[:10]}" if shutil.which("tmux") else None
    jobs_file = str(root.parent / "jobs.txt")
    rows = job_rows(n, now, paths.logs, jobs_file, f"tmux:{socket or 'gpusched_benchdash_none'}")
    col = {name: i for i, name in enumerate(JOB_COLUMNS)}
    events = []
    for r in rows:
        source = r[col["source"]]
        events.append((r[0], r[col["submitted_at"]], "pending", f"submitted from {source}"))
        if r[col["started_at"]] is not None:
            where = f"on GPU {r[col['gpus']]} in session {r[col['session']]}"
            events.append((r[0], r[col["started_at"]], "running", where))
        if r[col["ended_at"]] is not None:
            events.append((r[0], r[col["ended_at"]], r[col["status"]], r[col["reason"]]))
    meta = {"gpus": gpu_snapshot(random.Random(n)), "gpus_at": str(now),
            "started_at": str(now - 7200), "jobs_file": jobs_file, "backend": "nvml",
            "probe_error": ""}  # fmt: skip
    store = Store(paths.db)
    try:
        with store.tx() as db:
            marks = ",".join("?" * len(JOB_COLUMNS))
            db.executemany(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({marks})", rows)
            stamp_revisions(db)
            db.executemany(
                "INSERT INTO job_events (job_id, at, status, detail) VALUES (?, ?, ?, ?)", events
            )
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            db.execute(
                "INSERT INTO line_errors (file, line, reason, at) VALUES (?, ?, ?, ?)",
                (jobs_file, 3, "priority must be an integer, got 'high'", now - 600),
            )
    finally:
        store.close()
    for r in rows:
        if r[col["log_path"]]:
            lines = (f"[job {r[0]}] step {s} loss {1 / s:.4f}\n" for s in range(1, 80))
            Path(r[col["log_path"]]).write_text("".join(lines))
    if socket is not None:
        try:
            start_sessions(socket, [r[col["session"]] for r in rows if r[2] == "running"])
        except BaseException:
            kill_server(socket)
            raise
    return Fill(Counter(r[2] for r in rows), time.perf_counter() - started, socket)


def start_sessions(socket: str, names: Iterable[str]) -> None:
    """One live session per running job on a private tmux server, printing a line a second
    (the detail pane reads a running job's pane with `capture-pane`)."""
    loop = ('i=0; while :; do i=$((i+1)); echo "epoch 1 step $i loss 0.$((RANDOM % 9000 + 1000))"'
            "; sleep 1; done")  # fmt: skip
    for name in names:
        subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-s", name, "-x", "120",
                        "-y", "40", "sh", "-c", loop], check=True)  # fmt: skip


def expected_keys(db: Path, now: float) -> dict[tuple[str, str], list[str]]:
    """The row keys each tab (and the queue for each filter prefix typed) must show, from an
    independent JobList over the database, computed before the app starts."""
    from app.dashboard.joblist import JobList
    from app.store import Store

    store = Store(db)
    try:
        reference = JobList()
        reference.merge(store.jobs())
    finally:
        store.close()
    wanted = {(view, "") for view in TAB_VIEWS.values()}
    wanted |= {("queue", word[:i]) for word in FILTER_WORDS for i in range(1, len(word) + 1)}
    return {
        (view, text): [key for key, _ in reference.page(view, text, now).rows]
        for view, text in sorted(wanted)
    }


# ---- instrumentation --------------------------------------------------------------------------


@dataclass
class Waiter:
    ready: Condition
    future: asyncio.Future[float]


class FrameProbe:
    """Wraps `App._display`: every frame is serialized as the real driver would do it, then the
    waiters whose condition holds get the frame's end time."""

    def __init__(self, app: Any) -> None:
        from textual._compositor import CompositorUpdate

        self.frames = 0
        self.bytes = 0
        self.last_frame = 0.0  # perf_counter() at the end of the latest frame
        self.waiters: list[Waiter] = []
        self.applied: tuple[str, str] | None = None  # (view, text) of the last rows applied
        self.shown_detail: int | None = None
        original = app._display

        def display(screen: Any, renderable: Any) -> None:
            if renderable is not None and not app._batch_count:
                if isinstance(renderable, CompositorUpdate):
                    data = renderable.render_segments(app.console)
                else:
                    data = app.console._render_buffer(app.console.render(renderable))
                end = self.last_frame = time.perf_counter()
                self.frames += 1
                self.bytes += len(data)
                for waiter in list(self.waiters):
                    if not waiter.future.done():
                        try:
                            if screen is app.screen and waiter.ready(screen):
                                waiter.future.set_result(end)
                        except Exception as exc:  # a broken condition fails the bench, not the app
                            waiter.future.set_exception(exc)
                    if waiter.future.done():
                        self.waiters.remove(waiter)
            original(screen, renderable)

        app._display = display

    def expect(self, ready: Condition) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters.append(Waiter(ready, future))
        return future


def pending(screen: Any, widgets: Iterable[Any]) -> bool:
    """Whether a repaint or layout of `widgets` is still on its way to the screen."""
    from textual import messages

    watched = set(widgets)
    for widget in watched:
        if widget._repaint_required or widget._layout_required or widget._scroll_required:
            return True
    queue = screen._message_queue  # textual._queue.Queue keeps its messages in `values`
    for message in list(getattr(queue, "values", None) or getattr(queue, "_queue", ())):
        if isinstance(message, (messages.Layout, messages.UpdateScroll)):
            return True
        if isinstance(message, messages.Update) and message.widget in watched:
            return True
    return False


STRUCTURAL = ("added", "removed", "reordered")


def applied(after: Counter[str], before: Counter[str]) -> Counter[str]:
    """What one `apply` changed; "rendered" holds the count at apply until the next cycle
    settles it (see `CycleRecorder._settle_rendered`)."""
    delta = Counter({k: after[k] - before[k] for k in STRUCTURAL})
    delta["rendered"] = after["rendered"]
    return delta


class TableCounter:
    """Counts what a `RowTable.apply` changed (rows added, removed, re-ordered) by wrapping the
    instance's `apply`, and reads the table's count of rows rendered into lines."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.counts: Counter[str] = Counter()
        apply = table.apply

        def counted(rows: Any) -> bool:
            order = table.keys
            result = bool(apply(rows))
            before, after = set(order), set(table.keys)
            self.counts["added"] += len(after - before)
            self.counts["removed"] += len(before - after)
            if before == after and table.keys != order:
                self.counts["reordered"] += 1
            return result

        table.apply = counted

    def snapshot(self) -> Counter[str]:
        return Counter({**self.counts, "rendered": self.table.rendered})


@dataclass
class Cycle:
    """One poll cycle; seconds."""

    changed: int = 0
    poll_s: float = 0.0
    merge_s: float = 0.0
    page_s: float = 0.0
    ui_s: float = 0.0
    table_s: float = 0.0
    jobs_calls: Counter[str] = field(default_factory=Counter)
    gpu_calls: Counter[str] = field(default_factory=Counter)
    current: bool = False  # its rows were for the tab and filter on screen, so they were applied
    applied_at: float = 0.0

    @property
    def worker_s(self) -> float:
        return self.poll_s + self.merge_s + self.page_s


class CycleRecorder:
    """Times each poll cycle (worker part in the worker thread, UI part in `_apply`), counts the
    tables' calls and times the jobs table's deferred dimension updates."""

    def __init__(self, app: Any, probe: FrameProbe) -> None:
        self.app = app
        self.log: list[Cycle] = []
        self.renders: list[tuple[float, float]] = []  # (start, seconds) of jobs table lines
        self.jobs: TableCounter | None = None
        self.gpus: TableCounter | None = None
        self._current = Cycle()
        self._table_s = 0.0
        reader, joblist = app.reader, app.joblist
        poll, merge, page, apply = reader.poll, joblist.merge, joblist.page, app._apply

        def timed_poll() -> Any:
            t0 = time.perf_counter()
            self._current = cycle = Cycle()
            snapshot = poll()
            cycle.poll_s = time.perf_counter() - t0
            cycle.changed = len(snapshot.changed)
            return snapshot

        def timed_merge(changed: Any) -> None:
            t0 = time.perf_counter()
            merge(changed)
            self._current.merge_s = time.perf_counter() - t0

        def timed_page(view: str, text: str, now: float) -> Any:
            t0 = time.perf_counter()
            result = page(view, text, now)
            self._current.page_s = time.perf_counter() - t0
            return result

        def timed_apply(snapshot: Any, page_: Any, view: str, text: str) -> None:
            if self.jobs is None:
                self._attach_tables()
            assert self.jobs is not None and self.gpus is not None
            cycle = self._current
            jobs_before, gpus_before = self.jobs.snapshot(), self.gpus.snapshot()
            self._settle_rendered(jobs_before, gpus_before)
            cycle.current = (view, text) == (app.view, app.filter_text)
            self._table_s = 0.0
            t0 = time.perf_counter()
            apply(snapshot, page_, view, text)
            cycle.applied_at = time.perf_counter()
            cycle.ui_s = cycle.applied_at - t0
            cycle.table_s = self._table_s
            cycle.jobs_calls = applied(self.jobs.snapshot(), jobs_before)
            cycle.gpu_calls = applied(self.gpus.snapshot(), gpus_before)
            self.log.append(cycle)
            if cycle.current:
                probe.applied = (view, text)

        reader.poll, joblist.merge, joblist.page = timed_poll, timed_merge, timed_page
        app._apply = timed_apply
        show_jobs = app._show_jobs

        def traced_show_jobs(page_: Any = None) -> None:
            # A tab switch or a filter key shows its rows at once from the jobs in memory
            # (no poll): those rows count as applied too.
            show_jobs(page_)
            probe.applied = (app.view, app.filter_text)

        app._show_jobs = traced_show_jobs

    def _settle_rendered(self, jobs_now: Counter[str], gpus_now: Counter[str]) -> None:
        """Rows are rendered in the frames after `_apply`: what was rendered between the
        previous cycle's apply and this one belongs to the previous cycle."""
        if self.log:
            last = self.log[-1]
            last.jobs_calls["rendered"] = jobs_now["rendered"] - last.jobs_calls["rendered"]
            last.gpu_calls["rendered"] = gpus_now["rendered"] - last.gpu_calls["rendered"]

    def _attach_tables(self) -> None:
        from app.dashboard.widgets import GpuTable, JobTable

        table = self.app.query_one(JobTable)
        apply, render_line = table.apply, table.render_line

        def timed_apply(rows: Any) -> bool:
            t0 = time.perf_counter()
            try:
                return bool(apply(rows))
            finally:
                self._table_s += time.perf_counter() - t0

        def timed_render_line(y: int) -> Any:
            t0 = time.perf_counter()
            try:
                return render_line(y)
            finally:
                self.renders.append((t0, time.perf_counter() - t0))

        table.apply, table.render_line = timed_apply, timed_render_line
        # Counting wraps the timed apply, so its own bookkeeping stays out of `table_s`.
        self.jobs = TableCounter(table)
        self.gpus = TableCounter(self.app.query_one(GpuTable))

    def jobs_calls(self) -> Counter[str]:
        return self.jobs.snapshot() if self.jobs is not None else Counter()


def key_event(key: str) -> Any:
    """The Key event Textual's own `App._press_keys` builds for `key`."""
    import unicodedata

    from textual import events
    from textual.keys import REPLACED_KEYS, _character_to_key, _get_unicode_name_from_key

    if len(key) == 1 and not key.isalnum():
        key = _character_to_key(key)
    original = REPLACED_KEYS.get(key, key)
    try:
        char: str | None = unicodedata.lookup(_get_unicode_name_from_key(original))
    except KeyError:
        char = key if len(key) == 1 else None
    return events.Key(key, char)


# ---- one size ---------------------------------------------------------------------------------

KINDS = (
    ("down", "cursor ↓ (jobs table)"),
    ("up", "cursor ↑ (jobs table)"),
    ("detail", "cursor ↓/↑ → detail pane shows the job"),
    ("tab", "tab switch `1`–`5` (new rows shown)"),
    ("slash", "`/` opens the filter box"),
    ("char", "filter: type a character (filtered rows shown)"),
    ("clear", "filter: `Esc` clears (all rows back)"),
    ("help", "`?` opens the help screen"),
    ("unhelp", "`Esc` closes the help screen"),
)
LABEL = dict(KINDS)


@dataclass(frozen=True)
class Phases:
    """One press, seconds: the whole key-to-repaint and parts measured inside it."""

    total: float
    worker: float  # poll worker(s): DashboardReader.poll + JobList.merge + JobList.page
    ui: float  # DashboardApp._apply in the UI thread
    table: float  # of which JobTable.apply
    render: float  # the jobs table rendering its lines (cached rows: a lookup and a style)


@dataclass
class SizeResult:
    n: int
    counts: Counter[str]
    fill_s: float
    startup_s: float
    keys: dict[str, list[float]]
    key_calls: dict[str, Counter[str]]
    phases: dict[str, list[Phases]]
    steady: dict[str, list[Cycle]]
    full_frame_s: list[float]
    frames: int
    tmux: bool
    others: float = math.nan  # cores the rest of the machine kept busy meanwhile, on average


def rows_shown(app: Any, probe: FrameProbe, view: str, text: str, want: list[str]) -> Condition:
    """The jobs table shows exactly `want` for (view, text), applied (by a poll or at once)."""

    def ready(screen: Any) -> bool:
        from app.dashboard.widgets import JobTable

        try:
            table, shown = app.query_one(JobTable), app.query_one("#shown")
        except Exception:  # not mounted yet
            return False
        return (
            probe.applied == (view, text)
            and (app.view, app.filter_text) == (view, text)
            and table._order == want
            and not pending(screen, [table, shown])
        )

    return ready


class Bench:
    def __init__(self, app: Any, pilot: Any, probe: FrameProbe, recorder: CycleRecorder,
                 expected: dict[tuple[str, str], list[str]]) -> None:  # fmt: skip
        from app.dashboard.widgets import JobTable

        self.app, self.pilot, self.probe, self.recorder = app, pilot, probe, recorder
        self.expected = expected
        self.table = app.query_one(JobTable)
        self.samples: dict[str, list[float]] = {kind: [] for kind, _ in KINDS}
        self.calls: dict[str, Counter[str]] = {kind: Counter() for kind, _ in KINDS}
        self.phases: dict[str, list[Phases]] = {kind: [] for kind, _ in KINDS}

    def rows(self, view: str, text: str = "") -> Condition:
        return rows_shown(self.app, self.probe, view, text, self.expected[view, text])

    async def settle(self, quiet: float = 0.03) -> None:
        """No worker running, no animation, nothing left to repaint in the jobs table and no
        frame for `quiet` seconds (layout passes of other widgets have gone out too)."""
        app = self.app
        deadline = time.monotonic() + PRESS_TIMEOUT
        while True:
            await self.pilot._wait_for_screen()
            await app.animator.wait_until_complete()
            busy = app._polling or any(not w.is_finished for w in app.workers)
            if (
                not busy
                and not pending(app.screen, [self.table])
                and time.perf_counter() - self.probe.last_frame >= quiet
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the dashboard did not settle")
            await asyncio.sleep(0.005)

    async def press(
        self, key: str, *conditions: tuple[str, Condition], record: bool = True
    ) -> None:
        """Press `key` once settled; per named condition, the time to the first frame showing it."""
        await self.settle()
        calls = self.recorder.jobs_calls()
        futures = [self.probe.expect(ready) for _, ready in conditions]
        t0 = time.perf_counter()
        self.app._driver.send_message(key_event(key))
        ends = []
        for (kind, _), future in zip(conditions, futures, strict=True):
            try:
                ends.append(await asyncio.wait_for(future, PRESS_TIMEOUT))
            except TimeoutError:
                raise TimeoutError(f"no frame showed the effect of {key!r} ({kind})") from None
        await self.settle(quiet=0)  # for the counts; the next press settles fully first
        if not record:
            return
        for (kind, _), end in zip(conditions, ends, strict=True):
            self.samples[kind].append(end - t0)
        first, end = conditions[0][0], ends[0]
        self.calls[first] += self.recorder.jobs_calls() - calls
        cycles = [c for c in self.recorder.log if t0 <= c.applied_at <= end]
        self.phases[first].append(Phases(
            total=end - t0,
            worker=sum(c.worker_s for c in cycles),
            ui=sum(c.ui_s for c in cycles),
            table=sum(c.table_s for c in cycles),
            render=sum(d for start, d in self.recorder.renders if t0 <= start <= end),
        ))  # fmt: skip

    async def cursor(self, repeats: int) -> None:
        from app.dashboard.widgets import DetailPane, LogPane

        table, probe = self.table, self.probe
        panes = [self.app.query_one(DetailPane), self.app.query_one(LogPane)]
        for key, step in (("down", 1), ("up", -1)):
            for _ in range(repeats):
                target = table.cursor_row + step
                if not 0 <= target < len(table._order):
                    break
                job = int(table._order[target])

                def moved(screen: Any, target: int = target) -> bool:
                    return table.cursor_row == target and not pending(screen, [table])

                def detail(screen: Any, job: int = job) -> bool:
                    return probe.shown_detail == job and not pending(screen, panes)

                await self.press(key, (key, moved), ("detail", detail))

    async def tabs(self, repeats: int) -> None:
        from textual.widgets import Tabs

        tabs = self.app.query_one(Tabs)
        for i in range(repeats):
            key = TAB_KEYS[i % len(TAB_KEYS)]
            rows = self.rows(TAB_VIEWS[key])

            def ready(screen: Any, view: str = TAB_VIEWS[key], rows: Condition = rows) -> bool:
                return tabs.active == view and rows(screen)

            await self.press(key, ("tab", ready))
        await self.show_tab("queue")

    async def show_tab(self, view: str) -> None:
        if self.app.view != view:
            key = next(k for k, v in TAB_VIEWS.items() if v == view)
            await self.press(key, ("tab", self.rows(view)), record=False)

    async def filter(self, rounds: int) -> None:
        """`/`, a word typed one character at a time, `Esc`; `rounds` times."""
        from textual.widgets import Input

        box = self.app.query_one("#filter", Input)

        def opened(screen: Any) -> bool:
            return box.has_focus and box.display and not pending(screen, [box])

        back = self.rows("queue")

        def cleared(screen: Any) -> bool:
            return not box.has_focus and box.value == "" and back(screen)

        for i in range(rounds):
            word = FILTER_WORDS[i % len(FILTER_WORDS)]
            await self.press("/", ("slash", opened))
            for end in range(1, len(word) + 1):
                text = word[:end]
                rows = self.rows("queue", text)

                def filtered(screen: Any, text: str = text, rows: Condition = rows) -> bool:
                    return box.value == text and rows(screen) and not pending(screen, [box])

                await self.press(word[end - 1], ("char", filtered))
            await self.press("escape", ("clear", cleared))

    async def help(self, repeats: int) -> None:
        from app.dashboard.screens import HelpScreen

        main = self.app.screen

        def opened(screen: Any) -> bool:
            if not isinstance(screen, HelpScreen):
                return False
            widgets = list(screen.query("*"))
            laid_out = screen._compositor.widgets
            return all(w in laid_out for w in widgets) and not pending(screen, widgets)

        def closed(screen: Any) -> bool:
            return screen is main and not pending(screen, [self.table])

        for _ in range(repeats):
            await self.press("?", ("help", opened))
            await self.press("escape", ("unhelp", closed))

    async def full_frames(self, samples: int) -> list[float]:
        """A full-screen render and serialization with warm caches: what a whole frame costs."""
        out = []
        for _ in range(samples):
            await self.settle()
            t0 = time.perf_counter()
            update = self.app.screen._compositor.render_update(
                full=True, screen_stack=self.app._background_screens
            )
            update.render_segments(self.app.console)
            out.append(time.perf_counter() - t0)
        return out

    async def steady(self, db: Path, view: str, seconds: float) -> list[Cycle]:
        """Poll cycles while a writer changes every running job once a second."""
        await self.show_tab(view)
        await self.settle()
        start = len(self.recorder.log)
        with Writer(db) as writer:
            await asyncio.sleep(seconds)
        # A short run's only write may still be on its way to a poll: give it a few periods.
        deadline = time.monotonic() + 4 * self.app.poll_interval
        while writer.writes and not any(c.changed for c in self.recorder.log[start:]):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        await self.settle()
        return self.recorder.log[start:]


class Writer:
    """Once a second: every running job gets a new pid (so a new revision) and the GPUs new
    figures, in one transaction on its own connection."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        conn = sqlite3.connect(self.db, timeout=30.0, isolation_level=None)
        try:
            while not self.stop.wait(1.0):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE jobs SET pid = pid + 1 WHERE status = 'running'")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('gpus', ?), ('gpus_at', ?)",
                    (gpu_snapshot(rng), str(time.time())),
                )
                conn.execute("COMMIT")
                self.writes += 1
        finally:
            conn.close()

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


async def run_size(n: int, work: Path, repeats: int, steady: float) -> SizeResult:
    from app.control import SchedulerLock
    from app.dashboard.app import DashboardApp
    from app.paths import StatePaths

    root = work / f"n{n}" / "state"
    now = time.time()
    fill = fill_state(root, n, now)
    paths = StatePaths(root)
    lock = SchedulerLock(paths)
    try:
        lock.acquire()  # the header shows a running scheduler, as it usually does
        expected = expected_keys(paths.db, now)
        app = DashboardApp(paths)
        probe = FrameProbe(app)
        recorder = CycleRecorder(app, probe)
        show_detail = app._show_detail

        def shown(detail: Any) -> None:
            show_detail(detail)
            if detail is not None and detail.job.id == app.selected_job_id():
                probe.shown_detail = detail.job.id

        app._show_detail = shown
        first = probe.expect(rows_shown(app, probe, "queue", "", expected["queue", ""]))
        t0 = time.perf_counter()
        async with app.run_test(size=SIZE) as pilot:
            startup = await asyncio.wait_for(first, 120) - t0
            bench = Bench(app, pilot, probe, recorder, expected)
            await bench.settle()
            await bench.cursor(repeats)
            await bench.tabs(repeats)
            await bench.filter(math.ceil(repeats / 3))
            await bench.help(repeats)
            full = await bench.full_frames(10)
            cycles = {view: await bench.steady(paths.db, view, steady)
                      for view in ("queue", "running")}  # fmt: skip
        return SizeResult(n, fill.counts, fill.seconds, startup, bench.samples, bench.calls,
                          bench.phases, cycles, full, probe.frames,
                          fill.tmux_socket is not None)  # fmt: skip
    finally:
        lock.release()
        kill_server(fill.tmux_socket)


class CpuMeter:
    """CPU time the rest of the machine used meanwhile: all CPUs' busy time (/proc/stat) minus
    this process's own (and its children's), in cores busy on average."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        busy = math.nan
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def others(self) -> float:
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self._sample()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


# ---- report -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import importlib.metadata as md

    return {
        **machine_base(),
        "Python": platform.python_version(),
        "Textual": md.version("textual"),
        "Rich": md.version("rich"),
        "SQLite": sqlite3.sqlite_version,
    }


def steady_cycles(r: SizeResult, view: str) -> list[Cycle]:
    """The steady-state cycles that brought changed jobs and applied rows to the table."""
    return [c for c in r.steady[view] if c.changed and c.current]


def structural_calls(cycles: Iterable[Cycle]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in cycles:
        total.update({k: c.jobs_calls[k] for k in STRUCTURAL})
    return total


def median_max(values: Sequence[float]) -> str:
    return f"{statistics.median(values):g} / {max(values):g}" if values else "-"


def render(results: Sequence[SizeResult], command: str, took: float) -> str:
    from app.dashboard.joblist import ROW_CAP

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tmux = "yes" if all(r.tmux for r in results) else "no (tmux not installed)"
    lines = [
        BEGIN,
        "## Dashboard responsiveness",
        "",
        f"Generated by `{command}` on {when} ({took:.0f} s).",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()) + ". Other "
        "processes kept "
        + ", ".join(f"{r.others:.2f}" for r in results)
        + " cores busy on average while the sizes "
        + ", ".join(f"{r.n:,}" for r in results)
        + " ran (all CPUs' busy time in /proc/stat minus the bench's own).",
        "",
        "Each size is a fresh state database filled in one transaction: mostly pending jobs, "
        f"{RUNNING} running on {GPUS} GPUs (with live tmux sessions on a private server: {tmux}), "
        "20 % completed, 4 % failed, 1 % killed, a few lost and unschedulable, with job events, "
        "log files and the scheduler's GPU snapshot; a held scheduler lock makes the header show "
        "a running scheduler. The real `DashboardApp` runs headless in the bench's process "
        f"(`App.run_test(size={SIZE})`) with its default 0.5 s polling, which goes on during the "
        f"measurements. Tabs show at most {ROW_CAP:,} rows.",
        "",
        "### Key to repaint",
        "",
        "The clock starts just before the key event is handed to the driver "
        "(`Driver.send_message`, which a real driver's input thread calls once it has parsed the "
        "bytes) and stops at the end of the first frame that shows the key's effect. Headless "
        "Textual runs its whole update path (idle → the screen's update timer, at most 60 frames "
        "a second → layout → `Compositor.render_update`, which renders the changed widgets' "
        "lines → `App._display`) and then drops the frame; the bench wraps `App._display` to "
        "turn every frame into terminal output as the real driver path does "
        "(`CompositorUpdate.render_segments` on the app's console, truecolor), so only the "
        "`write` to a terminal is missing. The frame that ends a sample is the first in which "
        "the key's effect is in the widgets' state (the cursor row; for tabs and the filter, the "
        "rows of a finished poll for that tab and filter text, compared with the rows an "
        "independent `JobList` computes from the database; the help screen with all its widgets "
        "laid out) and no repaint or layout of those widgets is still pending (their refresh "
        "flags, `Update`/`Layout` messages queued on the screen). Keys are pressed one at a "
        "time once the app has settled (no worker running, nothing left to repaint, no frame "
        "for 30 ms). During the run stdin is a pseudo-terminal of the app's size, so "
        "Rich's terminal-size lookups (one per cell rendered) cost what they cost in a "
        "terminal. "
        "Cells: median / p95 ms (n samples).",
        "",
        "| key | " + " | ".join(f"{r.n:,} jobs" for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for kind, label in KINDS:
        cells = []
        for r in results:
            s = stats_ms(r.keys[kind]) if r.keys[kind] else None
            cells.append(f"{s.median:.1f} / {s.p95:.1f} (n={s.n})" if s else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    startup = " | ".join(f"{r.startup_s * 1000:.0f}" for r in results)
    full = " | ".join(
        f"{s.median:.1f} / {s.p95:.1f}" for s in (stats_ms(r.full_frame_s) for r in results)
    )
    lines += [
        f"| for scale: open the dashboard → first frame with the queue's rows (one sample) "
        f"| {startup} |",
        f"| for scale: one whole-screen frame, warm caches, no key | {full} |",
        "",
    ]
    under = [
        label
        for kind, label in KINDS
        if all(r.keys[kind] and stats_ms(r.keys[kind]).p95 < TARGET_MS for r in results)
    ]
    over = []
    for kind, label in KINDS:
        worst = [(stats_ms(r.keys[kind]), r.n) for r in results if r.keys[kind]]
        missed = [(s, n) for s, n in worst if s.p95 >= TARGET_MS]
        if missed:
            where = ", ".join(f"{n:,} jobs {s.median:.0f} / {s.p95:.0f}" for s, n in missed)
            over.append(f"{label} ({where})")
    lines += [
        f"Against the {TARGET_MS:.0f} ms target: p95 under {TARGET_MS:.0f} ms at every size: "
        + ("; ".join(under) if under else "none")
        + f". p95 at or over {TARGET_MS:.0f} ms (median / p95 ms): "
        + ("; ".join(over) if over else "none")
        + ".",
        "",
        "Where the time of the keys that need a poll goes, medians per press in ms (each "
        "part's median on its own, so the parts need not add up): the poll worker "
        "(`DashboardReader.poll` + `JobList.merge` + `JobList.page`, worker thread, wall time: "
        "it includes waiting for the GIL while the UI thread renders), the UI "
        "thread's `DashboardApp._apply`, of which `JobTable.apply` (adding, removing, updating "
        "rows), and the jobs table rendering its lines (`RowTable.render_line`: a row is "
        "rendered into a cached strip once, then each repaint is a lookup and a style). The "
        "rest is Textual's own work (message passing, layout, rendering frames, the frame "
        "timer) and threads waiting for the GIL. Tab switches and filter keys do not wait "
        "for a poll: their rows are built at once in the UI thread from the jobs already in "
        "memory (`DashboardApp._show_jobs`), so their poll and `_apply` columns read 0; the "
        "time is Textual replacing the table's rows and laying out and repainting the screen, "
        "which is why it hardly depends on the number of jobs.",
        "",
        "| key | jobs | total | poll worker | `_apply` | of which `JobTable.apply` | "
        "line rendering | rows added / removed per press | rows rendered per press |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("tab", "char", "clear"):
        for r in results:
            phases = r.phases[kind]
            if not phases:
                continue
            parts = [statistics.median(getattr(p, name) for p in phases) * 1000
                     for name in ("total", "worker", "ui", "table", "render")]  # fmt: skip
            calls, n = r.key_calls[kind], len(phases)
            lines.append(
                f"| {LABEL[kind]} | {r.n:,} | "
                + " | ".join(f"{v:.1f}" for v in parts)
                + f" | {calls['added'] / n:.0f} / {calls['removed'] / n:.0f} | "
                f"{calls['rendered'] / n:.0f} |"
            )
    lines += [
        "",
        "### Steady state: running jobs updated every second",
        "",
        "A writer thread gives every running job a new `pid` (so a new revision stamp, as any "
        "write by the scheduler does) and rewrites the GPU snapshot once a second while the "
        "dashboard polls every 0.5 s, on the Queue tab and then on the Running tab. Counted are "
        "the poll cycles that brought changed jobs. Worker = `DashboardReader.poll` + "
        "`JobList.merge` + `JobList.page` (worker thread, wall time); UI = "
        "`DashboardApp._apply` (UI thread), of which `JobTable.apply`: median / p95 ms. Rows "
        "added, removed and re-ordered are counted by wrapping the tables' `apply` inside the "
        "bench process, as totals over those cycles; rows re-rendered into lines (a row whose "
        "cells changed) are per cycle (median / max).",
        "",
        "| jobs | tab | rows shown | cycles | changed jobs | worker ms | UI ms | "
        "of which jobs table ms | jobs table: added / removed / re-ordered | "
        "jobs rows re-rendered | GPU rows re-rendered |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    total = Counter[str]()
    for r in results:
        for view in r.steady:
            cycles = steady_cycles(r, view)
            if not cycles:
                lines.append(f"| {r.n:,} | {view} | - | 0 | - | - | - | - | - | - | - |")
                continue
            calls = structural_calls(cycles)
            total += calls
            worker, ui, table = (stats_ms([getattr(c, a) for c in cycles])
                                 for a in ("worker_s", "ui_s", "table_s"))  # fmt: skip
            lines.append(
                f"| {r.n:,} | {view} | {shown_rows(r, view, ROW_CAP):,} | {len(cycles)} | "
                f"{median_max([c.changed for c in cycles])} | "
                f"{worker.median:.1f} / {worker.p95:.1f} | {ui.median:.1f} / {ui.p95:.1f} | "
                f"{table.median:.1f} / {table.p95:.1f} | "
                + " / ".join(str(calls[k]) for k in STRUCTURAL)
                + f" | {median_max([c.jobs_calls['rendered'] for c in cycles])} | "
                f"{median_max([c.gpu_calls['rendered'] for c in cycles])} |"
            )
    lines += ["", "Result: " + steady_verdict(total), "", END]
    return "\n".join(lines)


def shown_rows(r: SizeResult, view: str, cap: int) -> int:
    states = {"queue": ("pending", "unschedulable"), "running": ("running",)}[view]
    return min(sum(r.counts[s] for s in states), cap)


def steady_verdict(total: Counter[str]) -> str:
    if not sum(total.values()):
        return (
            "in these cycles the jobs table never added, removed or re-ordered a row: "
            "updates of running jobs re-render only the rows that changed."
        )
    return (
        "in these cycles the jobs table was rebuilt in part: "
        + ", ".join(f"{k} ×{v}" for k, v in total.items() if v)
        + "."
    )


def write_section(out: Path, section: str) -> None:
    benchlib.write_section(out, section, BEGIN, END, "# Benchmarks\n\n")


@contextlib.contextmanager
def terminal_stdin(columns: int, rows: int) -> Iterator[None]:
    """Make fd 0 a pseudo-terminal of the app's size for the duration.

    Rich asks for the terminal's size whenever it measures (`Console.size`, reached when a
    cell is rendered): in a terminal the first `os.get_terminal_size` (stdin) answers; with
    no terminal at all (pipes, CI) it tries stdin, stdout and stderr and all three fail, which
    makes every measurement dearer than it is for a user.
    """
    import fcntl
    import struct
    import termios

    try:
        master, slave = os.openpty()
    except OSError:
        yield
        return
    saved = os.dup(0)
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        os.dup2(slave, 0)
        yield
    finally:
        os.dup2(saved, 0)
        for fd in (saved, slave, master):
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="100,1000,10000", help="job counts (100,1000,10000)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="presses per key kind (30); filter rounds: a third")  # fmt: skip
    parser.add_argument("--steady", type=float, default=5.0,
                        help="seconds of steady-state updates per tab (5)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not sizes or min(sizes) < 20 or args.repeats < 1 or args.steady < 1.5:
        parser.error("--sizes must be >= 20 each, --repeats >= 1 and --steady >= 1.5")

    command = (f"python bench/dashboard.py --sizes {','.join(map(str, sizes))} "
               f"--repeats {args.repeats} --steady {args.steady:g}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpusched_benchdash_"))
    started = time.monotonic()
    results = []
    try:
        print(f"workspace {work}", flush=True)
        for n in sizes:
            t0 = time.monotonic()
            meter = CpuMeter()
            with terminal_stdin(*SIZE):
                result = asyncio.run(run_size(n, work, args.repeats, args.steady))
            result.others = meter.others()
            results.append(result)
            print(f"{n:,} jobs: {time.monotonic() - t0:.0f} s, {result.frames} frames, other "
                  f"processes kept {result.others:.2f} cores busy")  # fmt: skip
            for kind, label in KINDS:
                if result.keys[kind]:
                    s = stats_ms(result.keys[kind])
                    print(f"  {label}: median {s.median:.1f} ms, p95 {s.p95:.1f} ms (n={s.n})")
            for view in result.steady:
                cycles = steady_cycles(result, view)
                calls = structural_calls(cycles)
                cells = sum(c.jobs_calls["rendered"] for c in cycles)
                verdict = "OK, no rebuild" if not sum(calls.values()) else "TABLE REBUILT"
                print(f"  steady {view}: {len(cycles)} cycles, rows added/removed/re-ordered "
                      f"{'/'.join(str(calls[k]) for k in STRUCTURAL)}, "
                      f"rows re-rendered {cells}: {verdict}", flush=True)  # fmt: skip
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    section = render(results, command, time.monotonic() - started)
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
