"""The settings flags shared by `gpusched start` and `gpusched config`.

Every flag stores under the setting's name and defaults to None (= not given), so that the
config file and the environment show through; which flag gave a value is recorded for
`gpusched config`'s sources (`--screen` and `--runner screen` set the same setting).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from app.config import Effective, load_settings
from app.models import PLACEMENTS
from app.settings import DEFAULT_LIMIT_FRACTION, GPU_BACKENDS, MODES, RUNNERS, Settings

_GIVEN = "setting_flags"
"""Namespace attribute: setting name -> the flag that set it."""


class _SettingFlag(argparse.Action):
    """Stores like `store` (or `store_const` with nargs=0) and remembers the flag's spelling."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = {**getattr(namespace, _GIVEN, {}), self.dest: option_string}
        setattr(namespace, _GIVEN, given)


def settings_parent() -> argparse.ArgumentParser:
    """A parent parser with --config and one flag per setting (but --state-dir, common to all)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "settings",
        "Each also comes from a config file or a GPUSCHED_* variable; flags win "
        "(docs/configuration.md). Defaults in parentheses.",
    )

    def flag(*names: str, **kwargs: Any) -> None:
        group.add_argument(*names, action=_SettingFlag, **kwargs)

    def switch(name: str, dest: str, const: object, text: str) -> None:
        flag(name, dest=dest, nargs=0, const=const, help=text)

    flag(
        "--config",
        dest="config_file",
        type=Path,
        metavar="FILE",
        help="config file, .toml or .yaml (default: ./gpusched.toml or ./gpusched.yaml if present)",
    )
    # Inputs
    flag("--jobs-file", type=Path, help="jobs file to watch (jobs.txt)")
    flag("--llm-config", type=Path, help="model requirements (llm_config.json)")
    flag(
        "--commands-file",
        type=Path,
        metavar="FILE",
        help="also queue each line of FILE as a plain shell command (# comments)",
    )
    flag(
        "--spool-dir",
        type=Path,
        metavar="DIR",
        help="also queue scripts dropped in DIR/1.to_run/ (folders created if missing)",
    )
    switch(
        "--no-strict-modes",
        "strict_modes",
        False,
        "read the inputs even when others can change them (docs/security.md)",
    )
    # Where jobs run
    flag("--runner", choices=RUNNERS, help="run jobs in tmux, GNU Screen or as children (tmux)")
    switch("--screen", "runner", "screen", "run jobs in GNU Screen sessions (= --runner screen)")
    switch("--direct", "runner", "direct", "run jobs as child processes (= --runner direct)")
    flag("--tmux-socket", metavar="NAME", help="run jobs on a private tmux server (tmux -L NAME)")
    flag("--log-dir", type=Path, metavar="DIR", help="job logs (the state directory's logs/)")
    switch(
        "--no-cuda-rewrite",
        "cuda_rewrite",
        False,
        "leave --cuda alone and set CUDA_VISIBLE_DEVICES instead",
    )
    # Which GPUs and how they are shared
    # No argparse type on optional numbers: `none` clears them (the converter handles it).
    flag("--gpus", metavar="N", help="manage only the first N GPUs; none = all (all)")
    flag(
        "--gpu-ids",
        metavar="IDS",
        help='the only GPUs to use, e.g. "0,1,2" or "0-3"; all = every GPU (all)',
    )
    flag("--gpu-backend", choices=GPU_BACKENDS, help="GPU probe (auto)")
    flag("--fake-gpus", type=Path, metavar="FILE", help="simulated GPUs, JSON (--gpu-backend fake)")
    flag(
        "--mode",
        choices=MODES,
        help="share: fractional GPU shares; exclusive: one job per GPU; memory: by declared "
        "GPU memory; detected: by free memory the probe reports (share)",
    )
    flag(
        "--placement",
        choices=PLACEMENTS,
        help="the GPU a one-GPU job gets among those it fits on: pack (the fullest), "
        "first-fit (the lowest index) or spread (the emptiest) (pack)",
    )
    flag(
        "--mem-threshold",
        type=float,
        help="others' memory fraction that keeps a GPU off limits (0.8)",
    )
    flag("--load-threshold", type=float, help="load that keeps an unused GPU off limits (0.8)")
    flag(
        "--min-free-mem-mb",
        type=int,
        metavar="MB",
        help="a GPU takes a job only with this much free memory, MiB (0 = no minimum)",
    )
    flag("--max-workers", metavar="N", help="most jobs running at once; none = no limit (none)")
    for name, what in (("ram", "host RAM"), ("vram", "each GPU's memory")):
        flag(
            f"--max-{name}",
            nargs="?",
            const=DEFAULT_LIMIT_FRACTION,
            metavar="FRACTION",
            help=f"fraction of {what} jobs may fill, e.g. 0.7; without a number "
            f"{DEFAULT_LIMIT_FRACTION:g}; off = no limit (off)",
        )
    flag("--ramp-up", type=float, help="seconds a new job's memory counts as used (30)")
    flag(
        "--starvation-timeout",
        type=float,
        help="seconds before GPUs are held for a blocked job (300)",
    )
    switch(
        "--no-backfill",
        "backfill",
        False,
        "strict order: no job passes a blocked higher-priority job",
    )
    # Timing
    flag(
        "--poll-interval",
        dest="tick_interval",
        type=float,
        metavar="SECONDS",
        help="longest sleep between scheduler passes, s (1)",
    )
    flag("--monitor-interval", type=float, help="fallback jobs-file re-read period, s (30)")
    flag("--state-interval", type=float, help="fallback session check period, s (20)")
    flag("--probe-timeout", type=float, help="bound on one GPU probe, s (5)")
    flag("--max-assign-attempts", type=int, help="launch attempts before failing a job (5)")
    flag("--assign-retry-wait", type=float, help="base back-off between launch attempts, s (5)")
    # Time limits and retries (app/limits.py)
    flag(
        "--time-limit",
        metavar="DURATION",
        help="kill a job running longer, e.g. 90s, 30m, 2h, 1h30m, unless it sets its own; "
        "none = no limit (none)",
    )
    flag("--retries", type=int, metavar="N", help="queue a failed job again up to N times (0)")
    flag("--retry-wait", type=float, help="base wait before an automatic retry, doubling, s (30)")
    flag(
        "--kill-grace",
        type=float,
        metavar="SECONDS",
        help="a killed job's time between SIGTERM and SIGKILL, e.g. to save a checkpoint (5)",
    )
    return parent


def effective_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Effective:
    """The settings for parsed `start`/`config` arguments: file < environment < these flags."""
    flags = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return load_settings(
        os.environ if env is None else env,
        flags,
        config_file=args.config_file,
        flag_names=getattr(args, _GIVEN, {}),
    )
