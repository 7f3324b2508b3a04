"""The peers gpusched is measured against, installed by the benchmark's own setup step.

- simple_gpu_scheduler (PyPI, pinned): reads shell commands on stdin and runs each with
  `Popen(shell=True)` in a thread per job, `CUDA_VISIBLE_DEVICES` set to the GPU it took from
  a semaphore-guarded pool; no polling (`proc.wait()` releases the GPU). Installed with pip
  into the bench's cache folder (`--target`), never into the project's environment.
- task-spooler (Debian's `task-spooler`, command `tsp`): a queue server per socket; each
  `tsp CMD` forks a client that waits for the server's go and runs CMD with the *client's*
  environment. Debian's 1.0.1 has no GPU support (no `-G`), so the bench runs one queue per
  fake GPU (private `TS_SOCKET`, one slot each) and submits each job to its GPU's queue with
  `CUDA_VISIBLE_DEVICES` set, jobs dealt round robin. Installed with apt-get when missing.
- the floor: the same commands run back to back by a plain `sh` script, one per GPU.

A peer that cannot be installed is skipped with a note in the tables, never a crash.
`ToolRun` is what every runner returns; everything a runner starts is stopped in `finally`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import proc_cpu, wait_for

SGS_PACKAGE = "simple_gpu_scheduler"
SGS_VERSION = "0.1.4"
TSP_PACKAGE = "task-spooler"

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpusched-bench"


@dataclass(frozen=True)
class Peer:
    name: str
    version: str | None  # None: not available, see note
    note: str  # where it came from, or why it is missing

    @property
    def available(self) -> bool:
        return self.version is not None


# ---- installation ----------------------------------------------------------------------------


def sgs_target() -> Path:
    return CACHE / f"{SGS_PACKAGE}-{SGS_VERSION}"


def _sgs_version(target: Path) -> str | None:
    for dist in importlib.metadata.distributions(path=[str(target)]):
        if dist.metadata["Name"].replace("-", "_").lower() == SGS_PACKAGE:
            return dist.version
    return None


def setup_sgs(install: bool = True) -> Peer:
    """simple_gpu_scheduler in the bench cache (pip install --target), installed when missing."""
    name = "simple_gpu_scheduler"
    target = sgs_target()
    version = _sgs_version(target) if target.is_dir() else None
    if version is None and install:
        print(f"setup: pip install {SGS_PACKAGE}=={SGS_VERSION} into {target}", flush=True)
        res = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", str(target), f"{SGS_PACKAGE}=={SGS_VERSION}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"setup: could not install {SGS_PACKAGE}: {tail[0]}", flush=True)
            return Peer(name, None, f"not installed: pip failed ({tail[0]})")
        version = _sgs_version(target)
    if version is None:
        return Peer(name, None, "not installed")
    return Peer(name, version, f"PyPI, pip install --target {target}")


def _apt_install(package: str) -> str | None:
    """apt-get install (as root, or with `sudo -n`); None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and no sudo"
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", package]
    print(f"setup: {shlex.join(install)}", flush=True)
    res = subprocess.run(install, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:  # the package lists may be missing (fresh container): update once
        subprocess.run([*prefix, "apt-get", "update", "-q"], capture_output=True, check=False,
                       env=env)  # fmt: skip
        res = subprocess.run(install, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get failed ({tail[0]})"
    return None


def setup_tsp(install: bool = True) -> Peer:
    """task-spooler's `tsp`, apt-get installed when missing."""
    name = "task-spooler (`tsp`)"
    if shutil.which("tsp") is None and install:
        why = _apt_install(TSP_PACKAGE)
        if why is not None:
            print(f"setup: could not install {TSP_PACKAGE}: {why}", flush=True)
            return Peer(name, None, f"not installed: {why}")
    if shutil.which("tsp") is None:
        return Peer(name, None, "not installed")
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", TSP_PACKAGE],
                         capture_output=True, text=True, check=False)  # fmt: skip
    version = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None
    if version is None:  # not from dpkg: ask the binary
        out = subprocess.run(["tsp", "-V"], capture_output=True, text=True, check=False)
        version = ((out.stdout + out.stderr).strip().splitlines() or ["unknown"])[0]
    return Peer(name, version, f"Debian package, {shutil.which('tsp')}")


def setup_peers(install: bool = True) -> dict[str, Peer]:
    return {"sgs": setup_sgs(install), "tsp": setup_tsp(install)}


# ---- process accounting ------------------------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (daemonized tmux/screen/tsp servers,
    tsp's per-job clients), so their CPU time reaches RUSAGE_CHILDREN when they are reaped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(keep: Sequence[int] = ()) -> int:
    """Reap exited adopted descendants (never the pids in `keep`, our own live Popens).
    Call from the main thread only, while no subprocess.run is in flight. Returns how many."""
    reaped = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in keep:
            return reaped
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)
            reaped += 1


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---- runners ---------------------------------------------------------------------------------


@dataclass
class ToolRun:
    t_submit: float  # time.time() just before the first job was handed over
    own_cpu_s: float | None  # the scheduling process(es) themselves, from submission to done
    note: str = ""


class PeerTool(Protocol):
    label: str

    def run(
        self,
        commands: Sequence[Sequence[str]],
        gpus: Sequence[int],
        done: Callable[[], bool],
        timeout: float,
    ) -> ToolRun: ...


def deal(commands: Sequence[Sequence[str]], gpus: Sequence[int]) -> dict[int, list[list[str]]]:
    """Round robin: job i to gpus[i % len(gpus)]."""
    out: dict[int, list[list[str]]] = {g: [] for g in gpus}
    for i, argv in enumerate(commands):
        out[gpus[i % len(gpus)]].append(list(argv))
    return out


