"""The tailer on real files: appends, partial lines, restarts and every kind of rewrite."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from app.tailer import FileCursor, PathWatcher, TailResult, line_hash, read_new
from tests.helpers import wait_until


class Store:
    """What the daemon's store does with a TailResult: persist the cursor and the seen multiset."""

    def __init__(
        self, path: Path, cursor_json: str | None = None, seen: Counter[str] | None = None
    ):
        self.path = path
        self.cursor_json = cursor_json or FileCursor().to_json()
        self.seen: Counter[str] = Counter(seen or {})
        self.seen_loads = 0

    def _load_seen(self) -> Counter[str]:
        self.seen_loads += 1
        return self.seen

    def poll(self) -> list[str]:
        return [text for _, text in self.poll_numbered()]

    def poll_numbered(self) -> list[tuple[int, str]]:
        result = read_new(self.path, FileCursor.from_json(self.cursor_json), self._load_seen)
        self.apply(result)
        return result.lines

    def apply(self, result: TailResult) -> None:
        if result.rewritten:
            assert result.seen_after is not None
            self.seen = Counter(result.seen_after)
        else:
            self.seen.update(result.appended_hashes)
        self.cursor_json = result.cursor.to_json()

    def restarted(self) -> Store:
        return Store(self.path, self.cursor_json, self.seen)


def append(path: Path, text: str) -> None:
    with path.open("a", newline="") as f:
        f.write(text)


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.txt"
    path.write_text("a\nb\nc\n")
    return path


@pytest.fixture
def store(jobs: Path) -> Store:
    s = Store(jobs)
    assert s.poll() == ["a", "b", "c"]  # first run: every existing line is new
    return s


