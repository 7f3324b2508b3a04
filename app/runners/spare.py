"""Wrappers started ahead of their jobs ("spares"), so a launch does not wait for Python.

Starting the in-session wrapper (`python -I -S app/wrapper.py`) takes an interpreter start-up
(~15 ms on a 2-core machine), on the critical path of every job start and of every GPU idle
gap. So the tmux and direct runners keep one spare ready after each launch: a wrapper already
running, blocked on reading one line, the path of its launch spec, from a channel the runner
holds open. Handing a job over is a write to that channel:
- direct runner: the spare's stdin, a pipe (the job itself gets /dev/null as stdin);
- tmux runner: a FIFO in the run folder, opened read-write by the runner before the spare
  starts (the pane's terminal stays the job's stdin). The spare runs in a session of its own,
  `gpusched_spare_<token>` (outside the `gpujob_` names the scheduler lists), which the launch
  renames to the job's name before it sets the pane's options and log pipe, all in one tmux
  command, and only then hands the spec over.
The spec carries the spare's token (`"spare"`), so a spare never runs a spec meant for another,
and `kill_orphan` can tell a direct job's wrapper from a reused pid. A scheduler that stops or
dies closes its end of the channel: its spare reads EOF and exits (its session with it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from app.runners.common import WRAPPER
from app.wrapper import PANE_VARS, SPARE_FLAG

#: Spare tmux sessions: not `gpujob_`, so never taken for a job's session.
SPARE_PREFIX = "gpusched_spare_"


def new_token() -> str:
    return uuid.uuid4().hex[:16]


def spare_argv(token: str, fifo: Path | None = None) -> list[str]:
    """A spare wrapper's command line: it reads its spec path from stdin, or from `fifo`."""
    argv = [sys.executable, "-I", "-S", str(WRAPPER), SPARE_FLAG, token]
    return [*argv, str(fifo)] if fifo is not None else argv


def is_spare_of(argv: list[bytes], spec_token: object) -> bool:
    """Whether a process's argv is the spare wrapper that got the spec with `spec_token`."""
    if not isinstance(spec_token, str) or not spec_token:
        return False
    tail = [os.fsencode(WRAPPER), SPARE_FLAG.encode(), spec_token.encode()]
    return argv[-3:] == tail or argv[-4:-1] == tail


def spare_env() -> dict[str, str]:
    """The scheduler's environment without the terminal variables, which the wrapper would
    otherwise lay over the spec's (its own values win only inside a tmux pane)."""
    return {k: v for k, v in os.environ.items() if k not in PANE_VARS}


class PipeSpare:
    """A spare child of the scheduler (direct runner) reading its spec path from stdin."""

    def __init__(self) -> None:
        self.token = new_token()
        self.proc = subprocess.Popen(
            spare_argv(self.token),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=spare_env(),
            start_new_session=True,
            bufsize=0,
        )

    def hand_over(self, spec_file: Path) -> bool:
        """Give the spare its job; False if it is gone (then use a fresh wrapper)."""
        stdin = self.proc.stdin
        if stdin is None or self.proc.poll() is not None:
            return False
        try:
            stdin.write(os.fsencode(spec_file) + b"\n")
            stdin.close()
        except OSError:
            return False
        return True

    def retire(self) -> None:
        """No job for this spare: EOF on its stdin makes it exit; reap it."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FifoSpare:
    """The channel of a spare in a tmux pane: a FIFO the runner holds open read-write, so the
    spare's open never blocks and its read sees EOF once the runner is gone. The spare
    removes the FIFO's name once it has it open: from then on, what the runner writes reaches
    it even if the runner exits right after."""

    def __init__(self, directory: Path) -> None:
        self.token = new_token()
        self.session = SPARE_PREFIX + self.token
        self.fifo = directory / f"spare_{self.token}.fifo"
        self.pid: int | None = None
        directory.mkdir(parents=True, exist_ok=True)
        os.mkfifo(self.fifo, 0o600)
        try:
            self.fd: int | None = os.open(self.fifo, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            self.fifo.unlink(missing_ok=True)
            raise

    def argv(self) -> list[str]:
        return spare_argv(self.token, self.fifo)

    def opened(self) -> bool:
        """Whether the spare has the FIFO open (from then on nothing written is lost)."""
        return not self.fifo.exists()

    def hand_over(self, spec_file: Path) -> bool:
        """Write the spec path and close our end; call once `opened()` said yes."""
        fd, self.fd = self.fd, None
        if fd is None:
            return False
        try:
            os.write(fd, os.fsencode(spec_file) + b"\n")
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        """Close our end without a job: the spare reads EOF and exits."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.fifo.unlink(missing_ok=True)


class Chores:
    """What a tmux scheduler pass leaves for `TmuxRunner.do_chores`: sessions to remove, sessions
    to keep once dead (remain-on-exit), where to start a spare."""

    def __init__(self) -> None:
        self.removals: list[str] = []
        self.keep: list[str] = []  # sessions launched on a spare: remain-on-exit still off
        self.spare_dir: Path | None = None
        self.since: float | None = None

    def add(
        self, removal: str | None = None, spare_dir: Path | None = None, keep: Sequence[str] = ()
    ) -> None:
        if removal is not None:
            self.removals.append(removal)
            if removal in self.keep:
                self.keep.remove(removal)
        if spare_dir is not None:
            self.spare_dir = spare_dir
        self.keep += list(keep)
        if self.since is None:
            self.since = time.monotonic()

    def take(self) -> tuple[list[str], list[str], Path | None]:
        removals, keep, spare_dir = self.removals, self.keep, self.spare_dir
        self.removals, self.keep, self.spare_dir, self.since = [], [], None, None
        return removals, keep, spare_dir
