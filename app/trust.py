"""Whether gpusched may act on a file that decides what runs as you: sshd's StrictModes.

The jobs file, the commands file, `llm_config.json`, the config file, the spool folder, the
state directory and the log directory decide which commands run under your account. Someone
who can change one of them, or replace it by renaming things in a directory above it, can run
commands as you. So, like sshd with `StrictModes yes` (OpenSSH's `safe_path()`), a path passes
only when it and every directory above it, up to your home directory (checked too) or `/`:

* belong to you or root, and
* are not writable by the group or by others,

with two exceptions, both about writes nobody else can make use of:

* a group-writable entry whose group has exactly one member, its owner (the user private
  groups of Debian and Ubuntu, where the umask is 002; Debian's sshd accepts these too);
* a directory above the path that others may write but that has the sticky bit (`/tmp`),
  when the entry below it on the path is yours or root's: there, nobody else can rename or
  delete it. (sshd has no such exception; without it no path under /tmp would pass.)

The path is checked as given and with its symbolic links resolved, so the directory holding
a symlink counts as well as the directories of its target. A missing file passes when the
directories that would hold it do: once it appears, it is checked again when it is read.
ACLs are not looked at (sshd does not either).

`--no-strict-modes` (`GPUSCHED_STRICT_MODES=0`, `strict_modes = false`) turns the checks off.
"""

# ruff: noqa: PTH100, PTH116, PTH117, PTH120
# The walk works on path strings: os.path's abspath/realpath/dirname, compared as strings.
from __future__ import annotations

import grp
import logging
import os
import pwd
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from app.requirements import LlmConfig, LlmConfigCache
from app.settings import Settings, SettingsError
from app.spool import QUEUED, RUNNING, TO_RUN

#: The spool folders whose scripts run: dropped in, waiting, and running from there.
SPOOL_RUNS = (TO_RUN, QUEUED, RUNNING)

log = logging.getLogger("gpusched")

#: How to turn the checks off, for the messages.
OVERRIDE = "--no-strict-modes (or GPUSCHED_STRICT_MODES=0)"


class UntrustedPathError(SettingsError):
    """A file or directory that decides what runs can be changed by someone else."""

    #: `gpusched start` refuses with this status (as when no GPU backend is found).
    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """What makes a path untrustworthy: the entry at fault and who else can change it."""

    path: str  # the file or directory at fault (the checked path or one above it)
    st_mode: int
    owner: int
    writers: str  # who else can change it: "is writable by every user", "belongs to bob"
    fix: str  # a command that fixes it

    def describe(self, checked: str, uid: int) -> str:
        kind = "directory" if stat.S_ISDIR(self.st_mode) else "file"
        subject = "it" if self.path == checked else f"{kind} {self.path}"
        mode = f"{stat.S_IMODE(self.st_mode):04o}, {stat.filemode(self.st_mode)}"
        return (
            f"{subject} (owner {_user(self.owner)}, mode {mode}) {self.writers}, "
            f"who could then run commands as {_user(uid)}. "
            f"Fix: {self.fix}; or skip this check with {OVERRIDE}"
        )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def group_members(gid: int) -> set[int]:
    """Every uid in the group: as its primary group (passwd) or as a listed member."""
    uids = {p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid}
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        return uids
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            uids.add(-1)  # a member we cannot resolve: not provably the owner
    return uids


def home_dirs(uid: int) -> frozenset[str]:
    """The home directory of `uid` as written in passwd and resolved: where the walk stops."""
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        return frozenset()
    if not home or not os.path.isabs(home):
        return frozenset()
    return frozenset({os.path.normpath(home), os.path.realpath(home)})


def _fault(
    path: str, st: os.stat_result, uid: int, child: str | None, *, ancestor: bool
) -> Problem | None:
    """Why `path` (stat `st`) is not safe, or None. `child`: the entry below it on the path."""
    quoted = shlex.quote(path)
    if st.st_uid not in (uid, 0):
        return Problem(
            path, st.st_mode, st.st_uid, f"belongs to {_user(st.st_uid)}",
            f"sudo chown {_user(uid)} {quoted}",
        )  # fmt: skip
    mode = st.st_mode
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    if ancestor and mode & stat.S_ISVTX and child is not None:
        # Sticky: only the owner of an entry (or of the directory, or root) may rename or
        # delete it. A child that does not exist yet passes: whoever creates it owns it,
        # and the file itself is checked when it is read.
        try:
            if os.lstat(child).st_uid in (uid, 0):
                return None
        except FileNotFoundError:
            return None
        except OSError:
            pass
    if mode & stat.S_IWOTH:
        writers = "is writable by every user"
        return Problem(path, mode, st.st_uid, writers, f"chmod go-w {quoted}")
    members = group_members(st.st_gid)
    if members == {st.st_uid}:
        return None  # a user private group: its only member is the owner
    names = sorted(_user(m) for m in members if m >= 0)
    shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    who = f"is writable by group {_group(st.st_gid)}" + (f" ({shown})" if shown else "")
    return Problem(path, mode, st.st_uid, who, f"chmod g-w {quoted}")


