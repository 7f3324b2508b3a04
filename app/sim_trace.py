"""Traces for `gpusched simulate`: the CSV format, its parser and a synthetic generator. Pure.

A trace is CSV with the header `submit_at,priority,requirement,duration,vram_gb,allowed_gpus`::

    submit_at,priority,requirement,duration,vram_gb,allowed_gpus
    0,0,0.5,600,,
    12.5,1,2,3600,40,0-3
    30,0,1,120,,0,2

`submit_at` and `duration` are seconds, `requirement` is a GPU requirement as `llm_config.json`
writes it (a share 0 < r <= 1 or a whole number of GPUs), `vram_gb` the declared GPU memory per
GPU (empty = undeclared) and `allowed_gpus` the jobs file's GPU list (empty = any). As in the jobs
file, everything after the fifth comma is the GPU list, so `0,2` needs no quoting; `#` comments
and blank lines are ignored. A bad row is a `TraceError` naming `file:line` and the reason.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app import headers
from app.jobsfile import format_gpu_list, parse_gpu_list
from app.models import Requirement, RequirementError

HEADER = "submit_at,priority,requirement,duration,vram_gb,allowed_gpus"
COLUMNS = tuple(HEADER.split(","))

#: GPU amounts the generator draws, and each mix's weights for them.
AMOUNTS = (0.25, 0.5, 1.0, 2.0, 4.0)
MIXES: dict[str, tuple[int, ...]] = {
    "mixed": (20, 20, 30, 20, 10),
    "fractional": (35, 35, 20, 7, 3),
    "multi": (10, 10, 20, 35, 25),
}
#: The generator's declared memory per GPU, as a fraction of the job's share of a GPU's memory.
VRAM_FRACTION = 0.75


class TraceError(ValueError):
    """A trace that cannot be used; the message starts with `file:line:` for a bad row."""


@dataclass(frozen=True)
class TraceJob:
    """One trace row. `id` is its position among the trace's rows (1 = first)."""

    id: int
    submit_at: float
    priority: int
    requirement: Requirement
    duration: float
    allowed_gpus: tuple[int, ...] | None = None

    @property
    def work(self) -> float:
        """GPU-seconds of work: the requirement (a share or a GPU count) times the duration."""
        return self.requirement.amount * self.duration


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r} is not a finite number")
    return value


def parse_row(fields: list[str], job_id: int) -> TraceJob:
    """One data row (already split by the CSV reader) -> TraceJob; ValueError says why not."""
    if len(fields) < len(COLUMNS) - 1:
        raise ValueError(f"expected {len(COLUMNS)} fields ({HEADER}), got {len(fields)}")
    cells = [f.strip() for f in fields[:5]]
    submit_at = _number(cells[0], "submit_at")
    if submit_at < 0:
        raise ValueError(f"submit_at {cells[0]} must be >= 0")
    try:
        priority = int(cells[1])
    except ValueError:
        raise ValueError(f"priority {cells[1]!r} is not an integer") from None
    amount = _number(cells[2], "requirement")
    duration = _number(cells[3], "duration")
    if duration <= 0:
        raise ValueError(f"duration {cells[3]} must be > 0 seconds")
    vram_mb: int | None = None
    if cells[4]:
        vram_gb = _number(cells[4], "vram_gb")
        if vram_gb <= 0 or vram_gb > headers.MAX_GB:
            raise ValueError(f"vram_gb {cells[4]} must be > 0 and at most 1 PiB")
        vram_mb = max(1, int(vram_gb * 1024))
    try:
        requirement = Requirement(amount, vram_mb)
    except RequirementError as exc:
        raise ValueError(str(exc)) from None
    allowed = parse_gpu_list(",".join(fields[5:]))
    return TraceJob(job_id, submit_at, priority, requirement, duration, allowed)


def parse_trace(text: str, source: str = "trace.csv") -> list[TraceJob]:
    """Every row of a trace, in file order; TraceError at the first bad line (`source:LINE: `)."""
    jobs: list[TraceJob] = []
    seen_header = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = next(csv.reader([line]))
        if not seen_header:
            names = tuple(f.strip() for f in fields)
            if names != COLUMNS:
                raise TraceError(f"{source}:{number}: expected the header {HEADER}")
            seen_header = True
            continue
        try:
            jobs.append(parse_row(fields, len(jobs) + 1))
        except ValueError as exc:
            raise TraceError(f"{source}:{number}: {exc}") from None
    if not seen_header:
        raise TraceError(f"{source}: empty trace (expected the header {HEADER})")
    return jobs


def read_trace(path: Path) -> list[TraceJob]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    return parse_trace(text, str(path))


def _num(value: float) -> str:
    return f"{value:.6g}" if value != int(value) or abs(value) >= 1e15 else str(int(value))


def format_trace(jobs: Iterable[TraceJob]) -> str:
    """The CSV text (header included) that parse_trace reads back to the same jobs."""
    out = io.StringIO()
    out.write(HEADER + "\n")
    for job in jobs:
        req = job.requirement
        vram = "" if req.vram_mb is None else _num(round(req.vram_mb / 1024, 3))
        cells = [
            _num(job.submit_at),
            str(job.priority),
            f"{req.amount:g}",
            _num(job.duration),
            vram,
            format_gpu_list(job.allowed_gpus),
        ]
        out.write(",".join(cells) + "\n")
    return out.getvalue()


def generate(
    n: int, seed: int, gpus: int = 8, mix: str = "mixed", load: float = 1.0, gpu_mem_gb: int = 80
) -> list[TraceJob]:
    """n synthetic jobs, the same for the same arguments (only `random.Random(seed)` is used).

    - GPU amounts 0.25/0.5/1/2/4 drawn with `MIXES[mix]`'s weights;
    - durations lognormal (median 5 min, sigma 1.2: heavy-tailed, mean about 10 min, the
      longest of 2,000 jobs several hours), whole seconds, at least 10;
    - arrivals Poisson, at the rate that offers `load` times the machine's capacity
      (`gpus` GPUs) over the trace: load > 1 builds a queue, < 1 leaves GPUs idle at times;
    - priority 0 (four in five) or 1; a declared memory per GPU of 3/4 of the job's share of a
      `gpu_mem_gb` GPU (share mode never waits for memory; memory mode fits more small jobs on a
      GPU than shares would); any GPU.
    """
    if n < 0 or gpus < 1 or load <= 0 or gpu_mem_gb <= 0:
        raise ValueError("generate needs n >= 0, gpus >= 1, load > 0 and gpu_mem_gb > 0")
    if mix not in MIXES:
        raise ValueError(f"mix {mix!r} is not one of {', '.join(MIXES)}")
    rng = random.Random(seed)
    amounts = rng.choices(AMOUNTS, weights=MIXES[mix], k=n)
    durations = [max(10.0, float(round(rng.lognormvariate(math.log(300), 1.2)))) for _ in amounts]
    work = sum(a * d for a, d in zip(amounts, durations, strict=True))
    rate = load * gpus / (work / n) if n else 1.0  # jobs per second
    jobs: list[TraceJob] = []
    t = 0.0
    for i, (amount, duration) in enumerate(zip(amounts, durations, strict=True)):
        if i:
            t += rng.expovariate(rate)
        priority = 0 if rng.random() < 0.8 else 1
        # One memory size per GPU amount: a trace has a few job classes, like real ones.
        vram_gb = max(1, math.floor(min(amount, 1.0) * gpu_mem_gb * VRAM_FRACTION))
        req = Requirement(amount, vram_gb * 1024)
        jobs.append(TraceJob(i + 1, round(t, 1), priority, req, duration))
    return jobs
