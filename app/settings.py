"""One typed settings model: defaults < config file < environment (`GPUSCHED_*`) < flags.

This module holds the model, its validation, and the conversion of raw values (environment
strings, config-file values, flags) into typed ones; `app/settings_sources.py` layers the
sources, and `app/config.py` reads config files and reports where each value came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from app.headers import as_duration
from app.jobsfile import parse_gpu_list
from app.models import PLACEMENTS, Policy
from app.reprs import short_repr

GPU_BACKENDS = ("auto", "nvml", "gputil", "fake")
RUNNERS = ("tmux", "screen", "direct")
MODES = ("share", "exclusive", "memory", "detected")
DEFAULT_LIMIT_FRACTION = 0.5
"""`--max-ram` / `--max-vram` without a number, or `on`: half, as in the earlier bash daemon."""


class SettingsError(ValueError):
    """A bad setting value: the message names the setting and where it came from."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Settings:
    jobs_file: Path = Path("jobs.txt")
    """The jobs file to watch (`priority,script_path,conda_env,arguments,allowed_gpus`)."""
    llm_config: Path = Path("llm_config.json")
    """GPU requirement per `--llm` model; re-read when it changes."""
    state_dir: Path | None = None
    """State directory (database, logs, exit records); None = $GPUSCHED_STATE_DIR or XDG default."""
    gpus: int | None = None
    """Manage only the first N GPUs the probe reports (default: all)."""
    mem_threshold: float = 0.8
    """Memory fraction used by other processes above which a GPU takes no new job."""
    load_threshold: float = 0.8
    """Utilisation above which a GPU with none of our jobs takes no new job."""
    monitor_interval: float = 30.0
    """Fallback period (s) for re-reading the jobs file when no file event arrived."""
    state_interval: float = 20.0
    """Fallback period (s) for checking that running jobs' sessions are still alive."""
    max_assign_attempts: int = 5
    """Launch attempts before a job whose launch keeps failing is marked failed."""
    assign_retry_wait: float = 5.0
    """Base wait (s) between launch attempts; doubles after each failure."""
    gpu_backend: str = "auto"
    """GPU probe: auto (nvml, then gputil), nvml, gputil or fake."""
    fake_gpus: Path | None = None
    """JSON file describing simulated GPUs, for --gpu-backend fake."""
    tmux_socket: str | None = None
    """Private tmux server (`tmux -L NAME`); None = the user's default server."""
    ramp_up: float = 30.0
    """Seconds a launched job's memory counts as used before the probe can see it."""
    starvation_timeout: float = 300.0
    """Seconds a blocked job waits before the GPUs it needs are held for it."""
    backfill: bool = True
    """Let smaller jobs pass a higher-priority job that cannot fit yet."""
    cuda_rewrite: bool = True
    """Rewrite the job's --cuda argument; False sets CUDA_VISIBLE_DEVICES instead."""
    probe_timeout: float = 5.0
    """Bound (s) on one GPU probe; a hung driver makes GPUs unknown for that tick."""
    tick_interval: float = 1.0
    """Longest sleep (s) between scheduler passes when nothing happens (alias: poll_interval)."""
    runner: str = "tmux"
    """Where jobs run: tmux sessions, GNU Screen sessions, or direct child processes."""
    mode: str = "share"
    """Allocation mode: share (fractional ledger), exclusive (one job per GPU), memory (by
    declared GPU memory) or detected (by free memory the probe reports)."""
    placement: str = "pack"
    """Which GPU a one-GPU job gets among those it fits on: pack (the fullest, keeping empty
    GPUs for multi-GPU jobs), first-fit (the lowest index) or spread (the emptiest)."""
    commands_file: Path | None = None
    """A second input: one plain shell command per line (`#` comments); None = none."""
    spool_dir: Path | None = None
    """Spool folder: scripts dropped in `DIR/1.to_run/` are queued; None = none."""
    min_free_mem_mb: int = 0
    """A GPU takes a new job only with at least this much free memory (MiB); 0 = no minimum."""
    gpu_ids: tuple[int, ...] | None = None
    """The GPUs the scheduler may use at all (sorted, unique); None = every GPU."""
    max_workers: int | None = None
    """Most jobs running at once; None = no limit."""
    max_ram: float | None = None
    """Fraction of host RAM the scheduler's jobs may fill, in (0, 1]; None = no limit."""
    max_vram: float | None = None
    """Fraction of each GPU's memory the scheduler's jobs may fill, in (0, 1]; None = no limit."""
    log_dir: Path | None = None
    """Where job logs are written; None = `logs/` in the state directory."""
    strict_modes: bool = True
    """Refuse inputs (jobs file, llm_config.json, ...) that others can change, like sshd's
    StrictModes (app/trust.py); False reads them anyway."""
    time_limit: float | None = None
    """Seconds a job may run before it is killed, unless it sets its own; None = no limit."""
    retries: int = 0
    """Times a failed job is queued again automatically, unless it sets its own."""
    retry_wait: float = 30.0
    """Base wait (s) before an automatic retry; doubles with each retry of the same job."""
    kill_grace: float = 5.0
    """Seconds a killed job's processes get between SIGTERM and SIGKILL (time limits,
    `gpusched kill`, the dashboard): room to save a checkpoint."""

    def policy(self) -> Policy:
        return Policy(
            mem_threshold=self.mem_threshold,
            load_threshold=self.load_threshold,
            ramp_up_s=self.ramp_up,
            starvation_s=self.starvation_timeout,
            backfill=self.backfill,
            mode=self.mode,
            placement=self.placement,
            max_workers=self.max_workers,
            min_free_mem_mb=self.min_free_mem_mb,
            max_ram=self.max_ram,
            max_vram=self.max_vram,
        )

    def validate(self) -> Settings:
        """Raises SettingsError naming the first bad setting; returns self when all are fine."""
        for f in fields(self):
            problem = check_field(f.name, getattr(self, f.name))
            if problem:
                raise SettingsError(f"{f.name} {problem}", f.name)
        if self.gpu_backend == "fake" and self.fake_gpus is None:
            raise SettingsError("--gpu-backend fake needs --fake-gpus FILE", "gpu_backend")
        if self.commands_file is not None and (
            self.commands_file.resolve() == self.jobs_file.resolve()
        ):
            raise SettingsError(
                f"commands_file and jobs_file are the same file ({self.jobs_file}): a file is "
                "either a jobs file (priority,script,env,args,gpus) or one command per line; "
                "set jobs_file to another path",
                "commands_file",
            )
        return self