def _check_chain(start: str, uid: int, stops: frozenset[str]) -> Problem | str | None:
    """Check `start` and its directories upwards; a str is a reason without a Problem."""
    try:
        st = os.stat(start)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"cannot be checked: {e.strerror or e}"
    if st is not None:
        # What kind of file it is (a directory where a file should be) is the reader's
        # business: who can change it is the question here.
        found = _fault(start, st, uid, None, ancestor=False)
        if found is not None or start in stops:
            return found
    child, current = start, start
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return None  # above `/`
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            st = None  # a folder still to be created: what is above it decides
        except OSError as e:
            return f"cannot be checked: {parent}: {e.strerror or e}"
        if st is not None:
            found = _fault(parent, st, uid, child, ancestor=True)
            if found is not None:
                return found
            if parent in stops:
                return None  # sshd stops at the home directory, once it is checked
        child, current = parent, parent


def find_problem(
    path: Path | str, *, uid: int | None = None, stops: frozenset[str] | None = None
) -> Problem | str | None:
    """None when `path` (a file or a folder) is safe to act on; else the Problem, or why it
    cannot be checked. `uid`: whose files these should be (default: ours); `stops`: where
    the walk upwards ends (default: that user's home directory)."""
    uid = os.getuid() if uid is None else uid
    stops = home_dirs(uid) if stops is None else stops
    given = os.path.abspath(os.fspath(path))
    real = os.path.realpath(given)
    for start in dict.fromkeys((real, given)):  # resolved first; as given if it differs
        found = _check_chain(start, uid, stops)
        if found is not None:
            return found
    return None


def check(
    path: Path | str,
    what: str,
    *,
    uid: int | None = None,
    stops: frozenset[str] | None = None,
) -> str | None:
    """None when `path` is safe, else a message: `what path: why; the fix; the override`."""
    found = find_problem(path, uid=uid, stops=stops)
    if found is None:
        return None
    shown = os.path.abspath(os.fspath(path))
    if isinstance(found, Problem):
        victim = os.getuid() if uid is None else uid
        return f"{what} {shown}: {found.describe(os.path.realpath(shown), victim)}"
    return f"{what} {shown}: {found}; or skip this check with {OVERRIDE}"


def startup_problems(settings: Settings, state_dir: Path) -> list[str]:
    """What `gpusched start` refuses to act on, one message each ([] when strict modes are
    off). The config file is checked where it is read (app/config.py)."""
    if not settings.strict_modes:
        return []
    spool = settings.spool_dir
    items: list[tuple[str, list[Path]]] = [
        ("jobs file", [settings.jobs_file]),
        ("commands file", [settings.commands_file] if settings.commands_file else []),
        ("llm config file", [settings.llm_config]),
        # Scripts wait in these folders, then run from them: the first problem is enough.
        ("spool folder", [spool, *(spool / sub for sub in SPOOL_RUNS)] if spool else []),
        ("state directory", [state_dir]),
        ("log directory", [settings.log_dir] if settings.log_dir else []),
    ]
    stops = home_dirs(os.getuid())
    problems = []
    for what, paths in items:
        found = (check(path, what, stops=stops) for path in paths)
        message = next((m for m in found if m is not None), None)
        if message is not None:
            problems.append(f"refusing to read {message}")
    return problems


def require_trusted(settings: Settings, state_dir: Path) -> None:
    """Raise UntrustedPathError naming every problem (for `gpusched start`)."""
    problems = startup_problems(settings, state_dir)
    if problems:
        raise UntrustedPathError("\n".join(problems), "strict_modes")


def not_a_file(path: Path) -> str | None:
    """What `path` is when it exists but is not a regular file (after symlinks), else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # missing (or unreadable): the reader reports that itself
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


class Gate:
    """The checks the running scheduler repeats before it reads an input again.

    `check()` says whether to read the file now and what to report: a new problem (once,
    not on every pass), or that an earlier one is fixed. Off when strict modes are.
    """

    def __init__(self, enabled: bool = True, uid: int | None = None) -> None:
        self.enabled = enabled
        self.uid = os.getuid() if uid is None else uid
        self.stops = home_dirs(self.uid)
        self._problems: dict[str, str] = {}

    def check(self, path: Path, what: str) -> tuple[bool, str | None]:
        """(read it now?, message to report or None).

        Whatever strict modes say, an input that is not a regular file (a directory, a FIFO
        that would block the read, a device) is not read either."""
        kind = not_a_file(path)
        if kind is None and not self.enabled:
            return True, None
        key = str(path)
        message = (
            f"{what} {path}: it is {kind}, not a regular file"
            if kind is not None
            else check(path, what, uid=self.uid, stops=self.stops)
        )
        previous = self._problems.pop(key, None)
        if message is None:
            news = f"{what} {path} passes the ownership and mode checks again; reading it"
            return True, news if previous is not None else None
        self._problems[key] = f"not reading {message}"
        return False, self._problems[key] if self._problems[key] != previous else None

    def problem(self, path: Path) -> str | None:
        """The problem last reported for `path`, while it lasts."""
        return self._problems.get(str(path))


class GuardedLlmConfig(LlmConfigCache):
    """`llm_config.json`, read only while it passes the checks; meanwhile the last good
    configuration stays in use and `error` says why (the daemon logs it once)."""

    def __init__(self, path: Path, gate: Gate) -> None:
        super().__init__(path)
        self.gate = gate

    def get(self) -> LlmConfig:
        ok, news = self.gate.check(self.path, "llm config file")
        if not ok:
            with self._lock:
                self.error = self.gate.problem(self.path)
                return self._config
        if news is not None:
            log.info("%s", news)
            with self._lock:
                self._loaded = False  # read it again, whatever its signature says
        return super().get()
