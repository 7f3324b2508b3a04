"""Assemble a scheduler from settings and run it until Ctrl-C / SIGTERM (jobs keep running)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from app import dbguard, dbstart, trust
from app.control import SchedulerLock, make_runner, runner_for
from app.daemon import Daemon
from app.gpus import make_probe
from app.paths import StatePaths, private_file, state_paths
from app.settings import Settings
from app.store import Store

log = logging.getLogger("gpusched")


def setup_logging(paths: StatePaths, stream: bool = True) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    private_file(paths.scheduler_log)  # 0600: FileHandler keeps an existing file's mode
    file_handler = logging.FileHandler(paths.scheduler_log)
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)
    if stream:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        log.addHandler(console)


def build_daemon(settings: Settings, paths: StatePaths, store: Store, echo: bool = True) -> Daemon:
    probe = make_probe(
        settings.gpu_backend,
        settings.fake_gpus,
        timeout_s=settings.probe_timeout,
        limit=settings.gpus,
        only=settings.gpu_ids,
    )
    runner, runner_id = make_runner(settings, echo=echo)
    return Daemon(settings, store, paths, probe, runner, runner_id, runner_for=runner_for)


def serve(
    settings: Settings,
    stop: threading.Event | None = None,
    console: bool = True,
    fresh_state: bool = False,
) -> int:
    """`gpusched start`: refuses when another scheduler owns the state directory, and
    (trust.UntrustedPathError) when others can change an input or the state directory;
    dbguard.StorageError for a read-only state directory or a corrupt database (set aside:
    app/dbstart.py, where `fresh_state` is `--fresh-state`)."""
    paths = state_paths(settings.state_dir)
    dbstart.check_writable(paths)
    paths = paths.ensure()
    trust.require_trusted(settings, paths.root)
    lock = SchedulerLock(paths)
    lock.acquire()
    try:
        setup_logging(paths, stream=console)
        if not settings.strict_modes:
            log.warning("strict modes are off: inputs are read whoever can change them")
        store = dbstart.open_for_scheduler(settings, paths, fresh_state)
    except BaseException:
        lock.release()
        raise
    stop = stop or threading.Event()
    try:
        daemon = build_daemon(settings, paths, store, echo=console)
        store.set_meta(
            {
                "pid": str(os.getpid()),
                "started_at": str(time.time()),
                "jobs_file": str(daemon.jobs_file),
                "llm_config": str(daemon.llm.path),
                "backend": settings.gpu_backend,
                "runner": daemon.runner_id,
                # `gpusched kill` and the dashboard run in other processes: they use this one.
                "kill_grace": repr(settings.kill_grace),
            }
        )
        if threading.current_thread() is threading.main_thread():
            _install_signal_handlers(stop)
        log.info(
            "gpusched started (pid %d): jobs file %s, state %s, backend %s, runner %s, mode %s",
            os.getpid(),
            daemon.jobs_file,
            paths.root,
            settings.gpu_backend,
            daemon.runner_id,
            settings.mode,
        )
        if not daemon.jobs_file.exists():
            log.info("waiting for %s to appear", daemon.jobs_file)
        daemon.run(stop)
        if settings.runner == "direct":
            stopped = daemon.runner.close()  # type: ignore[attr-defined]
            # The stopped children recorded their exit (SIGTERM: 143) before close() returned;
            # record it now, or the database shows them running until the next start.
            daemon.reaper.reap(time.time(), check_sessions=False)
            if daemon.spool is not None:
                daemon.spool.sync()
            log.info("gpusched stopped; %d direct job(s) stopped with it", len(stopped))
        else:
            log.info("gpusched stopped; running jobs keep running and will be re-adopted")
    except dbguard.CorruptDatabaseError as exc:  # found while running: set aside as at start
        store.close()
        copy = dbguard.set_aside(paths.db)
        detail = str(exc.__cause__ or exc)
        log.error("corrupt state database %s moved to %s: %s", paths.db, copy, detail)  # noqa: TRY400
        raise dbguard.CorruptDatabaseError(
            dbguard.awaiting_decision(paths.db, copy, detail)
        ) from exc
    finally:
        store.close()
        lock.release()
    return 0


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
