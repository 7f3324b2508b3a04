"""gpusched on a real NVIDIA GPU: the probes against nvidia-smi, then real PyTorch jobs.

Needs a machine with an NVIDIA GPU, its driver, and PyTorch (`python3 -c 'import torch'`); it
runs in a few minutes and leaves nothing behind (private tmux socket, temporary state folder).
It also runs without a GPU (`--gpu-backend fake`), where the jobs only pretend to use CUDA: that
is how its own orchestration is tested (`tests/test_bench_smoke.py`).

    python bench/gpu_check.py --out gpu_check.json [--runner tmux|direct] [--report report.md]

1. Probes: one snapshot of each backend (NVML, GPUtil) beside `nvidia-smi --query-gpu`, and
   the median time of one snapshot of each.
2. A scheduler (`gpusched start --gpu-backend nvml`, GPU 0 only) and a timeline sampled every
   0.25 s (what NVML reports, what `status --json` says), through these steps:
   - memory held by a process gpusched did not start (a "foreign" PyTorch process holding
     90 % of the GPU): every job waits with the memory-threshold reason, none starts;
   - the foreign process exits: two half-GPU jobs (`--llm half`) start side by side on the
     GPU, each allocating its memory and running bf16 matrix products; a whole-GPU job waits
     for both; the `--cuda` argument each job received is recorded by the job itself;
   - a job that asks for more memory than the GPU has dies of CUDA out-of-memory: it is queued
     again once with 1.5x the memory, then recorded failed;
   - a job that ignores SIGTERM is killed with `gpusched kill`: the tree goes (SIGKILL after
     the grace period) and its memory is seen freed by NVML.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The job every step runs: records what it was given, allocates, computes, records again.
JOB = r"""
import argparse, json, os, signal, sys, time
t0 = time.time()
p = argparse.ArgumentParser()
p.add_argument("--out"); p.add_argument("--llm"); p.add_argument("--cuda")
p.add_argument("--gb", type=float, default=1.0); p.add_argument("--seconds", type=float, default=5)
p.add_argument("--ignore-term", action="store_true")
a = p.parse_args()
rec = {"argv": sys.argv[1:], "cuda_arg": a.cuda, "pid": os.getpid(), "start": t0,
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER"),
       "GPUSCHED_GPUS": os.environ.get("GPUSCHED_GPUS"),
       "GPUSCHED_JOB_ID": os.environ.get("GPUSCHED_JOB_ID")}
def save():
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, a.out)
save()
if a.ignore_term:  # note the SIGTERM and go on: only SIGKILL ends this job
    def noted(signum, frame):
        rec["sigterm_at"] = time.time()
        save()
    signal.signal(signal.SIGTERM, noted)
fake = os.environ.get("GPU_CHECK_FAKE") == "1"
if fake:  # no GPU: pretend, so that the orchestration can be tested anywhere
    if a.gb > 1000:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate (fake)", flush=True)
        sys.exit(1)
    rec["device_name"] = "fake"; rec["allocated_at"] = time.time(); save()
    while time.time() - t0 < a.seconds:
        time.sleep(0.05)
    rec["end"] = time.time(); save()
    sys.exit(0)
import torch
rec["torch"] = torch.__version__
rec["import_s"] = time.time() - t0
dev = torch.device("cuda", int(a.cuda.split(",")[0]))
rec["device_count"] = torch.cuda.device_count()
rec["device_name"] = torch.cuda.get_device_name(dev)
save()
x = torch.empty(int(a.gb * 2**30), dtype=torch.uint8, device=dev)  # may raise OutOfMemoryError
x.fill_(1)
torch.cuda.synchronize(dev)
rec["allocated_at"] = time.time()
rec["allocated_gb"] = x.numel() / 2**30
save()
m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
n = 0
while time.time() - t0 < a.seconds:
    for _ in range(10):
        m = (m @ m).clamp_(-1, 1)
    torch.cuda.synchronize(dev)
    n += 10