# ---- checks on one value -------------------------------------------------------------------

_FRACTIONS = ("mem_threshold", "load_threshold", "max_ram", "max_vram")
_POSITIVE: tuple[str, ...] = ("monitor_interval", "state_interval", "assign_retry_wait")
_POSITIVE += ("probe_timeout", "tick_interval", "time_limit")
#: Longest interval or timeout: a year (threading's waits overflow long before 1e300 s).
MAX_INTERVAL_S = 365 * 86400.0
_WAITS: tuple[str, ...] = ("monitor_interval", "state_interval", "assign_retry_wait")
_WAITS += ("probe_timeout", "tick_interval", "kill_grace")
_NON_NEGATIVE: tuple[str, ...] = ("ramp_up", "starvation_timeout", "min_free_mem_mb", "retries")
_NON_NEGATIVE += ("retry_wait", "kill_grace")
_AT_LEAST_ONE = ("max_assign_attempts", "gpus", "max_workers")
_CHOICES = {"gpu_backend": GPU_BACKENDS, "runner": RUNNERS, "mode": MODES}
_CHOICES["placement"] = PLACEMENTS


#: A tmux socket name (`tmux -L NAME`): a file name in tmux's private socket directory.
TMUX_SOCKET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_field(name: str, value: object) -> str | None:
    """What is wrong with `value` for setting `name` ("must be ..."), or None when it is fine."""
    if value is None:
        return None
    if name == "tmux_socket" and not (
        isinstance(value, str) and TMUX_SOCKET_NAME.fullmatch(value) and len(value) <= 100
    ):
        return (
            "must be a socket name of letters, digits, '_', '.' and '-' (not a path; "
            f"tmux keeps it in its private directory), got {short_repr(value)}"
        )
    if name in _CHOICES:
        options = _CHOICES[name]
        if value in options:
            return None
        return f"must be {_one_of(options)}, got {short_repr(value)}"
    if name == "gpu_ids":
        ids = value if isinstance(value, tuple) else ()
        valid = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        return None if ids and valid else f"must be a tuple of GPU ids, got {value!r}"
    if not isinstance(value, int | float):
        return None
    if name in _FRACTIONS and not 0 < value <= 1:
        return f"must be in (0, 1], got {value}"
    if name in _POSITIVE and not value > 0:
        return f"must be positive, got {value}"
    if name in _WAITS and not value <= MAX_INTERVAL_S:  # Event.wait(1e300): OverflowError
        return f"must be at most {MAX_INTERVAL_S:g} s (a year), got {value}"
    if name in _NON_NEGATIVE and not (value >= 0 and math.isfinite(value)):
        return f"must be 0 or more, got {value}"
    if name in _AT_LEAST_ONE and value < 1:
        return f"must be 1 or more, got {value}"
    return None


