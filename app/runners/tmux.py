"""Run each job in its own detached tmux session, so users can attach and watch it.

The pane runs `app/wrapper.py`, which starts the job and writes its exit record; tmux is
only the terminal. Each launch is a single tmux invocation (commands separated by `;`), so
the log pipe and remain-on-exit are in place before tmux reads the job's first byte.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from pathlib import Path

import libtmux
from libtmux import exc as tmux_exc
from libtmux.common import tmux_cmd

from app import proctree
from app.launch import LaunchRequest
from app.runners.base import SESSION_PREFIX, Launched, LaunchError, RunnerError, SessionState
from app.runners.common import prepare_launch, wrapper_argv

#: Pane option marking the job's own pane: a user who attaches may split the window, and
#: the job's status must come from the wrapper's pane, not theirs.
PANE_MARK = "@gpusched_job"

#: tmux's replies when no server is running on the socket: then there are no sessions.
_NO_SERVER = ("no server running", "error connecting to")
_NO_SESSION = ("can't find session", "can't find window", "can't find pane")


def _fmt_escape(text: str) -> str:
    """tmux expands `#{...}` formats in `-c` and in pipe-pane's command: keep `#` literal."""
    return text.replace("#", "##")


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


class TmuxRunner:
    """Jobs as tmux sessions on the user's default server, or on `tmux -L socket_name`."""

    name = "tmux"

    def __init__(self, socket_name: str | None = None) -> None:
        self.socket_name = socket_name
        self.server = libtmux.Server(socket_name=socket_name)

    def _cmd(self, *args: str) -> tmux_cmd:
        try:
            return self.server.cmd(*args)
        except tmux_exc.TmuxCommandNotFound as e:
            raise LaunchError("tmux is not installed (not found on PATH)") from e

    def has_session(self, session: str) -> bool:
        # `=NAME` is an exact match: plain NAME would also match a prefix of another name.
        res = self._cmd("has-session", "-t", f"={session}")
        return res.returncode == 0

    def launch(self, req: LaunchRequest) -> Launched:
        name = req.session
        prepare_launch(req)
        # The job's environment travels in the spec, not through tmux: a server that is
        # already running (the user's) would give the pane *its* global environment, not
        # the scheduler's, and new-session -e cannot remove variables. The wrapper applies
        # the spec's environment exactly, keeping only the pane's own terminal variables.
        target = f"={name}:"
        res = self._cmd(
            # -P -F: the pane's pid comes back from this same call (no extra list-panes).
            "new-session", "-d", "-P", "-F", "#{pane_pid}", "-s", name, "-x", "200", "-y", "50",
            "-c", _fmt_escape(req.cwd),
            # Several words: tmux execs them directly, no shell ever parses them.
            *wrapper_argv(req.spec_file),
            ";", "set-option", "-w", "-t", target, "remain-on-exit", "on",
            ";", "set-option", "-p", "-t", target, PANE_MARK, str(req.job_id),
            ";", "pipe-pane", "-t", target, "-o",
            _fmt_escape(f"cat >> {shlex.quote(str(req.log_path))}"),
        )  # fmt: skip
        if res.returncode != 0:
            err = " ".join(res.stderr) or f"exit status {res.returncode}"
            # A later command of the list failed after new-session succeeded: don't leave a
            # job running without its log, or a retry would hit "already exists".
            # A duplicate name was left by an earlier launch: the daemon decides what to do.
            if "duplicate session" in err:
                raise LaunchError(f"session {name} already exists")
            if self.has_session(name):
                self.kill(name, grace_s=1.0)
            raise LaunchError(f"tmux could not start {name}: {err}")
        out = res.stdout[0].strip() if res.stdout else ""
        return Launched(session=name, pid=int(out) if out.isdigit() else None)

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
            if any(s in err.lower() for s in _NO_SERVER):
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
        res = self._cmd("list-panes", "-s", "-t", f"={session}", "-F", "#{pane_dead}\t#{pane_pid}")
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
        self.remove(session)

    def remove(self, session: str) -> None:
        """Remove the session (no error if already gone); kill() first if it may still run."""
        res = self._cmd("kill-session", "-t", f"={session}")
        err = " ".join(res.stderr).lower()
        if res.returncode != 0 and not any(s in err for s in (*_NO_SESSION, *_NO_SERVER)):
            raise RunnerError(f"tmux kill-session {session} failed: {err}")

    def attach_argv(self, session: str) -> list[str]:
        """The command a user runs to watch the job."""
        base = ["tmux"] if self.socket_name is None else ["tmux", "-L", self.socket_name]
        inside = os.environ.get("TMUX", "")
        if not inside:
            return [*base, "attach", "-t", session]
        # $TMUX is "SOCKET_PATH,PID,INDEX". switch-client only works on the server we are
        # inside of; for another server, attach nested with TMUX unset (tmux refuses else).
        inside_socket = Path(inside.split(",", 1)[0]).name
        if self.socket_name is None or inside_socket == self.socket_name:
            return [*base, "switch-client", "-t", session]
        return ["env", "-u", "TMUX", *base, "attach", "-t", session]

    def pane_tail(self, session: str, lines: int = 50) -> list[str]:
        """The last `lines` non-blank-trailing lines on screen/history; [] if gone."""
        res = self._cmd("capture-pane", "-p", "-J", "-t", f"={session}:", "-S", f"-{lines}")
        if res.returncode != 0:
            return []
        out = list(res.stdout)
        while out and not out[-1].strip():
            out.pop()
        return out[-lines:]