rec["matmuls"] = n
rec["end"] = time.time()
save()
"""

# Holds memory on the GPU until the file named by argv[2] exists (a process gpusched did not start).
FOREIGN = r"""
import os, sys, time
gb, stop = float(sys.argv[1]), sys.argv[2]
if os.environ.get("GPU_CHECK_FAKE") != "1":
    import torch
    x = torch.empty(int(gb * 2**30), dtype=torch.uint8, device="cuda:0"); x.fill_(1)
    torch.cuda.synchronize()
open(stop + ".ready", "w").close()
while not os.path.exists(stop):
    time.sleep(0.05)
"""


def sh(argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    return (res.stdout + res.stderr).strip()


def median_ms(fn: Callable[[], object], n: int) -> dict[str, float]:
    from benchlib import stats_ms

    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    stats = stats_ms(times)
    return {"n": n, "median_ms": stats.median, "max_ms": stats.high}


def check_probes(backend: str, fake_file: Path | None) -> dict[str, Any]:
    """One snapshot of each backend beside nvidia-smi, and how long a snapshot takes."""
    from dataclasses import asdict

    from app.gpus.select import make_probe

    out: dict[str, Any] = {}
    if backend != "fake" and shutil.which("nvidia-smi"):
        query = "index,name,memory.total,memory.used,utilization.gpu,driver_version"
        cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"]
        out["nvidia-smi"] = sh(cmd).splitlines()
        out["nvidia-smi_timing"] = median_ms(lambda: sh(cmd), 20)
    for name in ["nvml", "gputil"] if backend != "fake" else ["fake"]:
        try:
            probe = make_probe(name, fake_file)
            snaps = probe.snapshot()
            out[name] = [asdict(s) for s in snaps]
            out[f"{name}_timing"] = median_ms(probe.snapshot, 30)
        except Exception as exc:  # a report, not a test: say what failed and go on
            out[name] = f"error: {exc!r}"
    return out


class Check:
    """The scheduler under test, its workspace, and the timeline it is sampled into."""

    def __init__(self, root: Path, runner: str, backend: str) -> None:
        from benchlib import Scheduler, bench_env

        self.root = root
        self.fake = backend == "fake"
        env, _ = bench_env(REPO)
        if self.fake:
            env["GPU_CHECK_FAKE"] = "1"
        self.env = env
        # GPU 0 only, and a ramp-up that covers PyTorch's start-up (about 5 s on the H200).
        extra = ["--no-strict-modes", "--gpu-ids", "0", "--ramp-up", "20"]
        self.sched = Scheduler(root, 1, env, runner, backend, extra)
        self.state = root / "state"
        self.jobs_file = self.sched.jobs_file
        self.sched.llm_config.write_text(
            json.dumps({"default_requirement": 1.0, "models": {"half": 0.5, "whole": 1.0}})
        )
        self.gpus_file: Path | None = root / "gpus.json" if self.fake else None
        self.job = root / "job.py"
        self.job.write_text(JOB)
        self.timeline: list[dict[str, Any]] = []
        self.marks: list[dict[str, Any]] = []
        self.t0 = time.time()

    # ---- the scheduler -----------------------------------------------------------------------

    def start(self) -> None:
        self.sched.start()

    def stop(self) -> None:
        self.sched.stop()

    def check_alive(self) -> None:
        self.sched.check_alive()

    def cli(self, *args: str) -> str:
        argv = [sys.executable, "-m", "app", *args, "--state-dir", str(self.state)]
        return sh(argv, env=self.env)

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.cli("status", "--json")))
        except ValueError:
            return {}

    def line(self, name: str, priority: int, llm: str, gb: float, seconds: float,
             extra: str = "") -> None:  # fmt: skip
        out = self.root / f"{name}.json"
        args = f"--out {out} --llm {llm} --gb {gb} --seconds {seconds} --cuda X {extra}".strip()
        with self.jobs_file.open("a") as f:
            f.write(f"{priority},{self.job},,{args},\n")
        self.mark(f"submitted {name}")

    def record(self, name: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.root / f"{name}.json").read_text()))
        return {}

    # ---- sampling ----------------------------------------------------------------------------

    def mark(self, what: str) -> None:
        self.marks.append({"t": round(time.time() - self.t0, 3), "what": what})
        print(f"[{time.time() - self.t0:7.2f}s] {what}", flush=True)

    def sample(self) -> dict[str, Any]:
        st = self.status()
        gpu = gpu0(st)
        row = {
            "t": round(time.time() - self.t0, 3),
            "used_mb": gpu.get("memory_used_mb"),
            "util": gpu.get("utilization"),
            "allocated": gpu.get("allocated"),
            "jobs": {
                str(j["id"]): [j["status"], j.get("gpus"), j.get("reason", "")[:120]]
                for j in st.get("jobs", [])
            },
        }
        self.timeline.append(row)
        self.check_alive()
        return st

    def wait(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            st = self.sample()
            if cond(st):
                self.mark(f"ok: {what}")
                return True
            time.sleep(0.25)
        self.mark(f"TIMEOUT: {what}")
        return False

    def set_fake_used(self, mb: int) -> None:
        if self.gpus_file is not None:
            data = json.loads(self.gpus_file.read_text())
            data["gpus"][0]["memory_used_mb"] = mb
            tmp = self.gpus_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.gpus_file)


def gpu0(st: dict[str, Any]) -> dict[str, Any]:
    """GPU 0 in a `status --json` ({} before the first probe)."""
    return dict((st.get("gpus") or [{}])[0])


def used_mb(st: dict[str, Any]) -> int | None:
    """GPU 0's used memory in a `status --json` (None before the first probe)."""
    value = gpu0(st).get("memory_used_mb")
    return None if value is None else int(value)


