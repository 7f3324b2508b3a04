"""The small process in each job's tmux pane: run the job, then record how it ended.

Run as `<python> -I /abs/path/app/wrapper.py SPECFILE`. Deliberately standalone: it imports
only the standard library (never `app`), because it runs in whatever environment the pane
has and must record the exit even when the scheduler is not running. `-I` keeps the
directory of this file off `sys.path`, so sibling modules cannot shadow the stdlib.

The spec (JSON, written by the runner) holds {"job_id", "argv", "env", "cwd", "exit_file"}.
The exit record (JSON) is {"job_id", "exit_code", "started_at", "ended_at", "pid"}; it
is written atomically (temp file + fsync + rename), so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

#: Variables describing the pane itself: the pane's values win over the spec's, which were
#: captured in the scheduler's (different) terminal.
PANE_VARS = ("TERM", "TMUX", "TMUX_PANE", "COLUMNS", "LINES")

EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
EXIT_BAD_SPEC = 2


def _say(message: str) -> None:
    # The pane may already be gone (kill-session closes the tty): never fail on output.
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


def job_env(spec_env: dict[str, str], pane_env: dict[str, str]) -> dict[str, str]:
    env = dict(spec_env)
    for name in PANE_VARS:
        if name in pane_env:
            env[name] = pane_env[name]
    return env


def exit_code_of(returncode: int) -> int:
    """Shell convention: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def write_exit_record(exit_file: Path, record: dict[str, Any]) -> None:
    exit_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=exit_file.parent, prefix=f".{exit_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(exit_file)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
    # Make the rename itself durable: the record must survive a power cut after the job.
    with contextlib.suppress(OSError):
        dir_fd = os.open(exit_file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def run(spec: dict[str, Any]) -> int:
    argv: list[str] = [str(a) for a in spec["argv"]]
    env = job_env({str(k): str(v) for k, v in spec["env"].items()}, dict(os.environ))
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # SIGTERM/SIGHUP (kill, closed pane) are meant for the job: pass them on and keep
        # waiting so the exit still gets recorded. Before the child exists, hold them.
        if child is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        # Ctrl-C / Ctrl-\ go to the whole foreground process group, so the job already
        # got them. A Python handler rather than SIG_IGN: exec resets handled signals to
        # the default, while SIG_IGN would be inherited and make the job immune to Ctrl-C.
        pass

    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, ignore)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    started_at = time.time()
    pid: int | None = None
    try:
        if not argv:
            raise FileNotFoundError("empty command")
        # Same terminal (no stdio redirection): progress bars, colours and Ctrl-C just work.
        child = subprocess.Popen(argv, env=env, cwd=spec["cwd"])
    except OSError as e:
        # Not found (command or cwd) -> 127 like a shell; permission, exec format... -> 126.
        code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        _say(f"gpusched: cannot run {argv[0] if argv else '<empty command>'}: {e}")
    else:
        pid = child.pid
        for signum in pending:
            forward(signum, None)
        code = exit_code_of(child.wait())
    write_exit_record(
        Path(spec["exit_file"]),
        {
            "job_id": spec["job_id"],
            "exit_code": code,
            "started_at": started_at,
            "ended_at": time.time(),
            "pid": pid,
        },
    )
    return code


def main(args: list[str]) -> int:
    if len(args) != 1:
        _say("usage: wrapper.py SPECFILE")
        return EXIT_BAD_SPEC
    try:
        spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        # No spec means no exit_file to write: the runner falls back to pane_dead_status.
        _say(f"gpusched: cannot read launch spec {args[0]}: {e}")
        return EXIT_BAD_SPEC
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
