"""`gpusched start`'s way into the state database: refuse a read-only state directory, check
the database (`PRAGMA quick_check`), set a corrupt one aside, and `--fresh-state`.

A new database would run every line of the jobs file again, so after a corrupt database was
set aside the scheduler starts only once the user decided: a recovered database in its
place, or `--fresh-state`, which starts empty and records the lines already in the jobs and
commands files as seen, so that only lines added later run.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

from app import dbguard, tailer
from app.dbguard import CorruptDatabaseError, StorageError
from app.paths import StatePaths, private_file
from app.settings import Settings
from app.store import Store

log = logging.getLogger("gpusched")


def check_writable(paths: StatePaths) -> None:
    """Before anything is written there: a clear error for a read-only state directory."""
    if dbguard.read_only(paths.root):
        raise StorageError(
            f"state directory {paths.root} is read-only (its file system is mounted "
            "read-only): remount it read-write or use another --state-dir",
            "read-only",
        )


def open_for_scheduler(settings: Settings, paths: StatePaths, fresh_state: bool) -> Store:
    """The scheduler's Store, checked; raises CorruptDatabaseError after setting aside a
    corrupt database (or while one set aside awaits the user's decision)."""
    db = paths.db
    new = dbguard.missing_or_empty(db)
    if new and not fresh_state:
        dbguard.refuse_if_set_aside(db, starting=True)
    try:
        store = Store(db) if not (new and fresh_state) else _create(db)
        problem = _quick_check(store)
    except CorruptDatabaseError as exc:
        problem, store = str(exc.__cause__ or exc), None
    if problem:
        if store is not None:
            store.close()
        copy = dbguard.set_aside(db)
        log.error("corrupt state database %s moved to %s: %s", db, copy, problem)
        if not fresh_state:
            raise CorruptDatabaseError(dbguard.awaiting_decision(db, copy, problem))
        store, new = _create(db), True
    assert store is not None
    if new and fresh_state:
        _mark_inputs_seen(settings, store)
    elif fresh_state:
        log.info("--fresh-state ignored: the state database %s is healthy", db)
    return store


def _create(db: Path) -> Store:
    """A new database although a corrupt one was set aside: the user chose --fresh-state.
    Its first table makes it non-empty, which is what lets Store open it."""
    db.unlink(missing_ok=True)  # an empty file left by a refused open
    private_file(db)
    with dbguard.storage_errors(db), closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, at REAL)")
        conn.commit()
    return Store(db)


def _quick_check(store: Store) -> str:
    started = time.monotonic()
    with dbguard.storage_errors(store.path):
        result = dbguard.quick_check(store.db)
    log.debug("quick_check of %s: %s in %.3fs", store.path, result, time.monotonic() - started)
    return "" if result == "ok" else f"quick_check: {result}"


def _mark_inputs_seen(settings: Settings, store: Store) -> None:
    """Record every complete line already in the jobs and commands files as read."""
    now = time.time()
    inputs = [settings.jobs_file, settings.commands_file]
    for path in (p.resolve() for p in inputs if p is not None):
        try:
            result = tailer.read_new(path, tailer.FileCursor(), Counter)
        except OSError as exc:
            log.warning("--fresh-state: cannot read %s (%s); its lines are not marked", path, exc)
            continue
        seen = result.seen_after if result.rewritten else None
        store.ingest(str(path), result.cursor.to_json(), seen, result.appended_hashes, [], [], now)
        message = (
            f"fresh state: the {len(result.lines)} line(s) already in {path} are recorded as "
            "seen and not run; only lines added from now on run"
        )
        store.log_event("warning", message)
        log.warning("%s", message)
