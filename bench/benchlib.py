"""What the benchmark scripts share: sample statistics, the machine, the docs section writer,
the job script and a `gpusched start` subprocess on fake GPUs."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p95: float
    low: float
    high: float


def stats_ms(values_s: Sequence[float]) -> Stats:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        raise ValueError("no samples")
    p95 = ms[0] if len(ms) == 1 else statistics.quantiles(ms, n=20, method="inclusive")[18]
    return Stats(len(ms), statistics.median(ms), p95, ms[0], ms[-1])


def kill_server(socket: str | None) -> None:
    """Kill a private tmux server and remove the socket file tmux leaves behind."""
    if socket is None:
        return
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
    tmpdir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
    (tmpdir / socket).unlink(missing_ok=True)


def machine_base() -> dict[str, str]:
    """CPU model, core count and OS; each script adds the versions it depends on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    return {"CPU": cpu, "cores": str(os.cpu_count()), "OS": os_name}


def write_section(out: Path, section: str, begin: str, end: str, intro: str) -> None:
    """Replace the text between `begin` and `end` in `out` (append it when they are missing;
    create the file with `intro` when it does not exist). The rest is left alone."""
    if out.exists():
        text = out.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + section + tail
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = intro + section + "\n"
    out.write_text(text)


# ---- what several benchmarks run -----------------------------------------------------------

#: The job: time.time() is its first instruction and the last one before writing the result.
#: argv: OUT SLEEP [--cuda IDS] (gpusched appends --cuda; the script ignores it).
JOB_SCRIPT = """\
import time
t0 = time.time()
import os, sys
if float(sys.argv[2]) > 0:
    time.sleep(float(sys.argv[2]))
t1 = time.time()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(repr(t0) + " " + repr(t1))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


def wait_for(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def read_times(path: Path) -> tuple[float, float]:
    """(first instruction, last instruction) recorded by JOB_SCRIPT."""
    first, last = path.read_text().split()
    return float(first), float(last)


def has_session(socket: str, name: str) -> bool:
    # `=NAME`: exact match, as gpusched itself does.
    res = subprocess.run(
        ["tmux", "-L", socket, "has-session", "-t", f"={name}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return res.returncode == 0


def keeper(socket: str) -> None:
    """A long-lived non-job session, so the tmux server is not torn down between jobs."""
    subprocess.run(
        ["tmux", "-L", socket, "new-session", "-d", "-s", "bench_keeper", "sleep", "86400"],
        check=True,
    )


def tmux_server_pid(socket: str) -> int | None:
    res = subprocess.run(
        ["tmux", "-L", socket, "display-message", "-p", "-t", "bench_keeper", "#{pid}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    out = res.stdout.strip()
    return int(out) if out.isdigit() else None


def bench_env(repo: Path) -> tuple[dict[str, str], str]:
    """The environment schedulers run with, and the caller's original PATH.

    Jobs run `python3` from the scheduler's PATH: the interpreter's own directory comes first,
    so every tool runs the same interpreter by its full path (no pyenv/asdf shim)."""
    original_path = os.environ.get("PATH", "")
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE", "STY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{original_path}"
    env.pop("GPUSCHED_STATE_DIR", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    return env, original_path


# ---- processes: CPU and memory --------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcCpu:
    own_s: float  # utime + stime of the process itself
    children_s: float  # cutime + cstime: its children (and their own children) it has waited for


def proc_cpu(pid: int) -> ProcCpu | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ProcCpu((utime + stime) / _TICK, (cutime + cstime) / _TICK)


def proc_mem_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB ({} when it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# ---- a scheduler subprocess ------------------------------------------------------------------


def db_counts(db: Path) -> dict[str, int]:
    """Jobs per status, read from the state database without writing to it."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        conn.close()
    return {str(r[0]): int(r[1]) for r in rows}


