"""The small process in each job's session: run the job, then record how it ended.

Run as `<python> -I -S /abs/path/app/wrapper.py SPECFILE`, or as a spare started ahead of its
job, `... wrapper.py --spare TOKEN [FIFO]`, which reads SPECFILE as one line on its stdin or
FIFO (runners keep one ready, so a launch does not wait for an interpreter: runners/spare.py).
Deliberately standalone: it imports only the standard library (never `app`), because it runs
in whatever environment the pane has and must record the exit even when the scheduler is not
running. `-I` keeps the directory of this file off `sys.path`, so sibling modules cannot
shadow the stdlib.

It is on the critical path of every job start (and of the GPU idle gap), so it starts the job
before anything else: no module beyond what the interpreter has already loaded plus the C
parts of `json` and `signal`; the job is forked and exec'd directly (no `subprocess`).

The spec (JSON, written by the runner) holds {"job_id", "argv", "env", "cwd", "exit_file"}
(and "spare": TOKEN when a spare runs it). The exit record (JSON) is {"job_id", "exit_code",
"started_at", "ended_at", "pid"}; it is written atomically (temp file + fsync + rename), so a
reader never sees half of it.
"""

# ruff: noqa: PTH103, PTH105, PTH108, PTH118, PTH119, PTH120, PTH123, SIM105
# os.path and try/except, not pathlib and contextlib: importing pathlib alone takes longer
# than starting the interpreter.
from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # the C part: `signal` imports enum
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` is not imported at run time either
    from typing import Any, ClassVar

#: Variables describing the pane itself: the pane's values win over the spec's, which were
#: captured in the scheduler's (different) terminal.
PANE_VARS = ("TERM", "TMUX", "TMUX_PANE", "COLUMNS", "LINES")

EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
EXIT_BAD_SPEC = 2
SPARE_FLAG = "--spare"


def _say(message: str) -> None:
    # The pane may already be gone (kill-session closes the tty): never fail on output.
    try:
        os.write(2, (message + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def job_env(spec_env: dict[str, str], pane_env: dict[str, str]) -> dict[str, str]:
    env = dict(spec_env)
    for name in PANE_VARS:
        if name in pane_env:
            env[name] = pane_env[name]
    return env


def exit_code_of(returncode: int) -> int:
    """Shell convention: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def loads(text: str) -> Any:
    """json.loads through the C scanner alone: `import json` costs more (re, enum) than the
    interpreter's own start-up. Falls back to the json package if `_json` is missing."""
    try:
        import _json
    except ImportError:  # pragma: no cover - CPython always has it
        import json

        return json.loads(text)

    class Context:  # the attributes json.scanner.make_scanner reads from a JSONDecoder
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = float
        memo: ClassVar[dict[str, Any]] = {}

    text = text.strip()
    try:
        value, end = _json.make_scanner(Context())(text, 0)  # type: ignore[arg-type]
    except StopIteration as e:
        raise ValueError(f"not JSON (at character {e.value})") from None
    if end != len(text):
        raise ValueError(f"extra data after the JSON value (character {end})")
    return value


def dumps(record: dict[str, Any]) -> str:
    """A flat JSON object of numbers, strings and None (what an exit record holds)."""
    import _json

    parts = []
    for key, value in record.items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = _json.encode_basestring_ascii(str(value))
        parts.append(f"{_json.encode_basestring_ascii(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _write_and_rename(exit_file: str, record: dict[str, Any], directory: str) -> None:
    tmp = os.path.join(directory, f".{os.path.basename(exit_file)}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # left by a wrapper that had this pid before a crash
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, exit_file)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_exit_record(exit_file: str, record: dict[str, Any], tmp_dir: str | None = None) -> None:
    """Write the record to a temp file in `tmp_dir` (default: the record's own folder), fsync,
    rename. The scheduler watches the exits folder: a temp file there would wake it before
    the record exists, so `run` passes the spec's folder (the same file system)."""
    directory = os.path.dirname(exit_file) or "."
    os.makedirs(directory, exist_ok=True)
    try:
        _write_and_rename(exit_file, record, tmp_dir or directory)
    except OSError:
        if tmp_dir is None or tmp_dir == directory:
            raise
        _write_and_rename(exit_file, record, directory)  # e.g. another file system (EXDEV)
    # Make the rename itself durable: the record must survive a power cut after the job.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def spawn(argv: list[str], env: dict[str, str], cwd: str, devnull_stdin: bool) -> int:
    """fork + exec (PATH looked up in the job's env, as subprocess does); returns the pid.
    Raises the OSError of a failed chdir or exec, reported by the child through a pipe."""
    if not argv:
        raise FileNotFoundError("empty command")
    read_end, write_end = os.pipe()  # close-on-exec: EOF at a successful exec
    pid = os.fork()
    if pid == 0:  # the child: nothing but exec, or report why not
        try:
            os.close(read_end)
            # Python ignores SIGPIPE and SIGXFSZ, and exec keeps ignored signals ignored:
            # give the job the defaults back, as subprocess does (restore_signals).
            for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            if devnull_stdin:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(write_end, f"{e.errno or 0}:{e.strerror or e}".encode())
        finally:
            os._exit(EXIT_NOT_FOUND)
    os.close(write_end)
    try:
        report = b""
        while chunk := os.read(read_end, 4096):
            report += chunk
    finally:
        os.close(read_end)
    if report:
        os.waitpid(pid, 0)
        errno_text, _, message = report.decode(errors="replace").partition(":")
        number = int(errno_text) if errno_text.isdigit() else 0
        raise OSError(number, message)
    return pid


def run(spec: dict[str, Any], devnull_stdin: bool = False, tmp_dir: str | None = None) -> int:
    argv: list[str] = [str(a) for a in spec["argv"]]
    env = job_env({str(k): str(v) for k, v in spec["env"].items()}, dict(os.environ))
    child: int | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        # SIGTERM/SIGHUP (kill, closed pane) are meant for the job: pass them on and keep
        # waiting so the exit still gets recorded. Before the child exists, hold them.
        if child is None:
            pending.append(signum)
        else:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    def ignore(_signum: int, _frame: object) -> None:
        # Ctrl-C / Ctrl-\ go to the whole foreground process group, so the job already
        # got them. A Python handler rather than SIG_IGN: exec resets handled signals to
        # the default, while SIG_IGN would be inherited and make the job immune to Ctrl-C.
        pass

    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, ignore)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    started_at = time.time()
    try:
        # Same terminal (no stdio redirection): progress bars, colours and Ctrl-C just work.
        child = spawn(argv, env, str(spec["cwd"]), devnull_stdin)
    except OSError as e:
        # Not found (command or cwd) -> 127 like a shell; permission, exec format... -> 126.
        code = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        _say(f"gpusched: cannot run {argv[0] if argv else '<empty command>'}: {e}")
    else:
        for signum in pending:
            forward(signum, None)
        _, status = os.waitpid(child, 0)
        code = exit_code_of(os.waitstatus_to_exitcode(status))
    record = {
        "job_id": spec["job_id"],
        "exit_code": code,
        "started_at": started_at,
        "ended_at": time.time(),
        "pid": child,
    }
    try:
        write_exit_record(str(spec["exit_file"]), record, tmp_dir)
    except OSError as e:  # e.g. a full or read-only disk: the job's code is still our status
        _say(f"gpusched: cannot write the exit record ({e}); exit status {code} passed on")
    return code


def read_spec_path(fifo: str | None) -> str | None:
    """A spare's spec path: one line on stdin, or on `fifo` (whose name it removes once open,
    telling the runner it is listening); None at EOF (the spare is not needed)."""
    fd = 0
    if fifo is not None:
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, writer or not
        except OSError:
            return None
        os.set_blocking(fd, True)
        try:
            os.unlink(fifo)
        except OSError:
            pass
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        if fd:
            os.close(fd)
    line = data.decode("utf-8", "surrogateescape").strip() if data.endswith(b"\n") else ""
    return line or None


def main(args: list[str]) -> int:
    spare = len(args) in (2, 3) and args[0] == SPARE_FLAG
    if len(args) != 1 and not spare:
        _say("usage: wrapper.py SPECFILE | wrapper.py --spare TOKEN [FIFO]")
        return EXIT_BAD_SPEC
    path = read_spec_path(args[2] if len(args) == 3 else None) if spare else args[0]
    if path is None:
        # No job came (the runner closed the channel). Not 0: a spare already renamed to a
        # job's session would otherwise make that job look completed.
        return EXIT_BAD_SPEC
    try:
        with open(path, encoding="utf-8") as f:
            spec = loads(f.read())
    except (OSError, ValueError) as e:
        # No spec means no exit_file to write: the runner falls back to pane_dead_status.
        _say(f"gpusched: cannot read launch spec {path}: {e}")
        return EXIT_BAD_SPEC
    if spare and spec.get("spare") != args[1]:
        _say(f"gpusched: launch spec {path} is not for this spare")
        return EXIT_BAD_SPEC
    # A spare on a pipe (direct runner): that stdin is not the job's.
    return run(spec, devnull_stdin=len(args) == 2, tmp_dir=os.path.dirname(path) or None)


if __name__ == "__main__":
    # No interpreter shut-down: everything is written (os.write, fsync'd record), and the
    # next job is starting right now; the wrapper's clean-up would only compete with it.
    os._exit(main(sys.argv[1:]))
