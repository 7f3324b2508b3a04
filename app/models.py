"""Plain data shared by every layer: no I/O here.

The flow is jobs file -> JobSpec -> stored Job -> allocator (QueuedJob, GpuView) -> Placement.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import shlex
import sqlite3
from dataclasses import dataclass, field


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"
    LOST = "lost"
    UNSCHEDULABLE = "unschedulable"


#: States in which an identical line is a duplicate (a failed/killed/lost job may be queued again).
BLOCKING_DUPLICATE_STATES = frozenset({JobState.PENDING, JobState.RUNNING, JobState.COMPLETED})
#: States a job never leaves by itself.
ENDED_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.KILLED, JobState.LOST, JobState.UNSCHEDULABLE}
)


#: What makes shlex split differently from splitting at blanks; and shlex's blanks.
_QUOTING = re.compile(r"[\"'\\]")
_BLANKS = re.compile(r"[ \t\r\n]+")


def shell_words(args: str) -> list[str]:
    """`shlex.split(args)`; raises ValueError on unbalanced quotes or a trailing backslash.

    Arguments without quotes or backslashes (most lines) take a fast path that gives the
    same words: shlex reads one character at a time, about 20 times slower, and a 100,000-line
    jobs file splits every line's arguments.
    """
    if _QUOTING.search(args):
        return shlex.split(args)
    stripped = args.strip(" \t\r\n")
    return _BLANKS.split(stripped) if stripped else []


def shell_problem(args: str) -> str | None:
    """Why `args` cannot be split as shell words (unbalanced quotes, a trailing backslash)."""
    if not _QUOTING.search(args):
        return None
    try:
        shlex.split(args)
    except ValueError as exc:
        problem = "unbalanced quotes" if "quotation" in str(exc) else "trailing backslash"
        return f"{problem} ({exc})"
    return None


def loose_words(args: str) -> list[str]:
    """`shell_words`, or blank-separated words where the quoting is broken (never raises)."""
    try:
        return shell_words(args)
    except ValueError:
        return args.split()


def dedup_key(script: str, conda_env: str, args: str) -> str:
    """Identity of a job for deduplication: script, conda env and arguments, not the priority.

    Arguments are compared as shell words, so `--a  1` and `--a 1` are the same job.
    """
    words = loose_words(args)
    material = "\0".join([script, conda_env, *words])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class JobSpec:
    """One job as the user wrote it (a jobs.txt line or `gpusched add`)."""

    priority: int
    script: str  # absolute path after parsing
    conda_env: str  # "" = no activation; a name or a path to an env prefix
    args: str  # as written, shell words
    allowed_gpus: tuple[int, ...] | None  # None = any GPU
    source: str = ""  # "FILE:LINE", or "" when not from a file
    kind: str = "script"  # "script": run `script` with `args`; "command": `script` is shell code
    declared: str = ""  # the script header's requirements as JSON (see requirements.py)
    nonce: str = ""  # part of the identity: a spool drop is a new job even with the same name

    @property
    def key(self) -> str:
        key = dedup_key(self.script, self.conda_env, self.args)
        if self.kind != "script" or self.nonce:
            key = dedup_key(f"{self.kind}:{self.nonce}", key, "")
        return key


@dataclass(frozen=True)
class LineError:
    """A malformed line: reported as `file:line: reason`, never fatal."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class RequirementError(ValueError):
    """A GPU requirement that is neither a fraction of one GPU nor a whole number of GPUs."""


@dataclass(frozen=True)
class Requirement:
    """What a job needs: `amount` in (0, 1] is a share of one GPU, an integer >= 2 is whole GPUs.

    `vram_mb` is the job's declared GPU memory per GPU (None = not declared), `ram_mb` the host RAM
    it needs (None = not declared) and `ramp_up_s` how long after its start its memory counts as
    reserved (None = the policy's `ramp_up_s`).
    """

    amount: float
    vram_mb: int | None = None
    ram_mb: int | None = None
    ramp_up_s: float | None = None

    def __post_init__(self) -> None:
        validate_amount(self.amount)
        if self.ram_mb is not None and self.ram_mb < 0:
            raise RequirementError(f"RAM requirement {self.ram_mb} MB must not be negative")
        if self.ramp_up_s is not None and not (
            math.isfinite(self.ramp_up_s) and self.ramp_up_s >= 0
        ):
            raise RequirementError(f"ramp-up {self.ramp_up_s!r} s must be a number >= 0")

    @property
    def gpu_count(self) -> int:
        return 1 if self.amount <= 1 else int(self.amount)

    @property
    def share(self) -> float:
        """The ledger share taken on each GPU the job is placed on."""
        return self.amount if self.amount <= 1 else 1.0

    def __str__(self) -> str:
        if self.amount <= 1:
            return f"{self.amount:g} GPU"
        return f"{int(self.amount)} GPUs"


