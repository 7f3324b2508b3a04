"""Run each job in its own detached tmux session, so users can attach and watch it.

The pane runs `app/wrapper.py`, which starts the job and writes its exit record; tmux is
only the terminal. Each launch is a single tmux invocation (commands separated by `;`), so
the log pipe and remain-on-exit are in place before tmux reads the job's first byte. After
a launch a spare session (`gpusched_spare_<token>`) is started with a wrapper waiting for the
next job, which the next launch renames (runners/spare.py): no interpreter start-up then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import weakref
from pathlib import Path
from typing import NoReturn

import libtmux
from libtmux.common import tmux_cmd
from libtmux.exc import TmuxCommandNotFound

from app import proctree
from app.launch import LaunchRequest
from app.runners.base import SESSION_PREFIX, Launched, LaunchError, RunnerError, SessionState
from app.runners.common import SPARES, prepare_launch, wrapper_argv
from app.runners.spare import Chores, FifoSpare

log = logging.getLogger("gpusched")

#: Pane option marking the job's own pane: a user who attaches may split the window, and
#: the job's status must come from the wrapper's pane, not theirs.
PANE_MARK = "@gpusched_job"

#: tmux's replies when no server is running on the socket: then there are no sessions.
_NO_SERVER = ("no server running", "error connecting to")
_NO_SESSION = ("can't find session", "can't find window", "can't find pane")


def _fmt_escape(text: str) -> str:
    """tmux expands `#{...}` formats in `-c` and in pipe-pane's command: keep `#` literal.
    And an argument ending in `;` ends a command in tmux's argv (a cwd `/x/a;` would make
    the rest of the launch a command of its own): `\\;` there is a literal `;`."""
    text = text.replace("#", "##")
    return text[:-1] + "\\;" if text.endswith(";") else text


def _dead_status(status: str, dead_signal: str) -> int | None:
    """Exit status of a dead pane, 128+N when killed by signal N, shell style.

    None while the pane runs, and briefly after it died: tmux can notice the closed
    terminal before it has collected the exit status.
    """
    if status.isdigit():
        return int(status)
    if dead_signal.isdigit():
        return 128 + int(dead_signal)
    return None


def _remain_on_exit(session: str) -> tuple[str, ...]:
    """`; set-option ...`: keep the job's dead pane, whose exit status is the fallback when
    the wrapper left no record."""
    return (";", "set-option", "-w", "-t", f"={session}:", "remain-on-exit", "on")


def _close_spares(spares: list[FifoSpare]) -> None:
    while spares:
        spares.pop().close()


class TmuxRunner:
    """Jobs as tmux sessions on the user's default server, or on `tmux -L socket_name`."""

    name = "tmux"

    def __init__(self, socket_name: str | None = None) -> None:
        self.socket_name = socket_name
        self.server = libtmux.Server(socket_name=socket_name)
        #: At most one spare wrapper waiting for the next job (started after a launch).
        self._spares: list[FifoSpare] = []
        self._in_pass = False
        self._chores = Chores()  # what a scheduler pass leaves for a quiet moment
        weakref.finalize(self, _close_spares, self._spares)

    def _cmd(self, *args: str) -> tmux_cmd:
        try:
            return self.server.cmd(*args)
        except TmuxCommandNotFound as e:
            raise LaunchError("tmux is not installed (not found on PATH)") from e

    def has_session(self, session: str) -> bool:
        # `=NAME` is an exact match: plain NAME would also match a prefix of another name.
        res = self._cmd("has-session", "-t", f"={session}")
        return res.returncode == 0

    def launch(self, req: LaunchRequest) -> Launched:
        name = req.session
        if name in self._chores.removals:  # a finished job's dead pane of that name: first
            self._chores.removals.remove(name)
            self._remove_now(name)
        spare = self._take_spare()
        prepare_launch(req, spare=spare.token if spare is not None else None)
        # The job's environment travels in the spec, not through tmux: a server that is
        # already running (the user's) would give the pane *its* global environment, not
        # the scheduler's, and new-session -e cannot remove variables. The wrapper applies
        # the spec's environment exactly, keeping only the pane's own terminal variables.
        target = f"={name}:"
        setup = (
            ";", "set-option", "-p", "-t", target, PANE_MARK, str(req.job_id),
            ";", "pipe-pane", "-t", target, "-o",
            _fmt_escape(f"cat >> {shlex.quote(str(req.log_path))}"),
        )  # fmt: skip
        launched = self._launch_on_spare(spare, req, setup) if spare is not None else None
        if launched is not None:
            # remain-on-exit only once the spare has its job: a scheduler dying in between
            # leaves a spare that reads EOF and exits, and its session must then vanish
            # (the job goes back to the queue) rather than read as a job that failed.
            keep = [name]
        else:
            keep = []
            launched = self._launch_new(req, (*_remain_on_exit(name), *setup))
        if self._in_pass:  # later, when the job has started: see `chores`
            self._chores.add(spare_dir=req.spec_file.parent, keep=keep)
        else:
            for session in keep:
                self._cmd(*_remain_on_exit(session)[1:])
            self._fill_spares(req.spec_file.parent)  # for the next launches
        return launched

    def _launch_new(self, req: LaunchRequest, setup: tuple[str, ...]) -> Launched:
        name = req.session
        res = self._cmd(
            # -P -F: the pane's pid comes back from this same call (no extra list-panes).
            "new-session", "-d", "-P", "-F", "#{pane_pid}", "-s", name, "-x", "200", "-y", "50",
            "-c", _fmt_escape(req.cwd),
            # Several words: tmux execs them directly, no shell ever parses them.
            *wrapper_argv(req.spec_file),
            *setup,
        )  # fmt: skip
        if res.returncode != 0:
            self._launch_failed(name, res)
        out = res.stdout[0].strip() if res.stdout else ""
        return Launched(session=name, pid=int(out) if out.isdigit() else None)

    def _launch_failed(self, name: str, res: tmux_cmd) -> NoReturn:
        err = " ".join(res.stderr) or f"exit status {res.returncode}"
        # A later command of the list failed after new-session succeeded: don't leave a
        # job running without its log, or a retry would hit "already exists".
        # A duplicate name was left by an earlier launch: the daemon decides what to do.
        if "duplicate session" in err:
            raise LaunchError(f"session {name} already exists")
        if self.has_session(name):
            self.kill(name, grace_s=1.0)
        raise LaunchError(f"tmux could not start {name}: {err}")

    def _launch_on_spare(
        self, spare: FifoSpare, req: LaunchRequest, setup: tuple[str, ...]
    ) -> Launched | None:
        """Rename the spare's session to the job's, set it up, then hand the spec over.
        None when the spare is unusable (its session is gone)."""
        renamed = False
        try:
            res = self._cmd("rename-session", "-t", f"={spare.session}", req.session, *setup)
            if res.returncode != 0:
                if "duplicate session" in " ".join(res.stderr) or self.has_session(req.session):
                    self._launch_failed(req.session, res)  # renamed, then a later step failed
                return None
            renamed = True
            if not spare.hand_over(req.spec_file):
                self.kill(req.session, grace_s=1.0)
                raise LaunchError(f"the spare wrapper of {req.session} did not take its job")
            return Launched(session=req.session, pid=spare.pid)
        finally:
            spare.close()
            if not renamed:
                self._cmd("kill-session", "-t", f"={spare.session}")

    def _take_spare(self) -> FifoSpare | None:
        """The waiting spare if it is listening; one still starting (several launches in one
        pass) stays for a later launch, which is quicker than waiting for it now."""
        for i, spare in enumerate(self._spares):
            if spare.opened():
                return self._spares.pop(i)
        return None

    def _prepare_spare(
        self, run_dir: Path, before: tuple[str, ...] = (), after: tuple[str, ...] = ()
    ) -> bool:
        """Start a wrapper, in a session of its own, that waits for the next job. The same
        tmux call runs the `;`-separated commands `before` and `after` it. False if they
        were not all done (then the caller does them one by one)."""
        if len(self._spares) >= SPARES:
            return False  # enough: a pass launching more jobs starts the others anew
        try:
            spare = FifoSpare(run_dir)
        except OSError as e:
            log.debug("no spare wrapper: %s", e)
            return False
        res = self._cmd(
            "new-session", "-d", "-P", "-F", "#{pane_pid}", "-s", spare.session,
            "-x", "200", "-y", "50", "-c", _fmt_escape(str(run_dir)), *spare.argv(),
            ";", "set-option", "-w", "-t", f"={spare.session}:", "remain-on-exit", "off",
            *before, *after,
        )  # fmt: skip
        out = res.stdout[0].strip() if res.stdout else ""
        if not out.isdigit():
            spare.close()
            self._cmd("kill-session", "-t", f"={spare.session}")
            return False
        spare.pid = int(out)
        self._spares.append(spare)
        return res.returncode == 0  # a failed kill stops the list: the rest one by one

    def _fill_spares(
        self, run_dir: Path, before: tuple[str, ...] = (), after: tuple[str, ...] = ()
    ) -> bool:
        """Start spares up to SPARES; the first tmux call also runs `before` and `after`
        (True if it did)."""
        removed = self._prepare_spare(run_dir, before, after)
        while len(self._spares) < SPARES and self._prepare_spare(run_dir):
            pass
        return removed

    def close_spares(self) -> None:
        """Let the waiting spare go (it exits, and its session with it)."""
        _close_spares(self._spares)

    def sessions(self) -> dict[str, SessionState]:
        """The scheduler's sessions (`gpujob_*`) by name; {} when no tmux server runs."""
        found, server_pid, unreaped = self._list_panes()
        if unreaped and server_pid is not None:
            # tmux (builds with libutempter, e.g. Debian/Ubuntu 3.3a) can miss the SIGCHLD
            # of a pane that exits right after it is spawned (tmux/tmux#311): the wrapper
            # stays a zombie, the pane reads dead but without its status. Another SIGCHLD
            # makes tmux reap it (waitpid WNOHANG loop); harmless otherwise. Best effort:
            # a later call sees the status if this one is still too early.
            with contextlib.suppress(OSError):
                os.kill(server_pid, signal.SIGCHLD)
            found, _, _ = self._list_panes()
        return found

    def _list_panes(self) -> tuple[dict[str, SessionState], int | None, bool]:
        """(sessions, tmux server pid, whether a dead job pane lacks its exit status)."""
        fmt = "\t".join(
            (
                "#{session_name}",
                "#{pane_dead}",
                "#{pane_pid}",
                "#{pane_dead_status}",
                "#{pane_dead_signal}",
                "#{" + PANE_MARK + "}",
                "#{pid}",
            )
        )
        res = self._cmd("list-panes", "-a", "-F", fmt)
        if res.returncode != 0:
            err = " ".join(res.stderr)
            # "no current target": a server whose last session just ended (it is exiting).
            if any(s in err.lower() for s in (*_NO_SERVER, "no current target")):
                return {}, None, False
            raise RunnerError(f"tmux list-panes failed: {err}")
        found: dict[str, tuple[bool, SessionState]] = {}
        server_pid: int | None = None
        unreaped = False
        for line in res.stdout:
            # rsplit: the session name is the only field a user could have put a tab in.
            parts = line.rsplit("\t", 6)
            if len(parts) != 7 or not parts[0].startswith(SESSION_PREFIX):
                continue
            name, dead, pid, status, dead_signal, mark, tmux_pid = parts
            state = SessionState(
                name=name,
                alive=dead != "1",
                pid=int(pid) if pid.isdigit() else None,
                dead_status=_dead_status(status, dead_signal),
            )
            server_pid = int(tmux_pid) if tmux_pid.isdigit() else server_pid
            unreaped = unreaped or (not state.alive and state.dead_status is None)
            # One row per pane: prefer the marked job pane, else the session's first pane.
            if name not in found or (mark and not found[name][0]):
                found[name] = (bool(mark), state)
        return {name: state for name, (_, state) in found.items()}, server_pid, unreaped

    def _live_pane_pids(self, session: str) -> list[int]:
        # `=NAME:` with the colon: list-panes parses its target as a window, and a bare
        # `=NAME` there still matches a longer session name by prefix (tmux 3.3a).
        target = f"={session}:"
        res = self._cmd("list-panes", "-s", "-t", target, "-F", "#{pane_dead}\t#{pane_pid}")
        pids: list[int] = []
        for line in res.stdout if res.returncode == 0 else []:
            dead, _, pid = line.partition("\t")
            # A dead pane's pid may already belong to an unrelated process: never signal it.
            if dead != "1" and pid.isdigit():
                pids.append(int(pid))
        return pids

    def kill(self, session: str, grace_s: float = 5.0) -> None:
        """Kill the job's whole process tree (blocks up to ~grace_s), then its session."""
        for pid in self._live_pane_pids(session):
            proctree.kill_tree(pid, grace_s=grace_s)
        self._remove_now(session)

    def remove(self, session: str) -> None:
        """Remove the session (no error if already gone); kill() first if it may still run.
        During a scheduler pass (`begin_pass`) it is only noted, for `do_chores`."""
        if self._in_pass:
            self._chores.add(removal=session)
        else:
            self._remove_now(session)

    # ---- scheduler passes: what can wait until the pass's jobs have started ----------------

    def begin_pass(self) -> None:
        self._in_pass = True

    def end_pass(self) -> None:
        self._in_pass = False

    def chores_since(self) -> float | None:
        """Since when (time.monotonic()) chores are waiting; None if none."""
        return self._chores.since

    def do_chores(self, spare: bool = True) -> None:
        """Remove the finished jobs' sessions and start the next spare, in one tmux call.
        Run once the jobs a pass launched are past their start-up: on 2 cores, a spare's
        interpreter starting next to a job's slows that job's start by as much."""
        removals, keep, spare_dir = self._chores.take()
        before = tuple(a for session in keep for a in _remain_on_exit(session))
        after = tuple(a for name in removals for a in (";", "kill-session", "-t", f"={name}"))
        if spare and spare_dir is not None and self._fill_spares(spare_dir, before, after):
            return
        for session in keep:  # one by one: a session already gone fails only its own
            self._cmd(*_remain_on_exit(session)[1:])
        for session in removals:
            try:
                self._remove_now(session)
            except RunnerError as e:  # nobody to tell but the log
                log.warning("%s", e)

    def _remove_now(self, session: str) -> None:
        res = self._cmd("kill-session", "-t", f"={session}")
        err = " ".join(res.stderr).lower()
        if res.returncode != 0 and not any(s in err for s in (*_NO_SESSION, *_NO_SERVER)):
            raise RunnerError(f"tmux kill-session {session} failed: {err}")

    def attach_argv(self, session: str) -> list[str]:
        """The command a user runs to watch the job."""
        base = ["tmux"] if self.socket_name is None else ["tmux", "-L", self.socket_name]
        target = f"={session}"  # exact: `-t gpujob_1` would also take gpujob_1x by prefix
        inside = os.environ.get("TMUX", "")
        if not inside:
            return [*base, "attach", "-t", target]
        # $TMUX is "SOCKET_PATH,PID,INDEX". switch-client only works on the server we are
        # inside of; for another server, attach nested with TMUX unset (tmux refuses else).
        inside_socket = Path(inside.split(",", 1)[0]).name
        if self.socket_name is None or inside_socket == self.socket_name:
            return [*base, "switch-client", "-t", target]
        return ["env", "-u", "TMUX", *base, "attach", "-t", target]

    def pane_tail(self, session: str, lines: int = 50) -> list[str]:
        """The last `lines` non-blank-trailing lines on screen/history; [] if gone."""
        res = self._cmd("capture-pane", "-p", "-J", "-t", f"={session}:", "-S", f"-{lines}")
        if res.returncode != 0:
            return []
        out = list(res.stdout)
        while out and not out[-1].strip():
            out.pop()
        return out[-lines:]
