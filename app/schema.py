"""The state database's schema: migrations as small registered functions, applied in order.

Each migration runs once, inside the transaction that records it in `migrations`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(name: str) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        MIGRATIONS.append((name, fn))
        return fn

    return register


@migration("001_initial")
def _initial(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            script TEXT NOT NULL,
            conda_env TEXT NOT NULL,
            args TEXT NOT NULL,
            allowed_gpus TEXT,
            source TEXT NOT NULL DEFAULT '',
            requirement REAL,
            gpus TEXT,
            share REAL,
            vram_mb INTEGER,
            session TEXT,
            runner TEXT,
            log_path TEXT,
            command TEXT,
            pid INTEGER,
            launched INTEGER NOT NULL DEFAULT 0,
            exit_code INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            submitted_at REAL NOT NULL,
            queued_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL
        );
        CREATE INDEX jobs_status ON jobs(status, priority, seq);
        CREATE TABLE job_events (
            id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, at REAL NOT NULL,
            status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX job_events_job ON job_events(job_id);
        CREATE TABLE paused_gpus (gpu INTEGER PRIMARY KEY, at REAL NOT NULL);
        CREATE TABLE file_cursors (path TEXT PRIMARY KEY, cursor TEXT NOT NULL);
        CREATE TABLE seen_lines (
            path TEXT NOT NULL, hash TEXT NOT NULL, count INTEGER NOT NULL,
            PRIMARY KEY (path, hash)
        ) WITHOUT ROWID;
        CREATE TABLE line_errors (
            id INTEGER PRIMARY KEY, file TEXT NOT NULL, line INTEGER NOT NULL,
            reason TEXT NOT NULL, at REAL NOT NULL
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY, at REAL NOT NULL, level TEXT NOT NULL,
            message TEXT NOT NULL, job_id INTEGER
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    )


@migration("002_job_revisions")
def _job_revisions(db: sqlite3.Connection) -> None:
    """Every insert or update of a job stamps it with a new revision, so a reader (the
    dashboard) fetches only the rows that changed since its last look."""
    db.execute("ALTER TABLE jobs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX jobs_rev ON jobs(rev)")
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO counters VALUES ('jobs_rev', (SELECT COALESCE(MAX(id), 0) FROM jobs))")
    db.execute("UPDATE jobs SET rev = id")
    stamp = (
        "UPDATE counters SET value = value + 1 WHERE name = 'jobs_rev'; "
        "UPDATE jobs SET rev = (SELECT value FROM counters WHERE name = 'jobs_rev') "
        "WHERE id = NEW.id;"
    )
    # Recursive triggers are off (SQLite's default), so the stamping UPDATE fires nothing.
    db.execute(f"CREATE TRIGGER jobs_rev_insert AFTER INSERT ON jobs BEGIN {stamp} END")
    db.execute(
        f"CREATE TRIGGER jobs_rev_update AFTER UPDATE ON jobs WHEN NEW.rev = OLD.rev "
        f"BEGIN {stamp} END"
    )


@migration("003_inputs")
def _inputs(db: sqlite3.Connection) -> None:
    """Jobs from a commands file (shell code) and requirements declared in script headers."""
    db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'script'")
    db.execute("ALTER TABLE jobs ADD COLUMN declared TEXT NOT NULL DEFAULT ''")


@migration("004_run_limits")
def _run_limits(db: sqlite3.Connection) -> None:
    """Automatic retries of failed runs, and the GPU memory a job asks for after it died of
    CUDA out-of-memory (app/limits.py); `retry` and a re-added line reset both."""
    db.execute("ALTER TABLE jobs ADD COLUMN retries_done INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN oom_vram_mb INTEGER")


@migration("005_insert_revisions")
def _insert_revisions(db: sqlite3.Connection) -> None:
    """Inserts bring their own revision: ingest stamps a batch of 100,000 new jobs with one
    counter update. A per-row insert trigger (even one whose WHEN is false) doubled the
    insert's cost; updates are still stamped by `jobs_rev_update`."""
    db.execute("DROP TRIGGER jobs_rev_insert")


def stamp_revisions(db: sqlite3.Connection) -> None:
    """Give rows inserted without a revision (rev 0) one, as `Store` does for its inserts.

    For code that fills the jobs table directly (test fixtures, benchmarks): since schema 005
    an insert is not stamped by a trigger, and readers (the dashboard, the pending queue) only
    see rows whose revision is above the last they read."""
    db.execute("UPDATE jobs SET rev = id + (SELECT value FROM counters WHERE name = 'jobs_rev') "
               "WHERE rev = 0")  # fmt: skip
    db.execute(
        "UPDATE counters SET value = (SELECT MAX(value, COALESCE(MAX(rev), 0)) FROM jobs) "
        "WHERE name = 'jobs_rev'"
    )


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits on its own, and a migration must be one transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def migrate(db: sqlite3.Connection) -> None:
    """Apply the migrations not yet recorded; the caller holds a write transaction."""
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, at REAL)")
    done = {r[0] for r in db.execute("SELECT name FROM migrations")}
    for name, fn in MIGRATIONS:
        if name not in done:
            fn(db)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))


def pending_migrations(db: sqlite3.Connection) -> bool:
    """Whether `migrate` has anything to do (read-only: opening a current database for
    reading needs no write lock, so `status` works while another process holds one)."""
    has_table = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
    ).fetchone()
    if not has_table:
        return True
    done = {r[0] for r in db.execute("SELECT name FROM migrations")}
    return any(name not in done for name, _ in MIGRATIONS)
