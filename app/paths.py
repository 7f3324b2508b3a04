"""Every path gpusched uses, in one place, and the modes of what it creates there.

The state directory is `--state-dir`, else `$GPUSCHED_STATE_DIR`, else
`$XDG_STATE_HOME/gpusched` (default `~/.local/state/gpusched`).

Everything gpusched creates is private, whatever the umask: directories 0700, files 0600 (the
database holds commands and arguments, launch specs the jobs' environments, logs their output).
Modes are given where each file is created, not through a process-wide umask, so the jobs
keep the user's umask for the files *they* write.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: Modes of the directories and files gpusched creates.
DIR_MODE = 0o700
FILE_MODE = 0o600


def tighten(path: Path) -> None:
    """Remove group and other permissions from `path` if it is ours (else leave it alone)."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            path.chmod(stat.S_IMODE(st.st_mode) & ~0o077)


def private_dir(path: Path, *, existing_too: bool = True) -> None:
    """Create `path` (and missing parents, with the usual modes) as 0700. An existing one of
    ours loses its group and other permissions, unless `existing_too` is False (a folder the
    user chose, such as `--log-dir`, keeps its mode)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if existing_too:
        tighten(path)


def file_size(path: Path) -> int:
    """The size of `path`; 0 when it is missing or unreadable."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def private_file(path: Path) -> None:
    """Make sure `path` exists with mode 0600 before something else (tmux's `cat >>`, screen,
    SQLite, logging) opens it for writing: they keep the mode of an existing file. An existing
    file of ours loses its group and other permissions; a symbolic link there is left alone.

    An existing file is never opened here, only chmod'ed: closing any descriptor of a file
    drops the POSIX locks this process holds on it, and SQLite's locks are those (a second
    Store in the process, e.g. the dashboard next to the scheduler, must not drop the first
    one's). Best effort: a file that cannot be created is left to whatever creates it next.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        if not path.is_symlink():
            tighten(path)
    except OSError:
        pass


def resolve_state_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    if flag:
        return Path(flag).expanduser().resolve()
    env = os.environ.get("GPUSCHED_STATE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "gpusched").resolve()


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "gpusched.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def exits(self) -> Path:
        """Exit records written by the in-pane wrapper: `job_<id>.json`."""
        return self.root / "exits"

    @property
    def run(self) -> Path:
        """Launch specs read by the in-pane wrapper: `job_<id>.json`."""
        return self.root / "run"

    @property
    def lock(self) -> Path:
        return self.root / "scheduler.lock"

    @property
    def wakeup(self) -> Path:
        """Touched by the CLI so a running scheduler acts on a command at once."""
        return self.root / "wakeup"

    @property
    def scheduler_log(self) -> Path:
        return self.root / "gpusched.log"

    def exit_file(self, job_id: int) -> Path:
        return self.exits / f"job_{job_id}.json"

    def run_spec(self, job_id: int) -> Path:
        return self.run / f"job_{job_id}.json"

    def ensure(self) -> StatePaths:
        """Create the directories, 0700; existing ones of ours are set back to 0700."""
        for d in (self.root, self.logs, self.exits, self.run):
            private_dir(d)
        return self


def state_paths(flag: str | os.PathLike[str] | None = None) -> StatePaths:
    return StatePaths(resolve_state_dir(flag))
