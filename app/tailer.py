"""New complete lines of a file that users append to and sometimes rewrite.

`read_new` is pure with respect to persistence: the caller stores the returned cursor and the
"seen" multiset of line hashes (in the same transaction as the jobs it creates), so a crash can
never record lines as read without their jobs, or the other way round.

How a change is classified:

* Append: same inode, the file is at least as long as the cursor's offset and the bytes just
  before the offset are still `cursor.tail`. Only the bytes after the offset are read.
* Rewrite (editor save in place, os.replace, truncation, delete + recreate): anything else.
  The whole file is read and a line is new only if it occurs more often than in the previous
  version (a multiset difference), so reordering or re-saving never re-submits a job.

Limitation: an in-place edit that keeps the file's length and the last 256 bytes before the
old offset unchanged looks like "nothing happened" (or like a plain append).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeGuard

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)

#: How many bytes before the offset are kept to recognise an in-place rewrite.
TAIL_BYTES = 256


@dataclass(frozen=True)
class FileCursor:
    inode: int | None = None  # st_ino of the version last read
    offset: int = 0  # byte offset just after the last complete line consumed
    line_count: int = 0  # complete lines consumed so far in this version
    tail: bytes = b""  # up to the last TAIL_BYTES bytes before offset

    def to_json(self) -> str:
        return json.dumps(
            {
                "inode": self.inode,
                "offset": self.offset,
                "line_count": self.line_count,
                "tail": base64.b64encode(self.tail).decode("ascii"),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, s: str) -> FileCursor:
        """Raises ValueError on anything that is not a cursor written by to_json."""
        data = json.loads(s)
        if not _is_cursor_dict(data):
            raise ValueError(f"not a file cursor: {s[:200]!r}")
        inode, offset = data.get("inode"), data.get("offset", 0)
        line_count, tail = data.get("line_count", 0), data.get("tail", "")
        return cls(inode, offset, line_count, base64.b64decode(tail, validate=True))


def _is_cursor_dict(data: object) -> TypeGuard[dict[str, Any]]:
    if not isinstance(data, dict):
        return False
    inode = data.get("inode")
    numbers = (data.get("offset", 0), data.get("line_count", 0))
    return (
        (inode is None or type(inode) is int)
        and all(type(n) is int and n >= 0 for n in numbers)
        and isinstance(data.get("tail", ""), str)
    )


@dataclass
class TailResult:
    #: (1-based line number in the current file, text without "\n"/"\r\n") to submit, in order
    lines: list[tuple[int, str]]
    cursor: FileCursor
    #: True: the caller must REPLACE its seen multiset by `seen_after`
    rewritten: bool
    #: when rewritten: hashes of every complete line of the current version
    seen_after: Counter[str] | None
    #: when not rewritten: hashes to ADD to the seen multiset
    appended_hashes: list[str]


def line_hash(text: str) -> str:
    """Identity of a line; trailing whitespace is ignored so an editor trimming it is no change."""
    return hashlib.sha1(text.rstrip().encode("utf-8", "surrogatepass")).hexdigest()


def _complete_lines(data: bytes) -> tuple[list[str], bytes]:
    """The complete lines of `data` and the bytes they span (up to the last "\\n")."""
    consumed = data[: data.rfind(b"\n") + 1]
    lines = [
        raw.removesuffix(b"\r").decode("utf-8", errors="replace")
        for raw in consumed.split(b"\n")[:-1]
    ]
    return lines, consumed


def _is_append(f: BinaryIO, size: int, inode: int, cursor: FileCursor) -> bool:
    """Whether the file is the version the cursor points into, possibly with more appended."""
    if cursor.inode != inode or size < cursor.offset:
        return False
    if len(cursor.tail) > cursor.offset:  # a corrupt cursor: start over with a full read
        return False
    f.seek(cursor.offset - len(cursor.tail))
    return f.read(len(cursor.tail)) == cursor.tail


def read_new(path: Path, cursor: FileCursor, load_seen: Callable[[], Counter[str]]) -> TailResult:
    """The lines to submit since `cursor`. `load_seen` is only called on a rewrite.

    A missing file returns nothing and keeps the cursor, so when the file reappears it is
    compared against the last version read. Other OSErrors propagate.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return TailResult([], cursor, rewritten=False, seen_after=None, appended_hashes=[])
    with f:
        # fstat of the open file, so the inode and the bytes read belong to the same version.
        st = os.fstat(f.fileno())
        appending = _is_append(f, st.st_size, st.st_ino, cursor)
        f.seek(cursor.offset if appending else 0)
        lines, consumed = _complete_lines(f.read())

    if appending:
        first = cursor.line_count + 1
        new_cursor = FileCursor(
            inode=st.st_ino,
            offset=cursor.offset + len(consumed),
            line_count=cursor.line_count + len(lines),
            # cursor.tail was just checked against the file, so this is what precedes offset.
            tail=(cursor.tail + consumed)[-TAIL_BYTES:],
        )
        return TailResult(
            lines=[(first + i, text) for i, text in enumerate(lines)],
            cursor=new_cursor,
            rewritten=False,
            seen_after=None,
            appended_hashes=[line_hash(text) for text in lines],
        )

    hashes = [line_hash(text) for text in lines]
    remaining = Counter(load_seen())  # a copy: the caller's multiset is not ours to change
    new_lines: list[tuple[int, str]] = []
    for number, (text, digest) in enumerate(zip(lines, hashes, strict=True), start=1):
        if remaining[digest] > 0:
            remaining[digest] -= 1  # this occurrence was already in the previous version
        else:
            new_lines.append((number, text))
    return TailResult(
        lines=new_lines,
        cursor=FileCursor(st.st_ino, len(consumed), len(lines), consumed[-TAIL_BYTES:]),
        rewritten=True,
        seen_after=Counter(hashes),
        appended_hashes=[],
    )


