"""Find and kill a process tree, from /proc (Linux only).

A job is not one process: data loaders, `torchrun` workers and `setsid` helpers all have
to die with it. The tree is collected *before* any signal is sent, because a killed parent
orphans its children to init and the parent links that tie them to the job are lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_time: int  # clock ticks after boot: tells a process from a later one reusing its pid


def read_proc(pid: int) -> ProcInfo | None:
    """The process's /proc/PID/stat, or None when it does not exist (any more)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0],
            start_time=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def _all_processes() -> list[ProcInfo]:
    procs: list[ProcInfo] = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                procs.append(info)
    return procs


def _children_map(procs: Iterable[ProcInfo]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    return children


def _walk(roots: Iterable[int], children: dict[int, list[int]]) -> list[int]:
    """Every process below `roots` by parent links, breadth first, roots excluded."""
    seen: set[int] = set(roots)
    out: list[int] = []
    queue = list(seen)
    while queue:
        for child in children.get(queue.pop(0), []):
            if child not in seen:
                seen.add(child)
                out.append(child)
                queue.append(child)
    return out


def descendants(pid: int) -> list[int]:
    """All processes whose parent chain leads to `pid` (not `pid` itself), parents first."""
    return _walk([pid], _children_map(_all_processes()))


def collect_tree(pid: int) -> list[ProcInfo]:
    """`pid`, its descendants, and orphans still in a session/group led by one of them.

    A daemonising grandchild (fork, setsid, fork, parent exits) is reparented to init and
    escapes the parent links, but keeps the session or process group it was started in;
    sessions/groups *led* by a member of the tree belong to the job. Groups merely shared
    with the tree (e.g. the scheduler's own) are not followed.
    """
    procs = _all_processes()
    by_pid = {p.pid: p for p in procs}
    children = _children_map(procs)
    members = {pid, *_walk([pid], children)}
    leaders = {m for m in members if m in by_pid and by_pid[m].sid == m}
    groups = {m for m in members if m in by_pid and by_pid[m].pgid == m}
    orphans = [p.pid for p in procs if p.sid in leaders or p.pgid in groups]
    members.update(orphans)
    members.update(_walk(orphans, children))
    # Never signal ourselves or init, whatever the tree says.
    members -= {os.getpid(), 1, 0}
    return [by_pid[m] for m in members if m in by_pid]


def _alive(p: ProcInfo) -> bool:
    now = read_proc(p.pid)
    # A zombie has finished; only its parent's wait() is missing.
    return now is not None and now.start_time == p.start_time and now.state not in ("Z", "X")


def _signal(procs: Iterable[ProcInfo], sig: signal.Signals) -> None:
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)


def kill_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM `pid` and its whole tree, wait up to `grace_s`, then SIGKILL survivors.

    Blocks for at most about `grace_s` seconds. No error if the processes are already gone.
    """
    tree = collect_tree(pid)
    if not tree:
        return
    _signal(tree, signal.SIGTERM)
    # A stopped (Ctrl-Z'd) process only acts on SIGTERM once continued.
    _signal(tree, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in tree):
            return
        time.sleep(0.05)
    survivors = [p for p in tree if _alive(p)]
    # Survivors may have spawned new children during the grace period (e.g. cleanup traps).
    children = _children_map(_all_processes())
    late = set(_walk([p.pid for p in survivors], children)) - {p.pid for p in tree}
    late_info = [info for c in late if (info := read_proc(c)) is not None]
    _signal([*survivors, *late_info], signal.SIGKILL)