def _own_cpu(pids: Sequence[int]) -> float:
    return sum(c.own_s for p in pids if (c := proc_cpu(p)) is not None)


def _wait_settled(pid: int, timeout: float = 10.0) -> None:
    """Until the process sleeps (its start-up done: blocked on a read), at most `timeout`."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        quiet = quiet + 1 if state == "S" else 0
        time.sleep(0.02)


class ShellLoop:
    """The floor: one `sh` script per GPU running its jobs back to back."""

    label = "floor: plain `sh` loop"

    def __init__(self, work: Path) -> None:
        self.work = work

    def run(
        self,
        commands: Sequence[Sequence[str]],
        gpus: Sequence[int],
        done: Callable[[], bool],
        timeout: float,
    ) -> ToolRun:
        self.work.mkdir(parents=True, exist_ok=True)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            scripts = []
            for gpu, jobs in deal(commands, gpus).items():
                script = self.work / f"loop_{gpu}_{time.monotonic_ns()}.sh"
                # fd 3 keeps the pipe from us; the last line waits on it, so the shell is
                # still there to have its CPU time read once the jobs are done.
                lines = ["exec 3<&0 </dev/null", f"export CUDA_VISIBLE_DEVICES={gpu}"]
                lines += [shlex.join(argv) for argv in jobs]
                lines.append("read _ <&3")
                script.write_text("\n".join(lines) + "\n")
                scripts.append(script)
            t0 = time.time()
            for script in scripts:
                procs.append(subprocess.Popen(["/bin/sh", str(script)], stdin=subprocess.PIPE))
            wait_for(done, timeout, "the shell loops", interval=0.01)
            return ToolRun(t0, _own_cpu([p.pid for p in procs]))
        finally:
            _close_all(procs)


def _close_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class SimpleGpuScheduler:
    """`simple_gpu_scheduler --gpus ...` with the commands on its stdin (kept open until the
    jobs are done, so the process is still there to have its CPU time read)."""

    label = "simple_gpu_scheduler"

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def run(
        self,
        commands: Sequence[Sequence[str]],
        gpus: Sequence[int],
        done: Callable[[], bool],
        timeout: float,
    ) -> ToolRun:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(sgs_target()), env.get("PYTHONPATH")) if p
        )
        env.pop("CUDA_VISIBLE_DEVICES", None)
        argv = [sys.executable, "-m", "simple_gpu_scheduler.scheduler",
                "--gpus", *map(str, gpus)]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        try:
            assert proc.stdin is not None
            _wait_settled(proc.pid)  # imported and blocked on stdin: ready
            data = "".join(shlex.join(argv) + "\n" for argv in commands).encode()
            before = _own_cpu([proc.pid])
            t0 = time.time()
            proc.stdin.write(data)
            proc.stdin.flush()
            wait_for(done, timeout, "simple_gpu_scheduler's jobs", interval=0.01)
            return ToolRun(t0, _own_cpu([proc.pid]) - before)
        finally:
            _close_all([proc])


class TaskSpooler:
    """One `tsp` queue (server) per GPU on private sockets, one slot each."""

    label = "task-spooler (`tsp`)"

    def __init__(self, work: Path) -> None:
        self.work = work

    def _env(self, gpu: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TS_SOCKET=str(self.work / f"tsp_{gpu}.sock"),
            TMPDIR=str(self.work / "tmp"),
            TS_SLOTS="1",
            TS_MAXFINISHED="100000",
            CUDA_VISIBLE_DEVICES=str(gpu),
        )
        return env

    def _server_pid(self, gpu: int) -> int | None:
        """The queue server: the `tsp` process listening on this GPU's socket (a unix socket's
        inode in /proc/PID/fd is not the file's: /proc/net/unix maps the path to it)."""
        sock = str(self.work / f"tsp_{gpu}.sock")
        inodes = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 8 and parts[-1] == sock:
                    inodes.add(f"socket:[{parts[6]}]")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() != "tsp":
                    continue
                for fd in (proc / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if str(fd.readlink()) in inodes:
                            return int(proc.name)
        return None

    def run(
        self,
        commands: Sequence[Sequence[str]],
        gpus: Sequence[int],
        done: Callable[[], bool],
        timeout: float,
    ) -> ToolRun:
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        try:
            for gpu in gpus:  # start each server (one slot) before the clock starts
                subprocess.run(["tsp", "-S", "1"], env=self._env(gpu), check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
            servers = [p for g in gpus if (p := self._server_pid(g)) is not None]
            per_gpu = deal(commands, gpus)
            envs = {g: self._env(g) for g in gpus}
            before = _own_cpu(servers)
            t0 = time.time()
            # Interleaved across the queues, as a user (or a script) would submit them.
            for i in range(max(len(v) for v in per_gpu.values())):
                for gpu, jobs in per_gpu.items():
                    if i < len(jobs):
                        subprocess.run(["tsp", "-n", *jobs[i]], env=envs[gpu], check=True,
                                       stdout=subprocess.DEVNULL)  # fmt: skip
            wait_for(done, timeout, "task-spooler's jobs", interval=0.01)
            note = "" if len(servers) == len(gpus) else "server CPU not found"
            return ToolRun(t0, _own_cpu(servers) - before if servers else None, note)
        finally:
            for gpu in gpus:
                subprocess.run(["tsp", "-K"], env=self._env(gpu), capture_output=True,
                               check=False)  # fmt: skip
