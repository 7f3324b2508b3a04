"""app/trust.py, sshd's StrictModes for gpusched, against real files with real owners and modes.

The tests run as root (CI containers) or as a user. Group and other write bits mean the same
for both. Files owned by someone else can only be made as root; as a user, the checks are
asked "for" another uid instead (`uid=`), which makes our own files someone else's.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import pytest

from app import trust
from app.trust import Gate, check, find_problem

ROOT = os.getuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="needs root to give files to other users")
#: A uid that is neither ours nor root's, whose files we can make as root.
OTHER = 65534 if ROOT else None


def make(path: Path, mode: int = 0o644, text: str = "0,x.py,,,\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def chmod(path: Path, mode: int) -> Path:
    path.chmod(mode)
    return path


@pytest.fixture
def home(tmp_path: Path) -> frozenset[str]:
    """Stop the walk at tmp_path, as if it were our home directory: what is above it (the
    machine's /tmp) is not ours to judge in a test."""
    return frozenset({str(tmp_path)})


def test_own_file_in_own_directories_passes(tmp_path: Path, home: frozenset[str]) -> None:
    jobs = make(tmp_path / "proj" / "jobs.txt")
    assert check(jobs, "jobs file", stops=home) is None
    assert check(jobs.parent, "spool folder", stops=home) is None


@pytest.mark.parametrize("mode", [0o646, 0o666, 0o602])
def test_a_file_others_can_write_is_refused(
    tmp_path: Path, home: frozenset[str], mode: int
) -> None:
    jobs = make(tmp_path / "jobs.txt", mode)
    message = check(jobs, "jobs file", stops=home)
    assert message is not None
    me = pwd.getpwuid(os.getuid()).pw_name
    assert message.startswith(f"jobs file {jobs}: it (owner {me}, mode {mode:04o}")
    assert "is writable by every user" in message
    assert f"run commands as {me}" in message
    assert f"chmod go-w {jobs}" in message
    assert "--no-strict-modes" in message
    assert "GPUSCHED_STRICT_MODES=0" in message


def test_a_directory_others_can_write_is_refused(tmp_path: Path, home: frozenset[str]) -> None:
    jobs = make(tmp_path / "shared" / "jobs.txt", 0o600)
    chmod(jobs.parent, 0o777)
    message = check(jobs, "jobs file", stops=home)
    assert message is not None
    # The directory is named, not the file: renaming jobs.txt away and back is the attack.
    assert f"directory {jobs.parent} (owner" in message
    assert "mode 0777, drwxrwxrwx) is writable by every user" in message
    assert f"chmod go-w {jobs.parent}" in message
    # Every directory up to home counts, not only the nearest.
    chmod(jobs.parent, 0o755)
    deep = make(jobs.parent / "a" / "b" / "jobs.txt")
    assert check(deep, "jobs file", stops=home) is None
    chmod(jobs.parent, 0o757)
    assert f"directory {jobs.parent} (" in (check(deep, "jobs file", stops=home) or "")


def test_the_walk_stops_at_the_home_directory(tmp_path: Path) -> None:
    """Like sshd: the home directory is checked, what is above it is not."""
    top = tmp_path / "top"
    jobs = make(top / "home" / "jobs.txt")
    chmod(top, 0o777)
    assert check(jobs, "jobs file", stops=frozenset({str(top / "home")})) is None
    refused = check(jobs, "jobs file", stops=frozenset({str(tmp_path)}))
    assert refused is not None and f"directory {top} (" in refused
    chmod(top / "home", 0o777)  # the home directory itself is checked
    refused = check(jobs, "jobs file", stops=frozenset({str(top / "home")}))
    assert refused is not None and f"directory {top / 'home'} (" in refused


def test_a_sticky_directory_is_fine_above_an_entry_of_ours(
    tmp_path: Path, home: frozenset[str]
) -> None:
    """/tmp: everybody may create entries, but only an entry's owner may rename or delete it."""
    sticky = tmp_path / "tmp"
    jobs = make(sticky / "mine" / "jobs.txt")
    chmod(sticky, 0o1777)
    assert check(jobs, "jobs file", stops=home) is None
    assert check(sticky / "new.txt", "jobs file", stops=home) is None  # not there yet
    chmod(sticky, 0o777)  # without the sticky bit anybody may rename `mine` away
    assert f"directory {sticky} (" in (check(jobs, "jobs file", stops=home) or "")
    # The sticky bit does not make a directory the path *ends* at safe: anyone may add to it.
    chmod(sticky, 0o1777)
    message = check(sticky, "spool folder", stops=home)
    assert message is not None and "is writable by every user" in message


@as_root
def test_a_sticky_directory_does_not_cover_an_entry_of_someone_else(
    tmp_path: Path, home: frozenset[str]
) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    chmod(sticky, 0o1777)
    planted = make(sticky / "jobs.txt", 0o644)
    os.chown(planted, OTHER, OTHER)
    message = check(planted, "jobs file", stops=home)
    assert message is not None and f"belongs to {pwd.getpwuid(OTHER).pw_name}" in message
    # A symlink someone else planted there could be pointed elsewhere at any time, even if
    # it points at a good file now.
    good = make(tmp_path / "good" / "jobs.txt")
    link = sticky / "link.txt"
    link.symlink_to(good)
    os.lchown(link, OTHER, OTHER)
    assert f"directory {sticky} (" in (check(link, "jobs file", stops=home) or "")
    os.lchown(link, 0, 0)
    assert check(link, "jobs file", stops=home) is None


def test_a_file_of_another_user_is_refused(tmp_path: Path, home: frozenset[str]) -> None:
    jobs = make(tmp_path / "jobs.txt", 0o644)
    if ROOT:
        assert OTHER is not None
        os.chown(jobs, OTHER, OTHER)
        owner, me = OTHER, 0
    else:  # our own file, judged for another user: to them, we are the someone else
        owner, me = os.getuid(), os.getuid() + 1
    message = check(jobs, "jobs file", uid=me, stops=home)
    assert message is not None
    owner_name = pwd.getpwuid(owner).pw_name
    assert f"belongs to {owner_name}" in message
    assert f"(owner {owner_name}, mode 0644" in message
    assert "sudo chown" in message


def test_root_is_trusted_whoever_runs(tmp_path: Path) -> None:
    """Files of root pass for every user (root could run anything as them anyway)."""
    for path in (Path("/etc/passwd"), Path("/usr/bin")):
        st = path.stat()
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            pytest.skip(f"{path} is not a plain root-owned path here")
    assert check("/etc/passwd", "llm config file", uid=4242) is None
    assert check("/usr/bin", "spool folder", uid=4242) is None


def private_group() -> tuple[int, int] | None:
    """(uid, gid) of a group whose only member is that uid (a user private group)."""
    for group in grp.getgrall():
        members = trust.group_members(group.gr_gid)
        if len(members) == 1:
            (uid,) = members
            if uid > 0 and (ROOT or uid == os.getuid()):
                return uid, group.gr_gid
    return None


def shared_group() -> int | None:
    """A group with no members or several: writable by it means writable by others."""
    for group in grp.getgrall():
        if len(trust.group_members(group.gr_gid)) != 1 and (ROOT or group.gr_gid in os.getgroups()):
            return group.gr_gid
    return None


def test_group_write_is_fine_when_the_owner_is_the_only_member(
    tmp_path: Path, home: frozenset[str]
) -> None:
    """Debian and Ubuntu give each user a group of their own and umask 002: a jobs file
    made there is group-writable, and that group is only its owner (sshd on Debian agrees)."""
    found = private_group()
    if found is None:
        pytest.skip("no user private group usable here")
    uid, gid = found
    jobs = make(tmp_path / "jobs.txt", 0o664)
    os.chown(jobs, uid, gid)
    assert check(jobs, "jobs file", uid=uid, stops=home) is None


def test_group_write_is_refused_when_others_are_in_the_group(
    tmp_path: Path, home: frozenset[str]
) -> None:
    gid = shared_group()
    if gid is None:
        pytest.skip("no shared group usable here")
    jobs = make(tmp_path / "jobs.txt", 0o664)
    os.chown(jobs, -1, gid)
    message = check(jobs, "jobs file", stops=home)
    assert message is not None
    assert f"is writable by group {grp.getgrgid(gid).gr_name}" in message
    assert f"chmod g-w {jobs}" in message


def test_symlinks_are_judged_where_they_are_and_where_they_lead(
    tmp_path: Path, home: frozenset[str]
) -> None:
    good = make(tmp_path / "good" / "jobs.txt")
    bad_dir = tmp_path / "bad"
    bad = make(bad_dir / "jobs.txt")
    chmod(bad_dir, 0o777)
    # A link of ours, in a directory of ours, to a file of ours: fine.
    link = tmp_path / "links" / "jobs.txt"
    link.parent.mkdir()
    link.symlink_to(good)
    assert check(link, "jobs file", stops=home) is None
    # A link to a file in a directory others can write: its target can be replaced.
    link.unlink()
    link.symlink_to(bad)
    assert f"directory {bad_dir} (" in (check(link, "jobs file", stops=home) or "")
    # A good target, but the link lives where others can replace the link itself.
    loose = bad_dir / "link.txt"
    loose.symlink_to(good)
    assert f"directory {bad_dir} (" in (check(loose, "jobs file", stops=home) or "")


def test_missing_files_and_folders(tmp_path: Path, home: frozenset[str]) -> None:
    """A jobs file that does not exist yet passes when the folders that will hold it do."""
    assert check(tmp_path / "later.txt", "jobs file", stops=home) is None
    assert check(tmp_path / "new" / "dir" / "later.txt", "jobs file", stops=home) is None
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    chmod(open_dir, 0o777)
    message = check(open_dir / "later.txt", "jobs file", stops=home)
    assert message is not None and f"directory {open_dir} (" in message
    message = check(open_dir / "state", "state directory", stops=home)
    assert message is not None and f"directory {open_dir} (" in message


def test_what_kind_of_file_is_the_reader_s_business(tmp_path: Path, home: frozenset[str]) -> None:
    """A FIFO or a folder where a file should be is judged by who can change it, like any
    path; reading it is up to the reader (which reports a folder as the wrong kind)."""
    fifo = tmp_path / "jobs.fifo"
    os.mkfifo(fifo, 0o600)
    assert find_problem(fifo, stops=home) is None
    assert find_problem(tmp_path, stops=home) is None
    fifo.chmod(0o622)
    message = check(fifo, "jobs file", stops=home)
    assert message is not None and "(owner" in message and "prw--w--w-" in message


def test_a_path_that_cannot_be_checked_is_refused(tmp_path: Path, home: frozenset[str]) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    message = check(loop / "jobs.txt", "jobs file", stops=home)
    assert message is not None
    assert message.startswith(f"jobs file {loop}/jobs.txt: cannot be checked")
    assert message.endswith(f"; or skip this check with {trust.OVERRIDE}")


def test_the_gate_reports_a_problem_once_and_its_fix(tmp_path: Path) -> None:
    jobs = make(tmp_path / "jobs.txt")
    gate = Gate(uid=os.getuid())
    gate.stops = frozenset({str(tmp_path)})
    assert gate.check(jobs, "jobs file") == (True, None)
    chmod(jobs, 0o666)
    ok, news = gate.check(jobs, "jobs file")
    assert not ok and news is not None and news.startswith(f"not reading jobs file {jobs}: ")
    assert gate.problem(jobs) == news
    assert gate.check(jobs, "jobs file") == (False, None)  # said once, not every pass
    chmod(jobs, 0o644)
    ok, news = gate.check(jobs, "jobs file")
    assert ok and news == f"jobs file {jobs} passes the ownership and mode checks again; reading it"
    assert gate.problem(jobs) is None
    assert gate.check(jobs, "jobs file") == (True, None)
    chmod(jobs, 0o666)
    assert Gate(enabled=False).check(jobs, "jobs file") == (True, None)
