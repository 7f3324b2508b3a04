"""Run each job as a plain child process of the scheduler: no tmux or screen needed.

The child is the same `app/wrapper.py` the tmux runner starts (same spec, same exit
record, which stays the source of truth), in a new session (`start_new_session`), so the
job's whole tree can be killed and Ctrl-C in the scheduler's terminal does not reach it.
stdin is /dev/null; stdout and stderr share one pipe, read by a thread that writes every
byte to the job's log (from the first byte, flushed at once) and echoes each line to a
console sink as `[job 12] epoch 1 loss 0.3`. On the console a `\\r` redraw (progress bar)
shows only its last state; the log keeps the raw bytes. A pipe makes Python jobs
block-buffer their output, so `PYTHONUNBUFFERED=1` is added unless the job sets it.

Lifetime: the children belong to this scheduler process and cannot be re-adopted. A new
`DirectRunner` (a restarted scheduler) knows no sessions, so the reaper finishes jobs that
left an exit record and marks the others lost. `close()`, also run at interpreter exit,
SIGTERMs the remaining trees (SIGKILL after a grace period): a job must not keep running
on GPUs that a restarted scheduler believes free. The wrapper forwards the SIGTERM and
records the job's exit (usually 143). A scheduler killed outright (SIGKILL, crash) leaves
its children orphaned: with no reader on their pipe, they die of SIGPIPE at their next
write, but a silent one keeps running. `kill_orphan()` lets a restarted scheduler (or the
CLI, which runs in another process) kill such a wrapper's tree given its pid and spec.

Direct jobs cannot be attached to: `attach_argv()` is `tail -f` on the job's log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app import proctree
from app.launch import LaunchRequest
from app.runners.base import Launched, LaunchError, RunnerError, SessionState
from app.runners.common import SPARES, WRAPPER, prepare_launch, wrapper_argv
from app.runners.output import Echo, LineSplitter, Pump, read_last_lines
from app.runners.spare import PipeSpare, is_spare_of

log = logging.getLogger("gpusched")

__all__ = ["DirectRunner", "Echo", "LineSplitter", "kill_orphan", "stdout_echo", "tail_argv"]


def stdout_echo(line: str) -> None:
    """The default console sink: the scheduler's stdout, flushed per line."""
    out = sys.stdout
    if out is not None:
        with contextlib.suppress(OSError, ValueError):
            out.write(line + "\n")
            out.flush()


def tail_argv(log_path: Path) -> list[str]:
    """What a user runs to watch a direct job: its log, followed."""
    return ["tail", "-f", str(log_path)]