def validate_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        raise RequirementError(f"GPU requirement {amount!r} is not a number")
    if amount <= 0:
        raise RequirementError(f"GPU requirement {amount:g} must be greater than 0")
    if amount > 1 and amount != int(amount):
        raise RequirementError(
            f"GPU requirement {amount:g} must be a fraction of one GPU (0 < r <= 1) "
            "or a whole number of GPUs (2, 3, ...)"
        )


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU as a probe saw it at one moment. `utilization` is 0.0-1.0."""

    index: int
    name: str
    memory_total_mb: int
    memory_used_mb: int
    utilization: float


@dataclass(frozen=True)
class QueuedJob:
    """A pending job as the allocator sees it."""

    id: int
    priority: int
    seq: int  # submission order: first come first served within a priority
    requirement: Requirement
    allowed_gpus: tuple[int, ...] | None
    waiting_since: float
    #: (amount, declared vram, declared ram, allowed GPUs as written): the allocator answers
    #: the jobs of one class alike; made once here, not on every pass over a long queue.
    klass: tuple[float, int | None, int | None, tuple[int, ...] | None] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        req = self.requirement
        klass = (req.amount, req.vram_mb, req.ram_mb, self.allowed_gpus)
        object.__setattr__(self, "klass", klass)


@dataclass(frozen=True)
class RunningJob:
    """A job of ours holding GPUs: the ledger is the set of these."""

    id: int
    gpus: tuple[int, ...]
    share: float  # share held on each of its GPUs (1.0 for multi-GPU jobs)
    vram_mb: int | None  # declared memory per GPU, None = its share of the GPU's memory
    started_at: float
    ram_mb: int | None = None  # declared host RAM, None = not declared
    ramp_up_s: float | None = None  # its own ramp-up, None = the policy's


@dataclass(frozen=True)
class HostSnapshot:
    """The host's memory as a probe saw it at one moment (MB)."""

    ram_total_mb: int
    ram_available_mb: int


#: `Policy.mode` values: how jobs share a GPU (see app.allocator).
ALLOCATION_MODES = ("share", "exclusive", "memory", "detected")
#: `Policy.placement` values: which GPU a one-GPU job gets among those it fits on (see
#: app.allocator): the fullest (best fit), the lowest-indexed, or the emptiest.
PLACEMENTS = ("pack", "first-fit", "spread")


@dataclass(frozen=True)
class Policy:
    mem_threshold: float = 0.8  # others' memory use above this fraction keeps a GPU off limits
    load_threshold: float = 0.8  # utilisation above this keeps an idle-of-ours GPU off limits
    ramp_up_s: float = 30.0  # a launched job's memory counts as used for this long
    starvation_s: float = 300.0  # a blocked head job older than this gets GPUs held for it
    backfill: bool = True  # let smaller jobs pass a blocked bigger one
    placement: str = "pack"  # one of PLACEMENTS: best fit, lowest index, or least used
    mode: str = "share"  # one of ALLOCATION_MODES
    max_workers: int | None = None  # at most this many of our jobs at once (None = no limit)
    min_free_mem_mb: int = 0  # a GPU with less free memory than this takes no new job
    max_ram: float | None = None  # fraction of host RAM jobs with declared RAM may fill
    max_vram: float | None = None  # fraction of a GPU's memory that may be in use with a new job

    def __post_init__(self) -> None:
        if self.mode not in ALLOCATION_MODES:
            raise ValueError(
                f"allocation mode {self.mode!r} is not one of {', '.join(ALLOCATION_MODES)}"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")


@dataclass(frozen=True)
class Placement:
    job_id: int
    gpus: tuple[int, ...]
    share: float


@dataclass(frozen=True)
class AllocationResult:
    placements: list[Placement] = field(default_factory=list)
    #: why each job that was not placed is waiting
    reasons: dict[int, str] = field(default_factory=dict)
    #: jobs that can never be placed on this machine, with the reason
    unschedulable: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    status: JobState
    priority: int
    seq: int
    script: str
    conda_env: str
    args: str
    allowed_gpus: str | None
    source: str
    requirement: float | None
    gpus: tuple[int, ...]
    share: float | None
    vram_mb: int | None
    session: str | None
    runner: str | None
    log_path: str | None
    command: str | None
    pid: int | None
    launched: bool
    exit_code: int | None
    reason: str
    attempts: int
    next_attempt_at: float | None
    submitted_at: float
    queued_at: float
    started_at: float | None
    ended_at: float | None
    rev: int = 0
    """Revision stamp: changes on every write to the row (see schema 002_job_revisions)."""
    kind: str = "script"
    """"script", or "command" (a commands-file line: `script` holds shell code)."""
    declared: str = ""
    """Requirements the script's header declared, as JSON (schema 003_inputs)."""
    retries_done: int = 0
    """Failed runs automatically queued again (schema 004_run_limits, app/limits.py)."""
    oom_vram_mb: int | None = None
    """GPU memory per GPU asked for after a CUDA out-of-memory death; None = never."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["status"] = JobState(data["status"])
        gpus = data["gpus"]
        data["gpus"] = tuple(int(g) for g in gpus.split(",")) if gpus else ()
        data["launched"] = bool(data["launched"])
        return cls(**data)