def test_first_run_numbers_lines(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("# comment\n\nx\npartial")
    assert Store(path).poll_numbered() == [(1, "# comment"), (2, ""), (3, "x")]


def test_append_one_line(store: Store, jobs: Path) -> None:
    append(jobs, "d\n")
    assert store.poll_numbered() == [(4, "d")]
    assert store.poll() == []
    assert store.seen == Counter(line_hash(x) for x in "abcd")


def test_append_does_not_reload_seen(store: Store, jobs: Path) -> None:
    loads = store.seen_loads
    append(jobs, "d\ne\n")
    assert store.poll() == ["d", "e"]
    assert store.seen_loads == loads


def test_partial_line_waits_for_its_newline(store: Store, jobs: Path) -> None:
    append(jobs, "0,/x.py,env,--a")
    assert store.poll() == []
    append(jobs, " 1,0-3")
    assert store.poll() == []
    append(jobs, "\ne\n")
    assert store.poll_numbered() == [(4, "0,/x.py,env,--a 1,0-3"), (5, "e")]


def test_crlf(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_bytes(b"a\r\nb\r\n")
    store = Store(path)
    assert store.poll() == ["a", "b"]
    append(path, "c\r")
    assert store.poll() == []
    append(path, "\n")
    assert store.poll() == ["c"]


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    assert Store(path).poll() == ["ok", "\ufffd\ufffd bad"]


def test_restart_resubmits_nothing(store: Store, jobs: Path) -> None:
    append(jobs, "d\n")
    assert store.poll() == ["d"]
    again = store.restarted()
    assert again.poll() == []
    append(jobs, "e\n")
    assert again.poll_numbered() == [(5, "e")]


def test_lines_longer_than_the_tail(store: Store, jobs: Path) -> None:
    long = "x" * 1000
    append(jobs, long + "\n")
    assert store.poll() == [long]
    assert len(FileCursor.from_json(store.cursor_json).tail) == 256
    append(jobs, "y\n")
    assert store.poll() == ["y"]


def test_truncate_and_write_new_content(store: Store, jobs: Path) -> None:
    with jobs.open("r+") as f:
        f.truncate(0)
        f.write("b\nnew\n")
    assert store.poll_numbered() == [(2, "new")]
    assert store.seen == Counter({line_hash("b"): 1, line_hash("new"): 1})
    # Lines dropped by a rewrite are forgotten: writing them back submits them again.
    append(jobs, "a\n")
    assert store.poll() == ["a"]


def test_truncation_seen_on_its_own_forgets_everything(store: Store, jobs: Path) -> None:
    """An empty version is a version: what is written next is all new (the store dedups)."""
    with jobs.open("r+") as f:
        f.truncate(0)
    assert store.poll() == []
    assert store.seen == Counter()
    jobs.write_text("b\nnew\n")
    assert store.poll() == ["b", "new"]


def test_atomic_replace_with_a_line_added_in_the_middle(store: Store, jobs: Path) -> None:
    tmp = jobs.with_name("jobs.txt.tmp")
    tmp.write_text("a\nb\nnew\nc\n")
    inode = jobs.stat().st_ino
    tmp.replace(jobs)
    assert jobs.stat().st_ino != inode
    assert store.poll_numbered() == [(3, "new")]
    append(jobs, "d\n")
    assert store.poll_numbered() == [(5, "d")]


def test_in_place_save_with_an_added_line(store: Store, jobs: Path) -> None:
    inode = jobs.stat().st_ino
    with jobs.open("w") as f:
        f.write("new\na\nb\nc\n")
    assert jobs.stat().st_ino == inode
    assert store.poll_numbered() == [(1, "new")]


def test_in_place_save_same_length_change(store: Store, jobs: Path) -> None:
    with jobs.open("w") as f:
        f.write("a\nX\nc\n")
    assert store.poll() == ["X"]


def test_reordering_and_trailing_whitespace_are_no_change(store: Store, jobs: Path) -> None:
    jobs.write_text("c  \na\nb\t\n")
    assert store.poll() == []


def test_delete_and_recreate(store: Store, jobs: Path) -> None:
    jobs.unlink()
    cursor = store.cursor_json
    assert store.poll() == []  # missing: nothing, cursor kept
    assert store.cursor_json == cursor
    jobs.write_text("a\nb\nc\nnew\n")
    assert store.poll_numbered() == [(4, "new")]


def test_delete_and_recreate_with_different_content(store: Store, jobs: Path) -> None:
    jobs.unlink()
    jobs.write_text("c\nother\n")
    assert store.poll() == ["other"]


def test_missing_file_from_the_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobs.txt")
    result = read_new(store.path, FileCursor(), store._load_seen)
    assert result.lines == []
    assert result.cursor == FileCursor()
    assert not result.rewritten
    assert result.appended_hashes == []
    (tmp_path / "jobs.txt").write_text("x\n")
    assert store.poll() == ["x"]


def test_duplicate_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("A\nA\nB\n")
    store = Store(path)
    assert store.poll() == ["A", "A", "B"]
    path.write_text("A\nB\nA\nA\n")  # one more A
    assert store.poll_numbered() == [(4, "A")]
    path.write_text("A\nB\n")  # two A removed
    assert store.poll() == []
    assert store.seen[line_hash("A")] == 1
    path.write_text("A\nB\nA\n")  # an A added back counts as new
    assert store.poll_numbered() == [(3, "A")]


def test_cursor_json_round_trip() -> None:
    cursor = FileCursor(inode=123, offset=45, line_count=6, tail=b"\x00\xff\n")
    assert FileCursor.from_json(cursor.to_json()) == cursor
    assert FileCursor.from_json(FileCursor().to_json()) == FileCursor()
    for bad in ["[]", '{"offset": "1"}', '{"offset": -1}', '{"tail": "!!"}', "nope"]:
        with pytest.raises(ValueError):
            FileCursor.from_json(bad)


def test_corrupt_cursor_falls_back_to_a_rewrite(store: Store, jobs: Path) -> None:
    bogus = FileCursor(inode=jobs.stat().st_ino, offset=2, line_count=1, tail=b"too long")
    result = read_new(jobs, bogus, lambda: store.seen)
    assert result.rewritten
    assert result.lines == []


# --- PathWatcher ----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, path: str) -> None:
        with self.lock:
            self.paths.append(path)

    def clear(self) -> None:
        with self.lock:
            self.paths.clear()

    def saw(self, path: Path) -> bool:
        with self.lock:
            return str(path) in self.paths


def test_path_watcher_sees_append_replace_and_delete(tmp_path: Path) -> None:
    watched = tmp_path / "jobs-dir"
    other = tmp_path / "state" / "exits"  # created by the watcher
    jobs = watched / "jobs.txt"
    recorder = Recorder()
    with PathWatcher([watched, other, watched], recorder):
        assert other.is_dir()
        append(jobs, "a\n")
        assert wait_until(lambda: recorder.saw(jobs), timeout=5)

        tmp = watched / "jobs.txt.tmp"
        tmp.write_text("b\n")
        recorder.clear()
        tmp.replace(jobs)
        assert wait_until(lambda: recorder.saw(jobs) and recorder.saw(tmp), timeout=5)

        exit_file = other / "job_1.json"
        exit_file.write_text("{}")
        assert wait_until(lambda: recorder.saw(exit_file), timeout=5)

        recorder.clear()
        jobs.unlink()
        assert wait_until(lambda: recorder.saw(jobs), timeout=5)


def test_path_watcher_survives_a_failing_callback(tmp_path: Path) -> None:
    recorder = Recorder()

    def flaky(path: str) -> None:
        recorder(path)
        raise RuntimeError("boom")

    watcher = PathWatcher([tmp_path], flaky)
    watcher.start()
    try:
        (tmp_path / "one").write_text("1")
        assert wait_until(lambda: recorder.saw(tmp_path / "one"), timeout=5)
        (tmp_path / "two").write_text("2")
        assert wait_until(lambda: recorder.saw(tmp_path / "two"), timeout=5)
    finally:
        watcher.stop()
    watcher.stop()  # idempotent


def test_path_watcher_ignores_its_readers(tmp_path: Path) -> None:
    """Reading a file (open/close without writing) must not wake the daemon up."""
    path = tmp_path / "jobs.txt"
    path.write_text("x\n")
    recorder = Recorder()
    with PathWatcher([tmp_path], recorder):
        path.read_text()
        marker = tmp_path / "marker"
        marker.write_text("")  # events arrive in order: once the marker is seen, so was the read
        assert wait_until(lambda: recorder.saw(marker), timeout=5)
        assert not recorder.saw(path)
