"""One typed settings model for the scheduler: defaults < environment (`GPUSCHED_*`) < flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from app.models import Policy


class SettingsError(ValueError):
    """A bad setting value: the message names the setting and where it came from."""


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
    """Longest sleep between scheduler passes when nothing happens."""

    def policy(self) -> Policy:
        return Policy(
            mem_threshold=self.mem_threshold,
            load_threshold=self.load_threshold,
            ramp_up_s=self.ramp_up,
            starvation_s=self.starvation_timeout,
            backfill=self.backfill,
        )

    def validate(self) -> Settings:
        for name in ("mem_threshold", "load_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise SettingsError(f"{name} must be in (0, 1], got {value}")
        for name in (
            "monitor_interval",
            "state_interval",
            "assign_retry_wait",
            "probe_timeout",
            "tick_interval",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_assign_attempts < 1:
            raise SettingsError(f"max_assign_attempts must be >= 1, got {self.max_assign_attempts}")
        if self.gpus is not None and self.gpus < 1:
            raise SettingsError(f"gpus must be >= 1, got {self.gpus}")
        if self.gpu_backend not in ("auto", "nvml", "gputil", "fake"):
            raise SettingsError(
                f"gpu_backend must be auto, nvml, gputil or fake, got {self.gpu_backend!r}"
            )
        if self.gpu_backend == "fake" and self.fake_gpus is None:
            raise SettingsError("--gpu-backend fake needs --fake-gpus FILE")
        return self


_BOOL = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _convert(name: str, raw: str, default: object, source: str) -> object:
    try:
        if isinstance(default, bool):
            return _BOOL[raw.strip().lower()]
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path) or name in ("state_dir", "fake_gpus"):
            return Path(raw)
        if name == "gpus":
            return int(raw)
    except (ValueError, KeyError) as exc:
        raise SettingsError(f"{source}: bad value {raw!r} for {name}") from exc
    return raw


def from_sources(env: Mapping[str, str], flags: Mapping[str, object]) -> Settings:
    """Defaults < environment (`GPUSCHED_<NAME>`) < flags given on the command line (not None)."""
    base = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        env_name = f"GPUSCHED_{f.name.upper()}"
        if env_name in env:
            values[f.name] = _convert(f.name, env[env_name], getattr(base, f.name), env_name)
        flag = flags.get(f.name)
        if flag is not None:
            values[f.name] = flag
    return replace(base, **values).validate()  # type: ignore[arg-type]
