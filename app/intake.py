"""New lines of the input files -> pending jobs: the jobs file and the commands file.

Both files go through the same tailer (offsets, rewrites, the lines already seen) and the same
transaction that queues the jobs and moves the file's cursor, so no line runs twice; only the
parser differs. A jobs-file line names a script, whose header may declare requirements.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from app import jobsfile, tailer
from app.headers import read_header
from app.models import JobSpec, LineError
from app.store import Store
from app.trust import Gate

log = logging.getLogger("gpusched")

#: One line -> a job, an error for the user, or None (blank line, comment).
Parser = Callable[[str, int], JobSpec | LineError | None]


def command_parser(path: Path) -> Parser:
    """A commands file: one shell command per line, `#` comments, default priority and GPUs."""

    def parse(text: str, number: int) -> JobSpec | LineError | None:
        command = text.rstrip("\r\n").removeprefix("\ufeff").strip()
        if not command or command.startswith("#"):
            return None
        if "\0" in command:
            return LineError(path.name, number, "a NUL byte cannot be part of a command")
        return JobSpec(0, command, "", "", None, f"{path.name}:{number}", kind="command")

    return parse


def jobs_parser(path: Path, gpu_count: Callable[[], int | None]) -> Parser:
    """The jobs file: `priority,script_path,conda_env,arguments,allowed_gpus`."""
    # Per read: a file of 100,000 lines names few scripts, so each is looked at once.
    headers: dict[str, str] = {}
    check_script = functools.lru_cache(maxsize=4096)(jobsfile.script_problem)
    base_dir = path.parent

    def parse(text: str, number: int) -> JobSpec | LineError | None:
        parsed = jobsfile.parse_line(
            text,
            file=path.name,
            line=number,
            base_dir=base_dir,
            gpu_count=gpu_count(),
            check_script=check_script,
        )
        if not isinstance(parsed, JobSpec):
            return parsed
        if parsed.script not in headers:
            headers[parsed.script] = read_header(Path(parsed.script))
        declared = headers[parsed.script]
        if not declared:
            return parsed
        return JobSpec(
            parsed.priority,
            parsed.script,
            parsed.conda_env,
            parsed.args,
            parsed.allowed_gpus,
            parsed.source,
            declared=declared,
        )

    return parse


def read_file(
    store: Store,
    path: Path,
    parse: Parser,
    now: float,
    gate: Gate | None = None,
    what: str = "file",
) -> list[int]:
    """Queue the complete new lines of `path`; returns the ids of jobs queued (or re-queued).

    With a `gate`, a file that others can change (app/trust.py) is not read: the problem is
    reported once, as an error at the first line not read yet, and reading resumes there
    once it is fixed."""
    key = str(path)
    cursor_json = store.cursor_json(key)
    cursor = tailer.FileCursor.from_json(cursor_json) if cursor_json else tailer.FileCursor()
    if gate is not None:
        trusted, news = gate.check(path, what)
        if news is not None and trusted:
            log.info("%s", news)
        elif news is not None:
            log.error("%s", news)
            error = LineError(path.name, cursor.line_count + 1, news)
            store.ingest(key, cursor.to_json(), None, [], [], [error], now)
        if not trusted:
            return []
    previous: list[Counter[str]] = []

    def load_seen() -> Counter[str]:
        previous.append(store.seen_lines(key))
        return previous[-1]

    result = tailer.read_new(path, cursor, load_seen)
    if not result.lines and result.cursor == cursor and not result.rewritten:
        return []
    specs: list[JobSpec] = []
    errors: list[LineError] = []
    for number, text in result.lines:
        parsed = parse(text, number)
        if isinstance(parsed, JobSpec):
            specs.append(parsed)
        elif isinstance(parsed, LineError):
            errors.append(parsed)
            log.error("%s", parsed)
    report = store.ingest(
        key,
        result.cursor.to_json(),
        _seen_after_rewrite(result, previous),
        result.appended_hashes,
        specs,
        errors,
        now,
    )
    for source, job_id, state in report.duplicates:
        log.info("%s: duplicate of job %d (%s), skipped", source, job_id, state)
    _log_ids("queued", report.queued)
    _log_ids("queued again", report.requeued)
    return report.queued + report.requeued


def _log_ids(what: str, ids: list[int], each: int = 20) -> None:
    """One log line per job for a few; one for the batch when a big file was read."""
    if len(ids) <= each:
        for job_id in ids:
            log.info("job %d %s", job_id, what)
    else:
        log.info("%d jobs %s (ids %d-%d)", len(ids), what, min(ids), max(ids))


def read_jobs(
    store: Store, path: Path, gpu_count: Callable[[], int | None], now: float, gate: Gate | None
) -> list[int]:
    """`read_file` for the jobs file."""
    return read_file(store, path, jobs_parser(path, gpu_count), now, gate, "jobs file")


def read_commands(store: Store, path: Path, now: float, gate: Gate | None) -> list[int]:
    """`read_file` for the commands file."""
    return read_file(store, path, command_parser(path), now, gate, "commands file")


def _seen_after_rewrite(
    result: tailer.TailResult, previous: list[Counter[str]]
) -> Counter[str] | None:
    """After a rewrite, remember the union of the old and new versions' lines.

    A read can land mid-save (an editor truncates, then writes): forgetting the old
    version there would bring its lines back as new on the next read.
    """
    if not result.rewritten or result.seen_after is None:
        return None
    return (previous[0] | result.seen_after) if previous else result.seen_after