def db_jobs(db: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        conn.close()


class Scheduler:
    """`python -m app start` (fake GPUs unless told another backend; a private tmux socket),
    in its own directory."""

    def __init__(
        self,
        root: Path,
        gpus: int,
        env: dict[str, str],
        runner: str = "tmux",
        backend: str = "fake",
        extra: Sequence[str] = (),
    ) -> None:
        """`gpus` fake GPUs (with `backend` "fake"); `extra` flags go after the bench's own,
        so they win (e.g. another `--ramp-up`)."""
        from app.gpus.fake import write_fake_gpus

        self.root = root
        self.runner = runner
        self.backend = backend
        self.extra = tuple(extra)
        self.socket = f"gpusched_bench_{uuid.uuid4().hex[:10]}"
        self.env = dict(env)
        if runner == "screen":  # a private socket directory: the user's sessions stay apart
            self.env["SCREENDIR"] = str(root / "screens")
        self.proc: subprocess.Popen[bytes] | None = None
        # The jobs file and the model config in a folder of their own: the scheduler watches
        # it, and its own output (scheduler.out) or the GPU file need not wake it up.
        (root / "in").mkdir(parents=True)
        if backend == "fake":
            write_fake_gpus(root / "gpus.json", gpus)
        self.llm_config = root / "in" / "llm_config.json"
        self.llm_config.write_text(json.dumps({"default_requirement": 1.0}))
        self.jobs_file = root / "in" / "jobs.txt"
        self.jobs_file.write_text("# priority,script_path,conda_env,arguments,allowed_gpus\n")
        self.db = root / "state" / "gpusched.db"

    def start(self) -> None:
        log = (self.root / "scheduler.out").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "start",
                 "--jobs-file", str(self.jobs_file),
                 "--llm-config", str(self.llm_config),
                 "--state-dir", str(self.root / "state"), "--gpu-backend", self.backend,
                 *(["--fake-gpus", str(self.root / "gpus.json")] if self.backend == "fake" else []),
                 "--runner", self.runner, "--tmux-socket", self.socket, "--ramp-up", "0",
                 *self.extra],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_server(self.socket)
        if self.runner == "screen":
            kill_screens(self.env["SCREENDIR"])

    def append(self, lines: Sequence[str]) -> float:
        """Append lines in one write; returns time.time() taken just before the write."""
        data = "".join(line + "\n" for line in lines)
        with self.jobs_file.open("a") as f:
            t = time.time()
            f.write(data)
            f.flush()
        return t

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = (self.root / "scheduler.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"scheduler exited with {self.proc.returncode}:\n{out}")

    def settled(self, total: int) -> bool:
        """Whether `total` jobs were queued and none is pending or running any more."""
        self.check_alive()
        counts = db_counts(self.db)
        return (
            sum(counts.values()) >= total
            and not counts.get("pending")
            and not counts.get("running")
        )

    def jobs_by_out(self) -> dict[str, dict[str, object]]:
        """Jobs by their first argument (the JOB_SCRIPT's output file)."""
        return {str(j["args"]).split()[0]: j for j in db_jobs(self.db) if j["args"]}


def kill_screens(screendir: str) -> None:
    """Quit every GNU Screen session in a private socket directory (the bench's own)."""
    if not Path(screendir).is_dir():
        return
    env = {**os.environ, "SCREENDIR": screendir}
    res = subprocess.run(["screen", "-ls"], capture_output=True, text=True, check=False, env=env)
    for line in res.stdout.splitlines():
        parts = line.split()
        if parts and "." in parts[0] and parts[0].split(".", 1)[0].isdigit():
            subprocess.run(["screen", "-S", parts[0], "-X", "quit"], capture_output=True,
                           check=False, env=env)  # fmt: skip


def job_line(script: Path, out: Path | str, sleep: float, allowed: str = "") -> str:
    return f"0,{script},,{out} {sleep:g},{allowed}"


@contextmanager
def running(sched: Scheduler, script: Path) -> Iterator[Scheduler]:
    """Start the scheduler and warm it up with one untimed job (first launch, tmux server)."""
    try:
        if sched.runner == "tmux":
            keeper(sched.socket)
        warm = sched.root / "warmup.out"
        sched.append([job_line(script, warm, 0)])  # before start: read by the very first pass
        sched.start()
        wait_for(lambda: warm.exists() or sched.check_alive(), 60, "the warm-up job")
        wait_for(lambda: sched.settled(1), 30, "the warm-up job to be reaped", 0.01)
        yield sched
    finally:
        sched.stop()


class Busy:
    """How busy the whole machine was from creation to `line()`: all CPUs' busy time in
    /proc/stat (every process, the bench's own included), in cores busy on average."""

    def __init__(self) -> None:
        self.start = (time.monotonic(), _busy_s())

    def line(self) -> str:
        (t0, b0), t1, b1 = self.start, time.monotonic(), _busy_s()
        cores = (b1 - b0) / max(t1 - t0, 1e-9)
        try:
            load = Path("/proc/loadavg").read_text().split()[0]
        except OSError:
            load = "unknown"
        return (
            f"Load: the machine's {os.cpu_count()} cores were {cores:.2f} busy on average during "
            f"the run (every process, this bench's and any other's); load average {load} at "
            "the end."
        )


def _busy_s() -> float:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def tool_version(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (res.stdout + res.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_line() -> str:
    """The machine, the interpreter and the terminal multiplexers, for a section's header."""
    info = {
        **machine_base(),
        "Python": f"{platform.python_version()} ({sys.executable})",
        "tmux": tool_version(["tmux", "-V"]),
        "screen": tool_version(["screen", "-v"]),
    }
    return "; ".join(f"{k} {v}" for k, v in info.items())


#: A benchmarks file created from scratch starts with this (the intro of docs/benchmarks.md).
INTRO = """\
# Benchmarks

gpusched measured against the floor that a bare tool achieves on the same machine, and against
two peers, [simple_gpu_scheduler](https://pypi.org/project/simple_gpu_scheduler/) (PyPI) and
task-spooler (Debian's `task-spooler`, command `tsp`), all in the same run:

- **Submission latency** (`latency`): appending a line to the jobs file → the job's tmux session
  exists, and → the job's first instruction runs. Floor: `tmux new-session -d` of the same script.
- **GPU idle gap** (`idlegap`): a job ends → the next waiting job starts on that GPU; gpusched
  with each runner, the two peers, and the floor: the same chain run back to back by a plain
  `sh` loop.
- **Throughput and per-job overhead** (`throughput`): 1,000 short jobs on 4 fake GPUs, end to
  end, with the CPU time of the schedulers and of everything they run.
- **Scale** (`scale`): ingesting a 100,000-line jobs file, one allocator pass with 10,000
  pending jobs on 8 GPUs, `status --json` with 10,000 jobs, the daemon idle with 1,000
  finished jobs.
- **Packing** (`packing`): the placement policies on synthetic traces, against a lower bound.
- **Dashboard responsiveness** (`dashboard`): its own bench, `python bench/dashboard.py`
  (or `python bench/run.py --with-dashboard`).

Reproduce everything with one command (2 cores and no GPU are enough: GPUs are simulated with
`--gpu-backend fake`, tmux and screen run on private sockets):

    python bench/run.py            # 5-8 minutes on 2 cores; --quick: about 3

It installs the peers first when they are missing (`pip install --target` into
`~/.cache/gpusched-bench` for simple_gpu_scheduler, `apt-get install task-spooler` as root or
with `sudo -n`); a peer that cannot be installed is reported as skipped in the tables. Each step
is also a script of its own (`python bench/idlegap.py --help`, ...) and rewrites only its section,
between its markers below. Every figure is a median (with p95 where it matters) of repeated
samples; the floor and the peers are measured side by side in the same run (interleaved or in
rotated rounds), so compare ratios and overheads rather than absolute numbers across machines.
The test suite contains no timed assertions: `tests/test_bench_smoke.py` and
`tests/test_bench_suite.py` (marked `bench`, run with `pytest -m bench`) only check that the
scripts run and write their sections.

"""
