"""Run each job in its own detached GNU Screen session (`screen -r NAME` to watch it).

The session's only window runs `app/wrapper.py`, as with tmux; its exit record is the source
of truth for how the job ended. Screen keeps no readable exit status (zombie windows only
print it), so a session just disappears once the wrapper has written its record and exited:
`dead_status` is always None, and the reaper, which reads the record before it looks at the
sessions, still gets the real exit code. A wrapper that left no record (unreadable spec,
SIGKILL) makes its session read as vanished: the job is lost.

Screen's quirks handled here:
- `screen -dm` returns once it has forked the server, before the session exists, and later
  errors (a socket path too long for `sun_path`) are silent: launch() waits for the wrapper.
- Names are not unique and `-S NAME` also matches longer names: sessions are addressed as
  `PID.NAME` from `screen -ls`, and launch() refuses a name already in use.
- The log name goes through screen's `%` escapes and `^X` syntax: both are doubled.
  `logfile flush 0` (generated screenrc) writes each byte at once instead of every 10 s.
- `hardcopy` keeps only the low byte of non-ASCII characters (a tqdm bar comes out garbled),
  so pane_tail() renders the end of the log, named on the screen server's command line.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from app import proctree
from app.launch import LaunchRequest
from app.paths import file_size
from app.runners.base import SESSION_PREFIX, Launched, LaunchError, RunnerError, SessionState
from app.runners.common import WRAPPER, prepare_launch, wrapper_argv

#: Screen refuses longer session names ("Session-name is too long").
NAME_MAX = 80
#: A session's socket, SCREENDIR/PID.NAME, must fit `sockaddr_un.sun_path` (108 bytes with
#: its NUL); screen fails silently (no session, exit status 0) when it does not.
SOCKET_PATH_MAX = 107
#: Screen expands the log file name into a 768-byte buffer and truncates what is longer.
LOGFILE_MAX = 700

#: Read by the screen server before it creates the job's window (after /etc/screenrc;
#: instead of ~/.screenrc, whose settings could change how the job runs or is logged).
#: `zombie` without keys: the window closes when the wrapper exits, whatever the system
#: screenrc says; no utmp entries per job; scrollback for users who attach.
SCREENRC = """\
logfile flush 0
defscrollback 1000
deflogin off
zombie
"""

_START_TIMEOUT_S = 10.0
_QUIT_TIMEOUT_S = 5.0
_POLL_S = 0.01
_CALL_TIMEOUT_S = 30.0
#: How much of the log's end pane_tail() reads: enough for screens of long lines.
_TAIL_BYTES = 256 * 1024

#: The last line of `screen -ls`; it also names the socket directory.
_LS_DIR = re.compile(r"^(?:No Sockets found in|\d+ Sockets? in) (.+)\.$")
#: Terminal escape sequences (CSI, OSC, charset, other ESC x) and other control characters.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[()*+].|\x1b[@-_]"
    r"|[\x00-\x08\x0b-\x1f\x7f]"
)


@dataclass(frozen=True)
class _Socket:
    """One session from `screen -ls`."""

    pid: int  # the screen server's
    name: str
    dead: bool  # its server is gone; only the socket file is left

    @property
    def id(self) -> str:
        """How screen commands address exactly this session."""
        return f"{self.pid}.{self.name}"


def escape_logfile(path: str) -> str:
    """Keep `%` (screen's escapes) and `^` (control characters) literal in a log name."""
    return path.replace("%", "%%").replace("^", "^^")


def unescape_logfile(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        out.append(text[i])
        i += 2 if text[i] in "%^" and text[i + 1 : i + 2] == text[i] else 1
    return "".join(out)


def parse_ls(text: str) -> tuple[list[_Socket], str | None]:
    """(sessions, socket directory) from `screen -ls`; directory None if not recognised."""
    sockets: list[_Socket] = []
    sockdir: str | None = None
    for line in text.splitlines():
        if match := _LS_DIR.match(line.strip()):
            sockdir = match.group(1)
            continue
        if not line.startswith("\t"):
            continue
        # "\tPID.NAME\t(date)\t(Detached)"; the state is last: (Dead ???), (Remote or dead).
        fields = line[1:].split("\t")
        pid, dot, name = fields[0].partition(".")
        if pid.isdigit() and dot and name:
            dead = len(fields) > 1 and "dead" in fields[-1].lower()
            sockets.append(_Socket(pid=int(pid), name=name, dead=dead))
    return sockets, sockdir


def render_tail(data: bytes, lines: int, *, partial_first: bool) -> list[str]:
    """The last `lines` lines of raw terminal output, roughly as a terminal shows them."""
    text = data.decode("utf-8", errors="replace")
    rows = text.split("\n")
    if partial_first and len(rows) > 1:
        rows = rows[1:]  # cut mid-line (and maybe mid-character) by the read offset
    out: list[str] = []
    for row in rows:
        # A carriage return redraws the line (progress bars): keep what was drawn last.
        shown = row.rstrip("\r").rsplit("\r", 1)[-1]
        out.append(_ESCAPES.sub("", shown).rstrip())
    while out and not out[-1]:
        out.pop()
    return out[-lines:] if lines > 0 else []


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        # Kernels without CONFIG_PROC_CHILDREN: scan the parent links.
        if proctree.read_proc(pid) is None:
            return []
        return [
            c for c in proctree.descendants(pid) if (i := proctree.read_proc(c)) and i.ppid == pid
        ]
    except (OSError, ValueError):
        return []


def _running(pid: int) -> bool:
    info = proctree.read_proc(pid)
    return info is not None and info.state not in ("Z", "X")


def _pid_digits() -> int:
    try:
        return len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        return 7  # pid_max is at most 2^22


class ScreenRunner:
    """Jobs as screen sessions in the user's socket directory, or in `socket_dir`."""

    name = "screen"

    def __init__(self, socket_dir: str | None = None) -> None:
        # Absolute: attach_argv() hands it to a process that may run in another directory.
        self.socket_dir = None if socket_dir is None else str(Path(socket_dir).absolute())

    def _env(self) -> dict[str, str]:
        # STY/WINDOW describe the screen session the scheduler may itself run in.
        env = {k: v for k, v in os.environ.items() if k not in ("STY", "WINDOW")}
        if self.socket_dir is not None:
            env["SCREENDIR"] = self.socket_dir
        return env

    def _ensure_socket_dir(self) -> None:
        """Screen wants SCREENDIR to exist, be ours and have mode 0700."""
        if self.socket_dir is None:
            return
        path = Path(self.socket_dir)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
            if stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.getuid():
                path.chmod(0o700)
        except OSError as e:
            raise RunnerError(f"cannot prepare screen socket directory {path}: {e}") from e

    def _run(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        screen = shutil.which("screen")
        if screen is None:
            raise LaunchError("GNU screen is not installed (not found on PATH)")
        try:
            return subprocess.run(
                [screen, *args],
                env=self._env(),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_CALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RunnerError(f"screen {' '.join(args[:3])} timed out") from e
        except OSError as e:
            raise RunnerError(f"cannot run screen: {e}") from e

    def _list(self) -> tuple[list[_Socket], str]:
        """Every session in the socket directory (the user's too), and that directory."""
        self._ensure_socket_dir()
        res = self._run("-ls")
        sockets, sockdir = parse_ls(res.stdout)
        if sockdir is None:
            err = (res.stdout + res.stderr).strip() or f"exit status {res.returncode}"
            raise RunnerError(f"screen -ls failed: {err}")
        return sockets, sockdir

    def _live(self, session: str) -> list[_Socket]:
        return [s for s in self._list()[0] if s.name == session and not s.dead]

    def _wrapper_of(self, server_pid: int) -> int | None:
        """The pid of the job's wrapper in the session of `server_pid`, None once it exited.

        Recognised by its command line (`... wrapper.py SPEC`), so a window a user opened in
        the session is never taken for the job. A window not yet exec'ed still has the
        server's command line, which also ends with the wrapper's arguments: skipped.
        """
        server_argv = _cmdline(server_pid)
        for child in _children(server_pid):
            argv = _cmdline(child)
            is_wrapper = len(argv) >= 2 and Path(argv[-2]).name == WRAPPER.name
            if is_wrapper and argv != server_argv and _running(child):
                return child
        return None

    def launch(self, req: LaunchRequest) -> Launched:
        name = req.session
        if len(name) > NAME_MAX:
            raise LaunchError(f"session name {name} is too long for screen (max {NAME_MAX})")
        logfile = escape_logfile(str(req.log_path))
        if len(logfile) > LOGFILE_MAX:
            raise LaunchError(f"log path too long for screen (max {LOGFILE_MAX}): {req.log_path}")
        sockets, sockdir = self._list()
        mine = [s for s in sockets if s.name == name]
        if any(not s.dead for s in mine):
            raise LaunchError(f"session {name} already exists")
        for s in mine:  # a dead server's socket: screen -wipe would drop it too
            Path(sockdir, s.id).unlink(missing_ok=True)
        if len(sockdir) + len(name) + _pid_digits() + 2 > SOCKET_PATH_MAX:
            raise LaunchError(
                f"screen socket directory {sockdir} is too long for session {name}: "
                f"SCREENDIR/PID.NAME must fit in {SOCKET_PATH_MAX} bytes"
            )
        log_size = file_size(req.log_path)  # prepare_launch creates it (0600) when missing
        prepare_launch(req)
        fd, rc = tempfile.mkstemp(dir=req.spec_file.parent, prefix=f".{name}.", suffix=".screenrc")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(SCREENRC)
            # The job's environment travels in the spec, as with tmux; screen only gives the
            # window TERM, STY and WINDOW, of which the wrapper keeps TERM.
            res = self._run(
                "-dmS", name, "-L", "-Logfile", logfile, "-c", rc, *wrapper_argv(req.spec_file),
                # Like tmux -c; the wrapper sets the job's cwd itself (and reports a bad one).
                cwd=req.cwd if Path(req.cwd).is_dir() else None,
            )  # fmt: skip
            if res.returncode != 0:
                err = (res.stderr + res.stdout).strip().splitlines()
                raise LaunchError(
                    f"screen could not start {name}: "
                    f"{err[-1] if err else f'exit status {res.returncode}'}"
                )
            pid = self._wait_started(req, log_size)
        finally:
            # Read by the server before it creates the window, which _wait_started saw.
            Path(rc).unlink(missing_ok=True)
        return Launched(session=name, pid=pid)

    def _wait_started(self, req: LaunchRequest, log_size: int) -> int | None:
        """The wrapper's pid once it runs; None if the job already ended (so fast it was
        never seen running). LaunchError if screen did not create the session."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            live = self._live(req.session)
            for s in live:
                if (pid := self._wrapper_of(s.pid)) is not None:
                    return pid
            if req.exit_file.exists():
                return None
            # Screen writes the log as the window runs: it ran, and its session already ended.
            if not live and file_size(req.log_path) > log_size:
                return None
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        if live:
            self.kill(req.session, grace_s=1.0)
        raise LaunchError(
            f"screen did not start session {req.session} within {_START_TIMEOUT_S:g}s"
        )

    def sessions(self) -> dict[str, SessionState]:
        """The scheduler's sessions (`gpujob_*`) by name. A session is alive while its
        wrapper runs; dead_status is always None (see the module's docstring)."""
        found: dict[str, SessionState] = {}
        for s in self._list()[0]:
            if s.dead or not s.name.startswith(SESSION_PREFIX):
                continue
            pid = self._wrapper_of(s.pid)
            state = SessionState(name=s.name, alive=pid is not None, pid=pid, dead_status=None)
            # Two sessions of one name (made by hand): the one running the job wins.
            if s.name not in found or (state.alive and not found[s.name].alive):
                found[s.name] = state
        return found

    def kill(self, session: str, grace_s: float = 5.0) -> None:
        """Kill the job's whole process tree (blocks up to ~grace_s), then its session."""
        for s in self._live(session):
            pid = self._wrapper_of(s.pid)
            if pid is not None:
                # The wrapper leads the window's terminal session: kill_tree also finds
                # the job's processes that left the wrapper's tree but not that session.
                proctree.kill_tree(pid, grace_s=grace_s)
        self.remove(session)

    def remove(self, session: str) -> None:
        """Quit the session (no error if already gone); kill() first if it may still run."""
        sockets, sockdir = self._list()
        targets = [s for s in sockets if s.name == session]
        for s in targets:
            if not s.dead:
                # SIGHUPs what still runs in its windows; the reply does not matter, the
                # wait below does (the session may also have ended on its own meanwhile).
                self._run("-S", s.id, "-X", "quit")
        deadline = time.monotonic() + _QUIT_TIMEOUT_S
        for s in targets:
            socket = Path(sockdir, s.id)
            while socket.exists() and _running(s.pid):
                if time.monotonic() >= deadline:
                    raise RunnerError(f"screen session {s.id} did not quit")
                time.sleep(_POLL_S)
            # A server that died without cleaning up leaves its socket (a "Dead ???" entry).
            with contextlib.suppress(OSError):
                socket.unlink()

    def attach_argv(self, session: str) -> list[str]:
        """The command a user runs to watch the job."""
        target = session
        with contextlib.suppress(RunnerError):
            live = self._live(session)
            if len(live) == 1:
                # `screen -r NAME` would also take a session whose name NAME only begins.
                target = live[0].id
        argv = ["screen", "-r", target]
        if self.socket_dir is None:
            return argv
        return ["env", f"SCREENDIR={self.socket_dir}", *argv]

    def _log_path(self, server_pid: int) -> Path | None:
        argv = _cmdline(server_pid)
        for i, arg in enumerate(argv[:-1]):
            if arg == "-Logfile":
                return Path(unescape_logfile(argv[i + 1]))
        return None

    def pane_tail(self, session: str, lines: int = 50) -> list[str]:
        """The last `lines` lines the job wrote, rendered from its log; [] if gone."""
        try:
            live = self._live(session)
        except RunnerError:
            return []
        for s in live:
            path = self._log_path(s.pid)
            if path is None:
                continue
            try:
                with path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    start = max(0, size - _TAIL_BYTES)
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            return render_tail(data, lines, partial_first=start > 0)
        return []
