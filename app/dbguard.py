"""Storage faults of the state database, as clear errors instead of tracebacks or silent loss.

* Corrupt (`file is not a database`, `database disk image is malformed`, a failed
  `PRAGMA quick_check`): `CorruptDatabaseError`. Only `gpusched start` moves the file aside
  (`set_aside`, never deleting it) and then refuses to start until the user decides; while a
  set-aside copy exists and no database does, every `Store` refuses to create a new one, so
  no command (and no restart loop) silently starts from an empty state, which would run every
  line of the jobs file again.
* Locked by another process for longer than the busy timeout (`GPUSCHED_BUSY_TIMEOUT`
  seconds, default 30), disk full, read-only file system, I/O error: `StorageError`. The
  CLI prints one line; the scheduler logs it once and retries at every pass (`PassFaults`).

No module of `app` is imported here except `paths`: `store` imports this one.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

log = logging.getLogger("gpusched")

#: Exit status of a command refused because the state database is corrupt (or set aside).
EXIT_CORRUPT = 3
#: Exit status of a command that could not use the state storage (locked, full, read-only).
EXIT_STORAGE = 4

BUSY_TIMEOUT_ENV = "GPUSCHED_BUSY_TIMEOUT"
DEFAULT_BUSY_TIMEOUT = 30.0
CORRUPT_TAG = ".corrupt-"
DOCS = "docs/reliability.md"

# Primary SQLite result codes (the low byte of an extended code).
_LOCKED = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_READONLY, _IOERR, _FULL, _CANTOPEN = 8, 10, 13, 14


class StorageError(Exception):
    """The state storage cannot be used now; `kind` names the fault, the message what to do."""

    exit_code = EXIT_STORAGE

    def __init__(self, message: str, kind: str = "storage") -> None:
        super().__init__(message)
        self.kind = kind


class CorruptDatabaseError(StorageError):
    exit_code = EXIT_CORRUPT

    def __init__(self, message: str) -> None:
        super().__init__(message, "corrupt")


def busy_timeout() -> float:
    """Seconds a write waits for another process's lock (`GPUSCHED_BUSY_TIMEOUT`)."""
    try:
        value = float(os.environ.get(BUSY_TIMEOUT_ENV, "") or DEFAULT_BUSY_TIMEOUT)
    except ValueError:
        return DEFAULT_BUSY_TIMEOUT
    return value if value >= 0 else DEFAULT_BUSY_TIMEOUT


def read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def classify(exc: BaseException, db: Path) -> StorageError | None:
    """The clear error for a storage fault behind `exc`; None when it is something else."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc)
        if primary in _CORRUPT or "malformed" in text or "not a database" in text:
            return corrupt_error(db, text)
        if primary in _LOCKED or "locked" in text:
            return StorageError(
                f"the state database {db} is locked by another process ({text}, waited "
                f"{busy_timeout():g}s; ${BUSY_TIMEOUT_ENV} sets the wait): find it with "
                f"`fuser -v {db}` and try again",
                "locked",
            )
        if primary == _READONLY or (primary in (_IOERR, _CANTOPEN) and read_only(db.parent)):
            return _read_only_error(db.parent, text)
        if primary == _FULL:
            return _full_error(db.parent, text)
        if primary in (_IOERR, _CANTOPEN):
            return StorageError(f"cannot use the state database {db}: {text}", "io")
        return None
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        where = Path(exc.filename) if exc.filename else db.parent
        if where == db.parent or db.parent in where.parents:  # in the state directory
            full, ro = _full_error, _read_only_error
            return (ro if exc.errno == errno.EROFS else full)(db.parent, f"{exc.strerror}: {where}")
        kind = "read-only" if exc.errno == errno.EROFS else "full"
        return StorageError(f"cannot write {where}: {exc.strerror}", kind)
    return None


def _read_only_error(state_dir: Path, detail: str) -> StorageError:
    return StorageError(
        f"state directory {state_dir} is read-only ({detail}): remount it read-write or "
        "use another --state-dir",
        "read-only",
    )


def _full_error(state_dir: Path, detail: str) -> StorageError:
    return StorageError(
        f"no space left for the state directory {state_dir} ({detail}): free some space "
        "(`df -h`, `du -sh` of its logs/)",
        "full",
    )


def corrupt_error(db: Path, detail: str) -> CorruptDatabaseError:
    """For commands other than `start`, which leave the file where it is."""
    return CorruptDatabaseError(
        f"the state database {db} is corrupt ({detail}); `gpusched start` moves it aside and "
        f"says how to recover it (see {DOCS})"
    )


@contextmanager
def storage_errors(db: Path) -> Iterator[None]:
    """Turn the SQLite errors of a storage fault into `StorageError`s."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        error = classify(exc, db)
        if error is None:
            raise
        raise error from exc