def jobs_of(st: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(j["id"]): j for j in st.get("jobs", [])}


def total_gb() -> float:
    if shutil.which("nvidia-smi") is None:
        return 80.0
    out = sh(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"])
    return float(out.splitlines()[0]) / 1024


def scenario(c: Check, results: dict[str, Any]) -> None:
    steps: dict[str, bool] = {}
    results["steps"] = steps
    results["gpu_total_gb"] = gb = total_gb()
    # Without a GPU the jobs only pretend: shorter runs keep the orchestration test quick.
    seconds = 0.2 if c.fake else 1.0
    foreign_holds_memory(c, results, steps, gb, seconds)
    oom_requeue(c, results, steps)
    kill_stubborn(c, results, steps)
    results["final_status"] = c.status()
    results["records"] = {n: c.record(n) for n in ("half_a", "half_b", "whole", "oom", "stubborn")}


def all_pending_for_memory(st: dict[str, Any]) -> bool:
    jobs = jobs_of(st).values()
    return len(jobs) == 5 and all(
        j["status"] == "pending" and "other processes" in j.get("reason", "") for j in jobs
    )


def status_is(job: int, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda st: jobs_of(st).get(job, {}).get("status") == status


def foreign_holds_memory(
    c: Check, results: dict[str, Any], steps: dict[str, bool], gb: float, seconds: float
) -> None:
    """A process gpusched did not start holds 90 % of the GPU; then it goes and the jobs run."""
    stop = c.root / "foreign.stop"
    foreign_script = c.root / "foreign.py"
    foreign_script.write_text(FOREIGN)
    foreign = subprocess.Popen(
        [sys.executable, str(foreign_script), f"{0.9 * gb:.1f}", str(stop)], env=c.env
    )
    deadline = time.time() + 60
    while not Path(str(stop) + ".ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    c.set_fake_used(int(0.9 * gb * 1024))
    c.mark("foreign process holds 90% of GPU 0")
    c.start()
    c.wait("scheduler up", lambda st: bool(st.get("scheduler", {}).get("running")), 60)
    c.line("half_a", 0, "half", gb * 0.3, 25 * seconds)
    c.line("half_b", 0, "half", gb * 0.3, 25 * seconds)
    c.line("whole", 1, "whole", gb * 0.5, 8 * seconds)
    c.line("oom", 2, "half", 5000 if c.fake else gb * 4, 5 * seconds)
    c.line("stubborn", 3, "whole", gb * 0.4, 600, "--ignore-term")
    steps["all wait while others hold memory"] = c.wait(
        "5 jobs pending, memory-threshold reason", all_pending_for_memory, 30
    )
    time.sleep(2)
    st = c.sample()
    results["reason_while_foreign"] = jobs_of(st).get(1, {}).get("reason")
    steps["none started while others hold memory"] = all(
        j["status"] == "pending" for j in jobs_of(st).values()
    )

    stop.touch()
    foreign.wait(timeout=60)
    c.set_fake_used(0)
    c.mark("foreign process gone")
    steps["two half jobs run side by side"] = c.wait(
        "jobs 1 and 2 running together",
        lambda st: status_is(1, "running")(st) and status_is(2, "running")(st),
        60,
    )
    steps["both halves allocated"] = c.wait(
        "both half jobs allocated their memory",
        lambda st: "allocated_at" in c.record("half_a") and "allocated_at" in c.record("half_b"),
        120,
    )
    st = c.status()
    results["while_halves_run"] = {"gpu": gpu0(st), "whole": jobs_of(st).get(3)}
    steps["whole job waits for the halves"] = status_is(3, "pending")(st)
    steps["whole job ran after both halves"] = c.wait(
        "job 3 completed", status_is(3, "completed"), 180
    )


def oom_requeue(c: Check, results: dict[str, Any], steps: dict[str, bool]) -> None:
    """More memory than the GPU has: requeued once with 1.5x the memory, then failed."""
    steps["oom job failed after one requeue"] = c.wait("job 4 failed", status_is(4, "failed"), 180)
    results["oom_job"] = jobs_of(c.status()).get(4)
    results["oom_log"] = c.cli("logs", "4")[-3000:]


def kill_stubborn(c: Check, results: dict[str, Any], steps: dict[str, bool]) -> None:
    """A job that ignores SIGTERM, killed by the user: its tree goes, its memory is freed."""
    steps["stubborn job allocated"] = c.wait(
        "job 5 allocated", lambda st: "allocated_at" in c.record("stubborn"), 180
    )
    before = c.status()
    results["before_kill_used_mb"] = used_mb(before)
    t_kill = time.time()
    results["kill_output"] = c.cli("kill", "5")
    results["kill_cli_s"] = round(time.time() - t_kill, 2)
    c.mark("gpusched kill 5")
    steps["stubborn job killed"] = c.wait("job 5 killed", status_is(5, "killed"), 60)
    pid = int(c.record("stubborn").get("pid") or 0)

    def gone() -> bool:
        return pid > 0 and not Path(f"/proc/{pid}").exists()

    deadline = time.time() + 60
    while not gone() and time.time() < deadline:
        c.sample()
        time.sleep(0.25)
    results["stubborn_gone_after_s"] = round(time.time() - t_kill, 2) if gone() else None
    steps["stubborn process gone"] = gone()
    if not c.fake:
        # NVML's used memory falls back once the process has gone (the probe polls each second).
        steps["its memory seen freed"] = c.wait(
            "GPU 0 memory back under 5 GB",
            lambda st: used_mb(st) is not None and used_mb(st) < 5 * 1024,
            30,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    ap.add_argument("--runner", default="tmux", choices=["tmux", "direct", "screen"])
    ap.add_argument("--gpu-backend", default="nvml", choices=["nvml", "gputil", "fake"])
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    ap.add_argument("--probes-only", action="store_true", help="compare the probes, run no job")
    args = ap.parse_args(argv)

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "runner": args.runner, "backend": args.gpu_backend,
                               "python": sys.version.split()[0]}  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    c = Check(root, args.runner, args.gpu_backend)
    try:
        results["probes"] = check_probes(args.gpu_backend, c.gpus_file)
        if not args.probes_only:
            scenario(c, results)
    except Exception as exc:
        results["error"] = repr(exc)
        print(f"error: {exc}", flush=True)
    finally:
        c.stop()
        results["marks"] = c.marks
        results["timeline"] = c.timeline
        log = root / "scheduler.out"
        results["scheduler_log_tail"] = (
            log.read_text(errors="replace")[-6000:] if log.exists() else ""
        )
        args.out.write_text(json.dumps(results, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    steps = results.get("steps", {})
    for step, ok in steps.items():
        print(f"{'PASS' if ok else 'FAIL'}  {step}")
    if args.probes_only:
        return 0 if "error" not in results else 1
    return 0 if steps and all(steps.values()) and "error" not in results else 1


if __name__ == "__main__":
    sys.exit(main())