#: Event types that can mean new content. "opened" and "closed_no_write" are left out: the
#: daemon's own reads produce them, and reacting to them would make it wake itself forever.
_CONTENT_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})

#: What inotify is asked for (watchdog derives the kernel's event mask from it): files only,
#: never opens and reads, so the scheduler's own reads (GPU file, jobs file, SQLite) cost no
#: event at all. A "quiet" directory gets only the events of a finished write (closed after
#: writing, created, renamed into place): the state directory and its exit records, where
#: the scheduler's own SQLite, log writes and record deletions would otherwise each be one.
_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
]
_QUIET_FILTER: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileClosedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__()
        self._callback = callback

    def _call(self, path: bytes | str) -> None:
        try:
            self._callback(os.fsdecode(path))
        except Exception:
            # An exception would end the observer thread and the daemon would stop noticing
            # changes without saying so; log it and keep watching.
            log.exception("file watch callback failed for %s", os.fsdecode(path))

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CONTENT_EVENTS:
            return
        if event.event_type == "moved":
            self._call(event.dest_path)
        self._call(event.src_path)


class PathWatcher:
    """Calls `callback(path)` from the observer thread on changes in `dirs` (not recursive).

    Paths are absolute strings as inotify reports them; the callback should be quick (e.g. set
    a wakeup event) and filter the paths it cares about. Missing directories are created.
    Directories in `quiet` (and not also given in `dirs`) report only finished writes: files
    closed after writing, created, or renamed into place; not every write(2) nor deletions.
    """

    def __init__(
        self, dirs: Sequence[Path], callback: Callable[[str], None], quiet: Sequence[Path] = ()
    ) -> None:
        self._dirs: list[Path] = []
        for d in dirs:
            resolved = Path(d).expanduser().absolute()
            if resolved not in self._dirs:  # watching a directory twice doubles every event
                self._dirs.append(resolved)
        self._quiet: list[Path] = []
        for d in quiet:
            resolved = Path(d).expanduser().absolute()
            if resolved not in self._dirs and resolved not in self._quiet:
                self._quiet.append(resolved)
        self._handler = _Handler(callback)
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._observer is not None:
                return
            observer = Observer()
            for dirs, kinds in ((self._dirs, _FILTER), (self._quiet, _QUIET_FILTER)):
                for d in dirs:
                    d.mkdir(parents=True, exist_ok=True)
                    observer.schedule(self._handler, str(d), recursive=False, event_filter=kinds)
            observer.daemon = True  # never keep the process alive on its own
            observer.start()
            self._observer = observer

    def stop(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def __enter__(self) -> PathWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