def connect(db: Path, timeout: float | None = None) -> sqlite3.Connection:
    """The Store's connection: WAL mode, foreign keys, `busy_timeout()` unless `timeout`."""
    wait = busy_timeout() if timeout is None else timeout
    with storage_errors(db):
        conn = sqlite3.connect(db, timeout=wait, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
    return conn


# ---- corrupt databases: check, set aside, refuse ------------------------------------------


def set_aside_copies(db: Path) -> list[Path]:
    """`gpusched.db.corrupt-<time>` files next to `db` (not their -wal / -shm), oldest first."""
    try:
        names = [p for p in db.parent.iterdir() if p.name.startswith(db.name + CORRUPT_TAG)]
    except OSError:
        return []
    return sorted(p for p in names if not p.name.endswith(("-wal", "-shm")))


def missing_or_empty(db: Path) -> bool:
    try:
        return db.stat().st_size == 0
    except FileNotFoundError:
        return True


def refuse_if_set_aside(db: Path, *, starting: bool = False) -> None:
    """No new database where a corrupt one was set aside, until the user decides."""
    if missing_or_empty(db) and (copies := set_aside_copies(db)):
        if starting:
            raise CorruptDatabaseError(awaiting_decision(db, copies[-1]))
        raise CorruptDatabaseError(
            f"the state database {db} was set aside as corrupt ({copies[-1]}) and not "
            "recovered yet; `gpusched start` says how to recover it"
        )


def quick_check(conn: sqlite3.Connection) -> str:
    """'ok', or what `PRAGMA quick_check` found (its first lines)."""
    rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)")]
    text = "; ".join(line for row in rows for line in row.splitlines() if line.strip())
    return "ok" if rows == ["ok"] else text[:300]


def set_aside(db: Path) -> Path:
    """Move `db` and its -wal / -shm files to `<db>.corrupt-<UTC time>` (never deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = db.with_name(f"{db.name}{CORRUPT_TAG}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = db.with_name(f"{db.name}{CORRUPT_TAG}{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):  # the database last: it marks the move as done
        src = db.with_name(db.name + suffix)
        if src.exists():
            src.replace(target.with_name(target.name + suffix))
    return target


def awaiting_decision(db: Path, copy: Path, detail: str = "") -> str:
    """What the user sees at a refused start, and what to do."""
    what = f"the state database {db} is corrupt ({detail}); it was moved to {copy}"
    if not detail:
        what = f"the corrupt state database was moved to {copy} and {db} does not exist"
    return (
        f"{what}. The scheduler will not start until you decide (see {DOCS}):\n"
        f"  recover what SQLite can read:  sqlite3 {copy} .recover | sqlite3 {db}\n"
        "    (a sqlite3 without .recover says 'SQL logic error': use .dump instead)\n"
        "  or start with an empty state:  gpusched start --fresh-state ...  (the lines already "
        "in the jobs and commands files are not run again; jobs it was running are no longer "
        "tracked)"
    )


# ---- the scheduler loop ---------------------------------------------------------------------


class _EventLog(Protocol):
    def log_event(self, level: str, message: str, job_id: int | None = None) -> None: ...


class PassFaults:
    """How the scheduler loop reports a failed pass. A storage fault is logged once (until a
    pass succeeds again) and the pass is retried at the next tick; a corrupt database stops
    the scheduler (raised); anything else is logged with its traceback, as before."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.fault: StorageError | None = None
        self.since = 0.0

    def failed(self, exc: Exception) -> None:
        error = classify(exc, self.db)
        if error is None:
            log.exception("scheduler pass failed; continuing")
            return
        if isinstance(error, CorruptDatabaseError):
            raise error from exc
        if self.fault is None or self.fault.kind != error.kind:
            log.error("%s; retrying at every pass until it clears (no line is lost)", error)
            if self.fault is None:
                self.since = time.time()
            self.fault = error
        # else: the same fault again, already logged

    def ok(self, store: _EventLog) -> None:
        """After a pass that went through: say once that the fault cleared."""
        if self.fault is None:
            return
        took = time.time() - self.since
        message = f"state storage usable again after {took:.0f}s (it was {self.fault.kind})"
        store.log_event("warning", message)  # may fail again: then failed() sees it
        log.info("%s", message)
        self.fault = None