def exit_status(returncode: int) -> int:
    """Popen's returncode in shell style: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Child:
    job_id: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    threads: tuple[threading.Thread, ...]


def _state(name: str, child: _Child) -> SessionState:
    # A waiter thread reaps the wrapper (no zombie); poll() reads what it collected.
    code = child.proc.poll()
    return SessionState(
        name=name,
        alive=code is None,
        pid=child.proc.pid,
        dead_status=None if code is None else exit_status(code),
    )


def _alive(p: proctree.ProcInfo) -> bool:
    now = proctree.read_proc(p.pid)
    return now is not None and now.start_time == p.start_time and now.state not in ("Z", "X")


def _signal(procs: Iterable[proctree.ProcInfo], sig: signal.Signals) -> None:
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)


def terminate_trees(roots: list[int], grace_s: float) -> None:
    """`proctree.kill_tree` for several trees under one grace period, without threads
    (this also runs at interpreter exit, when no thread can be started)."""
    tree = [p for root in roots for p in proctree.collect_tree(root)]
    _signal(tree, signal.SIGTERM)
    _signal(tree, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in tree):
        if time.monotonic() >= deadline:
            survivors = [p for p in tree if _alive(p)]
            late = [proctree.read_proc(c) for p in survivors for c in proctree.descendants(p.pid)]
            _signal([*survivors, *(p for p in late if p is not None)], signal.SIGKILL)
            return
        time.sleep(0.05)


def _retire(spares: list[PipeSpare]) -> None:
    while spares:
        spares.pop().retire()


def _close_all(
    children: dict[str, _Child], lock: threading.Lock, grace_s: float, spares: list[PipeSpare]
) -> list[str]:
    with lock:
        items = list(children.items())
        children.clear()
        idle, spares[:] = list(spares), []
    _retire(idle)
    live = [(name, c) for name, c in items if c.proc.poll() is None]
    if live:
        log.info("stopping %d direct job(s): %s", len(live), ", ".join(n for n, _ in live))
        terminate_trees([c.proc.pid for _, c in live], grace_s)
    for _, child in items:
        for thread in child.threads:  # the log gets the job's last words
            thread.join(timeout=1.0)
    return [name for name, _ in live]


def _spare_token(spec_file: Path) -> object:
    """The token of the spare wrapper that ran this spec, if one did."""
    try:
        return json.loads(spec_file.read_text(encoding="utf-8")).get("spare")
    except (OSError, ValueError, AttributeError):
        return None


def kill_orphan(pid: int, spec_file: Path, grace_s: float = 5.0) -> bool:
    """Kill the tree of a direct job's wrapper that this process does not own.

    For a job left by an earlier scheduler, or killed from another process (the CLI):
    `pid` is the wrapper's (Launched.pid, stored with the job). It is only killed if its
    command line is still the wrapper of `spec_file`, or the spare wrapper whose token the
    spec names (runners/spare.py), so a reused pid is never signalled.
    Returns whether a wrapper was found and killed.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    expected = [os.fsencode(WRAPPER), os.fsencode(spec_file)]
    if argv[-2:] != expected and not is_spare_of(argv, _spare_token(spec_file)):
        return False
    info = proctree.read_proc(pid)
    if info is None or not _alive(info):
        return False
    proctree.kill_tree(pid, grace_s=grace_s)
    return True


