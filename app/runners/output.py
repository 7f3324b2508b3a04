"""A direct job's output: copied to its log and, line by line, to a console sink."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger("gpusched")

#: Where the output lines of the jobs go, prefixed with the job id; called one line at a time.
Echo = Callable[[str], None]

#: A line without a newline is echoed once it reaches this size (bounded memory).
_MAX_LINE = 64 * 1024
_READ_SIZE = 64 * 1024


def _console_text(line: bytes) -> str:
    line = line.removesuffix(b"\r")
    # A terminal would show only what was drawn after the last carriage return.
    return line.rsplit(b"\r", 1)[-1].decode("utf-8", errors="replace")


class LineSplitter:
    """Bytes in, complete console lines out; never fails on invalid UTF-8."""

    def __init__(self, max_line: int = _MAX_LINE) -> None:
        self._pending = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[str]:
        *lines, rest = (self._pending + data).split(b"\n")
        # Keep only the last redraw of a pending progress bar (a final `\r` may be the
        # first half of a `\r\n` split between two reads, so it stays).
        cut = rest.rfind(b"\r", 0, len(rest) - 1)
        self._pending = rest[cut + 1 :] if cut >= 0 else rest
        if len(self._pending) >= self._max_line:
            lines.append(self._pending)
            self._pending = b""
        return [_console_text(line) for line in lines]

    def close(self) -> list[str]:
        """The partial last line (output that did not end with a newline), if any."""
        rest, self._pending = self._pending, b""
        return [_console_text(rest)] if rest.strip(b"\r") else []


class Pump:
    """Copies one child's output to its log and, line by line, to the console sink."""

    def __init__(
        self,
        job_id: int,
        stream: IO[bytes],
        log_file: IO[bytes],
        echo: Echo | None,
        echo_lock: threading.Lock,
    ) -> None:
        self.prefix = f"[job {job_id}] "
        self.stream = stream
        self.log_file: IO[bytes] | None = log_file
        self.echo = echo
        self.echo_lock = echo_lock

    def run(self) -> None:
        splitter = LineSplitter()
        try:
            while chunk := self.stream.read(_READ_SIZE):
                self._write_log(chunk)
                self._echo(splitter.feed(chunk))
            self._echo(splitter.close())
        except (OSError, ValueError) as e:  # the pipe closed under us (close() at exit)
            log.debug("%sstopped reading output: %s", self.prefix, e)
        finally:
            with contextlib.suppress(OSError):
                self.stream.close()
            if self.log_file is not None:
                with contextlib.suppress(OSError):
                    self.log_file.close()

    def _write_log(self, chunk: bytes) -> None:
        if self.log_file is None:
            return
        try:
            self.log_file.write(chunk)
            self.log_file.flush()
        except OSError:
            # Keep draining the pipe (a full pipe would block the job); the log is gone.
            log.exception("%scannot write log; output is no longer logged", self.prefix)
            with contextlib.suppress(OSError):
                self.log_file.close()
            self.log_file = None

    def _echo(self, lines: list[str]) -> None:
        if self.echo is None or not lines:
            return
        with self.echo_lock:  # whole lines, one sink call at a time, even across jobs
            for line in lines:
                try:
                    self.echo(self.prefix + line)
                except Exception:
                    log.exception("%sconsole echo failed; echo disabled for this job", self.prefix)
                    self.echo = None
                    return


def read_last_lines(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a file (trailing blank lines dropped); [] if unreadable."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            size = min(end, 4096)
            while True:
                f.seek(end - size)
                data = f.read(size)
                if size >= end or data.count(b"\n") > lines + 1:
                    break
                size = min(end, size * 4)
    except OSError:
        return []
    out = [_console_text(line) for line in data.split(b"\n")]
    if size < end:
        out = out[1:]  # the first line is probably cut
    while out and not out[-1].strip():
        out.pop()
    return out[-lines:]