def _one_of(options: tuple[str, ...]) -> str:
    return ", ".join(options[:-1]) + f" or {options[-1]}"


# ---- converting raw values (environment strings, config-file values, flags) ----------------

_BOOL = {**dict.fromkeys(("1", "true", "yes", "on"), True)}
_BOOL.update(dict.fromkeys(("0", "false", "no", "off"), False))


def _as_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _BOOL:
        return _BOOL[raw.strip().lower()]
    raise ValueError("expected true or false")


def _as_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise ValueError("expected a whole number")


def _as_float(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            pass
    raise ValueError("expected a number")


def _as_path(raw: object) -> Path:
    if isinstance(raw, str | Path) and "\0" in str(raw):
        raise ValueError("a path cannot contain a NUL character")
    if isinstance(raw, str | Path) and str(raw).strip():
        return Path(raw).expanduser()
    raise ValueError("expected a path")


def _as_str(raw: object) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise ValueError("expected text")


def _as_gpu_ids(raw: object) -> tuple[int, ...] | None:
    """`"0,1,2"`, `"0-3"`, `[0, 1, 2]` or `2` -> sorted unique ids; `"all"` -> None."""
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return None
    items = raw if isinstance(raw, list | tuple) else [raw]
    if any(isinstance(i, bool) or not isinstance(i, int | str) for i in items):
        raise ValueError("expected GPU ids like 0,1,2 or 0-3")
    try:
        ids = parse_gpu_list(",".join(str(i) for i in items))
    except ValueError:
        raise ValueError("expected GPU ids like 0,1,2 or 0-3") from None
    if ids is None:
        raise ValueError("no GPU ids given (leave it unset, or say all, to use every GPU)")
    return ids


_LIMIT_ON = ("on", "true", "yes")
_LIMIT_OFF = ("off", "false", "no", "none")


def _as_limit(raw: object) -> float | None:
    """A fraction (0.7), or a switch: on/true -> DEFAULT_LIMIT_FRACTION, off/false -> no limit."""
    if raw is True:
        return DEFAULT_LIMIT_FRACTION
    if raw is False:
        return None
    if isinstance(raw, str) and raw.strip().lower() in _LIMIT_ON:
        return DEFAULT_LIMIT_FRACTION
    if isinstance(raw, str) and raw.strip().lower() in _LIMIT_OFF:
        return None
    try:
        return _as_float(raw)
    except ValueError:
        raise ValueError("expected a fraction in (0, 1], on or off") from None


Converter = Callable[[object], object]


def _optional(convert: Converter, none_word: bool = True) -> Converter:
    def optional(raw: object) -> object:
        if raw is None or (none_word and isinstance(raw, str) and raw.strip().lower() == "none"):
            return None
        return convert(raw)

    return optional


# Field annotations are strings here (`from __future__ import annotations`).
_BY_TYPE: dict[str, Converter] = {
    "bool": _as_bool,
    "int": _as_int,
    "int | None": _optional(_as_int),
    "float": _as_float,
    "float | None": _optional(_as_float),
    "str": _as_str,
    "str | None": _optional(_as_str),
    "Path": _as_path,
    "Path | None": _optional(_as_path, none_word=False),
}
_SPECIAL: dict[str, Converter] = {
    "gpu_ids": _optional(_as_gpu_ids),
    "max_ram": _optional(_as_limit),
    "max_vram": _optional(_as_limit),
    "time_limit": _optional(as_duration),
}
CONVERTERS: dict[str, Converter] = {
    f.name: _SPECIAL.get(f.name) or _BY_TYPE[str(f.type)] for f in fields(Settings)
}
"""Setting name -> function from a raw value (str, number, bool, list) to its typed value."""


def convert(name: str, raw: object, where: str, key: str | None = None) -> object:
    """Raw value -> typed, checked value; errors say `where` (a source) and `key` (as spelled)."""
    label = key or name
    try:
        value = CONVERTERS[name](raw)
    except (ValueError, TypeError) as exc:
        raise SettingsError(
            f"{where}: bad value {short_repr(raw)} for {label}: {exc}", name
        ) from None
    problem = check_field(name, value)
    if problem:
        raise SettingsError(f"{where}: {label} {problem}", name)
    return value