class DirectRunner:
    """Jobs as child processes of this scheduler, their output echoed to a console sink."""

    name = "direct"

    def __init__(
        self, echo: Echo | None = stdout_echo, *, grace_s: float = 5.0, unbuffered: bool = True
    ) -> None:
        self.echo = echo
        self.grace_s = grace_s
        self.unbuffered = unbuffered
        self._lock = threading.Lock()
        self._echo_lock = threading.Lock()
        self._children: dict[str, _Child] = {}
        self._launching: set[str] = set()
        self._spares: list[PipeSpare] = []  # wrappers waiting for the next jobs (SPARES)
        self._closed = False
        self._in_pass = False
        self._chores_since: float | None = None  # a spare to start, since
        # At interpreter exit, children still running are stopped (see the module's doc).
        self._finalizer = weakref.finalize(
            self, _close_all, self._children, self._lock, grace_s, self._spares
        )

    def launch(self, req: LaunchRequest) -> Launched:
        name = req.session
        env = dict(req.env)
        if self.unbuffered:
            env.setdefault("PYTHONUNBUFFERED", "1")
        req = dataclasses.replace(req, env=env)
        with self._lock:  # a name is taken from the check on, as by tmux's new-session
            if name in self._children or name in self._launching:
                raise LaunchError(f"session {name} already exists")
            self._launching.add(name)
        try:
            child = self._start(req)
        except BaseException:
            with self._lock:
                self._launching.discard(name)
            raise
        with self._lock:
            self._launching.discard(name)
            self._children[name] = child
        return Launched(session=name, pid=child.proc.pid)

    def _start(self, req: LaunchRequest) -> _Child:
        with self._lock:
            spare = self._spares.pop(0) if self._spares else None  # the oldest: likely ready
        try:
            prepare_launch(req, spare=spare.token if spare is not None else None)
            log_file = req.log_path.open("ab")
        except OSError as e:
            if spare is not None:
                spare.retire()
            raise LaunchError(f"cannot prepare {req.session}: {e}") from e
        proc = spare.proc if spare is not None and spare.hand_over(req.spec_file) else None
        if proc is None:
            if spare is not None:
                spare.retire()
            try:
                # The wrapper's own environment is the job's: the wrapper then applies the
                # spec's unchanged (its "pane variables" have the spec's values).
                proc = subprocess.Popen(
                    wrapper_argv(req.spec_file),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=req.env,
                    start_new_session=True,
                    bufsize=0,
                )
            except OSError as e:
                log_file.close()
                raise LaunchError(f"cannot start {req.session}: {e}") from e
        assert proc.stdout is not None
        pump = Pump(req.job_id, proc.stdout, log_file, self.echo, self._echo_lock)
        threads = (
            threading.Thread(target=pump.run, name=f"{req.session}-output", daemon=True),
            threading.Thread(target=proc.wait, name=f"{req.session}-wait", daemon=True),
        )
        for thread in threads:
            thread.start()
        if self._in_pass:  # later, when the job has started (see TmuxRunner.do_chores)
            self._chores_since = self._chores_since or time.monotonic()
        else:
            self._fill_spares()  # for the next launches
        return _Child(req.job_id, proc, req.log_path, threads)

    # ---- scheduler passes (as TmuxRunner's) -----------------------------------------------

    def begin_pass(self) -> None:
        self._in_pass = True

    def end_pass(self) -> None:
        self._in_pass = False

    def chores_since(self) -> float | None:
        return self._chores_since

    def do_chores(self, spare: bool = True) -> None:
        self._chores_since = None
        if spare:
            self._fill_spares()

    def _fill_spares(self) -> None:
        """Start wrappers that wait on their stdin for the next jobs, up to SPARES."""
        while self._prepare_spare():
            pass

    def _prepare_spare(self) -> bool:
        """Start one spare (runners/spare.py); False when there are enough or it failed."""
        with self._lock:
            if len(self._spares) >= SPARES:
                return False
        try:
            spare = PipeSpare()
        except OSError as e:
            log.debug("no spare wrapper: %s", e)
            return False
        with self._lock:
            if not self._closed:
                self._spares.append(spare)
                return True
        spare.retire()
        return False

    def sessions(self) -> dict[str, SessionState]:
        """The children this instance started and has not removed; dead ones included."""
        with self._lock:
            items = list(self._children.items())
        return {name: _state(name, child) for name, child in items}

    def _child(self, session: str) -> _Child | None:
        with self._lock:
            return self._children.get(session)

    def kill(self, session: str, grace_s: float | None = None) -> None:
        """Kill the job's whole process tree (blocks up to ~grace_s), then forget it.

        No error for an unknown session (another process's job: see `kill_orphan`).
        """
        child = self._child(session)
        if child is None:
            return
        if child.proc.poll() is None:
            proctree.kill_tree(child.proc.pid, grace_s=self.grace_s if grace_s is None else grace_s)
        self.remove(session)

    def remove(self, session: str) -> None:
        """Forget a finished child (no error if unknown); kill() first if it may still run.

        A child still running is not signalled; its waiter thread still reaps it.
        """
        with self._lock:
            self._children.pop(session, None)

    def close(self, grace_s: float | None = None) -> list[str]:
        """Stop every child still running (SIGTERM, SIGKILL after grace_s) and forget all.

        Returns the sessions that were still running. Also runs at interpreter exit.
        """
        with self._lock:
            self._closed = True
        grace = self.grace_s if grace_s is None else grace_s
        return _close_all(self._children, self._lock, grace, self._spares)

    def log_path(self, session: str) -> Path | None:
        child = self._child(session)
        return None if child is None else child.log_path

    def attach_argv(self, session: str) -> list[str]:
        """Direct jobs have no terminal to attach to: follow the job's log instead."""
        path = self.log_path(session)
        if path is None:
            raise RunnerError(
                f"session {session} is not a job of this scheduler process; "
                "follow its log (tail -f) instead"
            )
        return tail_argv(path)

    def pane_tail(self, session: str, lines: int = 50) -> list[str]:
        """The log's last `lines` lines as a terminal would show them; [] if unknown."""
        path = self.log_path(session)
        return [] if path is None or lines <= 0 else read_last_lines(path, lines)
